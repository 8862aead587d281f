//! Hashing for maps keyed by numbers pgweir hands out itself: client ids, cancel-key pids,
//! statement ids. Nobody outside chooses the keys such a map holds, so the keyed SipHash that
//! guards maps of client-chosen strings against collision floods buys nothing there, and it
//! costs ~80 instructions a lookup (a server connection's statement table is looked up twice
//! per Bind of a prepared statement). Maps keyed by anything a client sends keep the standard
//! hasher.

use std::hash::{BuildHasher, Hasher};

/// [`BuildHasher`] for maps keyed by pgweir's own integer ids.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdHash;

impl BuildHasher for IdHash {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

/// A multiplicative hash (FxHash's step): the product spreads an id's bits into the high ones,
/// which hashbrown's control bytes and dashmap's shard choice read, while an odd multiplier
/// keeps distinct ids' low bits, which pick the bucket, distinct.
#[derive(Debug, Default)]
pub struct IdHasher(u64);

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl IdHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for IdHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    #[inline]
    fn write_i32(&mut self, n: i32) {
        self.add(u64::from(n as u32));
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    #[test]
    fn sequential_and_random_ids_spread_over_buckets_and_shards() {
        // Sequential ids (client ids, statement ids) must not pile into a few buckets: their
        // low bits choose the bucket, and distinct ids keep distinct low bits.
        let low: HashSet<u64> = (1..=1024u64).map(|id| IdHash.hash_one(id) & 1023).collect();
        assert_eq!(low.len(), 1024);
        // dashmap picks the shard from the bits below the top seven, hashbrown's control byte
        // is the top seven: both must vary for ids that differ only in their low bits, and for
        // peered cancel pids, whose bits from 17 up are the peer's id.
        for ids in [
            (1..=4096u64).collect::<Vec<_>>(),
            (0..4096u64)
                .map(|r| (7u64 << 17) | ((r * 2_654_435_761) & 0x1_ffff))
                .collect(),
        ] {
            let top7: HashSet<u64> = ids.iter().map(|&id| IdHash.hash_one(id) >> 57).collect();
            let shard: HashSet<u64> = ids.iter().map(|&id| (IdHash.hash_one(id) << 7) >> 59).collect();
            assert!(top7.len() >= 100, "{} distinct control bytes", top7.len());
            assert_eq!(shard.len(), 32, "every one of 32 shards used");
        }
        // The integer writes agree with what a map of them needs: equal keys, equal hashes.
        assert_eq!(IdHash.hash_one(5i32), IdHash.hash_one(5i32));
        assert_ne!(IdHash.hash_one(5i32), IdHash.hash_one(6i32));
        let mut m: HashMap<u64, u64, IdHash> = HashMap::default();
        for id in 0..10_000 {
            m.insert(id, id * 2);
        }
        assert!((0..10_000).all(|id| m.get(&id) == Some(&(id * 2))));
    }
}
