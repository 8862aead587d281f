//! Read buffers lent to client sessions while they have something to read.
//!
//! An idle client holds no read buffer (that is what keeps it at a few KiB), so a busy client
//! would otherwise free and re-allocate its 16 KiB buffer on every transaction, and glibc serves
//! that size from locked bins rather than its per-thread cache. Like PgBouncer's iobuf slab, a
//! few spare buffers per worker thread are kept for the next client that needs one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use bytes::BytesMut;

use crate::metrics::{Padded, SHARDS, shard};

/// Spares kept per shard of a [`SpareList`]. Bounded so a burst of clients going idle returns
/// memory to the allocator: 64 × 16 KiB = 1 MiB of read buffers per shard at most.
pub(crate) const KEEP_PER_SHARD: usize = 64;

/// Values kept for the next taker, a list per shard of threads (so workers do not share one
/// lock), each holding at most [`KEEP_PER_SHARD`].
#[derive(Debug)]
pub(crate) struct SpareList<T> {
    shards: [Padded<Mutex<Vec<T>>>; SHARDS],
}

impl<T> Default for SpareList<T> {
    fn default() -> Self {
        SpareList {
            shards: Default::default(),
        }
    }
}

impl<T> SpareList<T> {
    fn shard(&self, index: usize) -> MutexGuard<'_, Vec<T>> {
        // A push or a pop cannot be left half-done.
        self.shards[index].0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A kept value, this thread's shard's last.
    pub(crate) fn pop(&self) -> Option<T> {
        self.shard(shard()).pop()
    }

    /// Keeps `value` unless this thread's shard is full (then it is dropped).
    pub(crate) fn push(&self, value: T) {
        let mut kept = self.shard(shard());
        if kept.len() < KEEP_PER_SHARD {
            kept.push(value);
        }
    }

    /// Values kept over all shards.
    fn len(&self) -> usize {
        (0..SHARDS).map(|i| self.shard(i).len()).sum()
    }
}

#[derive(Debug)]
pub struct BufferPool {
    size: usize,
    spares: SpareList<BytesMut>,
    /// Buffers the event loops keep in front of the pool ([`LoopBuffers`]), for [`spare`]. A
    /// loop ends with the runtime; one whose reactor failed leaves its count here (a
    /// diagnostic's overcount: nothing allocates by it).
    ///
    /// [`spare`]: BufferPool::spare
    in_loops: AtomicUsize,
}

impl BufferPool {
    /// A pool of empty buffers of `size` bytes of capacity.
    pub fn new(size: usize) -> Self {
        BufferPool {
            size,
            spares: SpareList::default(),
            in_loops: AtomicUsize::new(0),
        }
    }

    /// An empty buffer with at least `size` bytes of capacity.
    pub fn take(&self) -> BytesMut {
        self.spares.pop().unwrap_or_else(|| BytesMut::with_capacity(self.size))
    }

    /// Spare buffers held for the next taker, over all shards and the event loops' own.
    pub fn spare(&self) -> usize {
        self.spares.len() + self.in_loops.load(Ordering::Relaxed)
    }

    /// Whether `buf` is worth keeping for another taker, made whole again if so. Buffers that
    /// grew for a large message (or are too small) go back to the allocator instead, so no
    /// spare list hoards big ones.
    fn reusable(&self, buf: &mut BytesMut) -> bool {
        if !buf.is_empty() || buf.capacity() > 2 * self.size {
            return false;
        }
        // Consumed bytes at the front still count against the allocation: an empty, unshared
        // buffer gets them back here without allocating.
        buf.reserve(self.size);
        buf.capacity() <= 2 * self.size
    }

    /// Returns an empty buffer (see [`BufferPool::reusable`]).
    pub fn give(&self, mut buf: BytesMut) {
        if self.reusable(&mut buf) {
            self.spares.push(buf);
        }
    }
}

/// An event loop's own spare buffers, in front of its pool: the loop lends one to each
/// transaction that starts from idle and takes it back when the client is idle again, and a
/// round trip through the pool's mutex each way cost ~130 instructions of a ~5,000-instruction
/// `pgbench -S` transaction. Last in, first out, so the buffer lent is the warm one.
#[derive(Debug, Default)]
pub struct LoopBuffers(Vec<BytesMut>);

impl LoopBuffers {
    /// As many as a shard of the pool keeps.
    const MAX: usize = KEEP_PER_SHARD;

    /// An empty buffer of at least the pool's size.
    pub fn take(&mut self, pool: &BufferPool) -> BytesMut {
        match self.0.pop() {
            Some(buf) => {
                pool.in_loops.fetch_sub(1, Ordering::Relaxed);
                buf
            }
            None => pool.take(),
        }
    }

    /// Takes a session's read buffer back when it is idle (empty) and holds one, leaving it
    /// none; a buffer with bytes still to frame stays.
    pub fn take_back(&mut self, pool: &BufferPool, buf: &mut BytesMut) {
        if buf.is_empty() && buf.capacity() > 0 {
            self.give(pool, std::mem::take(buf));
        }
    }

    /// Keeps an empty buffer for this loop's next taker; past [`LoopBuffers::MAX`] it goes to
    /// the pool. `pool` must be the one the buffer came from (its size rules).
    #[inline]
    pub fn give(&mut self, pool: &BufferPool, mut buf: BytesMut) {
        if self.0.len() >= Self::MAX {
            return pool.give(buf);
        }
        if pool.reusable(&mut buf) {
            self.0.push(buf);
            pool.in_loops.fetch_add(1, Ordering::Relaxed);
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
        let kept = pool.spares.shard(shard()).len();
        assert_eq!(kept, KEEP_PER_SHARD);
    }

    #[test]
    fn a_loop_keeps_its_own_buffers_and_the_pool_counts_them() {
        let pool = BufferPool::new(1024);
        let mut own = LoopBuffers::default();
        let a = own.take(&pool);
        let ptr = a.as_ptr();
        own.give(&pool, a);
        assert_eq!(pool.spare(), 1, "a loop's spare counts as spare");
        assert_eq!(pool.spares.shard(shard()).len(), 0, "kept by the loop");
        let b = own.take(&pool);
        assert_eq!(b.as_ptr(), ptr, "the last one given is lent again");
        assert_eq!(pool.spare(), 0);
        // A session's buffer comes back only when it is empty, and one it lacks is not made.
        let mut held = b;
        held.extend_from_slice(b"Q");
        own.take_back(&pool, &mut held);
        assert_eq!((held.len(), pool.spare()), (1, 0), "bytes still to frame stay");
        held.clear();
        own.take_back(&pool, &mut held);
        assert_eq!((held.capacity(), pool.spare()), (0, 1));
        own.take_back(&pool, &mut held);
        assert_eq!(pool.spare(), 1, "no buffer, nothing given");
        let b = own.take(&pool);
        // What the pool would not keep, the loop does not keep either.
        let mut full = b;
        full.extend_from_slice(b"x");
        own.give(&pool, full);
        own.give(&pool, BytesMut::with_capacity(1 << 20));
        assert_eq!(pool.spare(), 0);
        // Past its bound, the rest go to the pool.
        for _ in 0..LoopBuffers::MAX + 3 {
            own.give(&pool, BytesMut::with_capacity(1024));
        }
        assert_eq!(own.0.len(), LoopBuffers::MAX);
        assert_eq!(pool.spare(), LoopBuffers::MAX + 3);
    }
}
