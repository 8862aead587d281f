//! Read buffers lent to client sessions while they have something to read.
//!
//! An idle client holds no read buffer (that is what keeps it at a few KiB), so a busy client
//! would otherwise free and re-allocate its 16 KiB buffer on every transaction, and glibc serves
//! that size from locked bins rather than its per-thread cache. Like PgBouncer's iobuf slab, a
//! few spare buffers per worker thread are kept for the next client that needs one.

use std::sync::Mutex;

use bytes::BytesMut;

use crate::metrics::{Padded, SHARDS, shard};

/// Buffers kept per shard. Bounded so a burst of clients going idle returns memory to the
/// allocator: 64 × 16 KiB = 1 MiB per shard at most.
const KEEP_PER_SHARD: usize = 64;

#[derive(Debug)]
pub struct BufferPool {
    size: usize,
    shards: [Padded<Mutex<Vec<BytesMut>>>; SHARDS],
}

impl BufferPool {
    /// A pool of empty buffers of `size` bytes of capacity.
    pub fn new(size: usize) -> Self {
        BufferPool {
            size,
            shards: Default::default(),
        }
    }

    /// An empty buffer with at least `size` bytes of capacity.
    pub fn take(&self) -> BytesMut {
        let spare = self.shards[shard()].0.lock().unwrap_or_else(|e| e.into_inner()).pop();
        spare.unwrap_or_else(|| BytesMut::with_capacity(self.size))
    }

    /// Spare buffers held for the next taker, over all shards.
    pub fn spare(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.0.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// Returns an empty buffer. Buffers that grew for a large message (or are too small) go
    /// back to the allocator instead, so the pool never hoards big ones.
    pub fn give(&self, mut buf: BytesMut) {
        if !buf.is_empty() || buf.capacity() > 2 * self.size {
            return;
        }
        // Consumed bytes at the front still count against the allocation: an empty, unshared
        // buffer gets them back here without allocating.
        buf.reserve(self.size);
        if buf.capacity() > 2 * self.size {
            return;
        }
        let mut spare = self.shards[shard()].0.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < KEEP_PER_SHARD {
            spare.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Buf;

    use super::*;

    #[test]
    fn reuses_only_right_sized_empty_buffers() {
        let pool = BufferPool::new(1024);
        let a = pool.take();
        assert!(a.capacity() >= 1024);
        let ptr = a.as_ptr();
        pool.give(a);
        let b = pool.take();
        assert_eq!(b.as_ptr(), ptr, "the returned buffer is lent again");

        let mut big = BytesMut::with_capacity(1 << 20);
        big.clear();
        pool.give(big);
        // A buffer whose front was consumed comes back whole.
        let mut used = pool.take();
        let used_ptr = used.as_ptr();
        used.extend_from_slice(&[7; 100]);
        used.advance(100);
        pool.give(used);
        let again = pool.take();
        assert_eq!(again.as_ptr(), used_ptr);
        assert!(again.capacity() >= 1024);
        drop(again);
        let mut full = pool.take();
        full.extend_from_slice(b"x");
        pool.give(full);
        let c = pool.take();
        assert!(c.capacity() < 1 << 20 && c.is_empty());
        drop((b, c));

        for _ in 0..KEEP_PER_SHARD + 10 {
            pool.give(BytesMut::with_capacity(1024));
        }
        let kept = pool.shards[shard()].0.lock().unwrap().len();
        assert_eq!(kept, KEEP_PER_SHARD);
    }
}
