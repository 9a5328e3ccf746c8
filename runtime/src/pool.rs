//! Recycled f32 buffers for the CPU executor ([`crate::cpu`]).
//!
//! Why: the executor gives almost every op a new output buffer and frees
//! values after their last reader. A buffer at or above glibc's mmap
//! threshold (which adapts up to 32 MiB; a 448-pixel vision layer's
//! 1024×8192 MLP activations are 32 MiB) comes from `mmap` and goes back
//! with `munmap`, so every op page-faults its output in and the kernel
//! zeroes the fresh pages; a smaller one is recycled by `malloc` but still
//! zero-filled by `vec![0; n]`. Here a freed buffer goes into one
//! process-wide pool and the next op of about the same size takes it back,
//! already mapped.
//!
//! A taken buffer holds stale data: every caller overwrites all of it (see
//! the call sites in `cpu.rs`), so nothing is zeroed. Under `cfg(test)` a
//! taken buffer is filled with NaN instead, so a caller that leaves an
//! element unwritten shows up in the unit tests.
//!
//! Bounds: at most [`MAX_BUFS`] buffers and [`MAX_BYTES`] bytes stay pooled
//! (the oldest are freed first), buffers under [`MIN_LEN`] elements are left
//! to `malloc`, and a request takes the smallest buffer that fits and is at
//! most twice its size (a small value must not pin a large buffer a later
//! large op needs). The
//! pool is one `Mutex`: only the thread that runs a graph takes and returns
//! buffers (the kernels' rayon tasks never do), once per op, so the lock is
//! uncontended unless several graphs run at once, and it persists across
//! runs (decode runs one graph per token).

use std::sync::{Arc, Mutex};

/// Buffers shorter than this (in f32) are not pooled.
pub(crate) const MIN_LEN: usize = 64;
/// The most buffers kept.
pub(crate) const MAX_BUFS: usize = 256;
/// The most bytes kept (capacities, not lengths).
pub(crate) const MAX_BYTES: usize = 1 << 30;

/// Free buffers, oldest first.
pub(crate) struct Pool {
    bufs: Vec<Vec<f32>>,
    bytes: usize,
    max_bufs: usize,
    max_bytes: usize,
}

impl Pool {
    pub(crate) const fn new(max_bufs: usize, max_bytes: usize) -> Self {
        Pool { bufs: Vec::new(), bytes: 0, max_bufs, max_bytes }
    }

    /// The smallest pooled buffer with room for `n` elements and at most
    /// twice that, resized to length `n` (stale contents; only the part past
    /// its old length, if any, is written).
    pub(crate) fn take(&mut self, n: usize) -> Option<Vec<f32>> {
        if n < MIN_LEN {
            return None;
        }
        let (i, _) = self
            .bufs
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= n && b.capacity() / 2 <= n)
            .min_by_key(|(_, b)| b.capacity())?;
        let mut v = self.bufs.remove(i);
        self.bytes -= bytes(&v);
        if v.len() >= n {
            v.truncate(n);
        } else {
            v.resize(n, 0.0);
        }
        Some(v)
    }

    /// Keep `v` for reuse; returns what no longer fits (`v` itself when it
    /// is too small or too large, else the oldest buffers), for the caller to
    /// free outside the lock.
    pub(crate) fn put(&mut self, v: Vec<f32>) -> Vec<Vec<f32>> {
        let b = bytes(&v);
        if v.len() < MIN_LEN || b > self.max_bytes || self.max_bufs == 0 {
            return vec![v];
        }
        let mut evicted = 0;
        while self.bufs.len() - evicted >= self.max_bufs || self.bytes + b > self.max_bytes {
            self.bytes -= bytes(&self.bufs[evicted]);
            evicted += 1;
        }
        let out = self.bufs.drain(..evicted).collect();
        self.bytes += b;
        self.bufs.push(v);
        out
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.bufs.len()
    }

    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

fn bytes(v: &Vec<f32>) -> usize {
    v.capacity() * std::mem::size_of::<f32>()
}

#[cfg(test)]
thread_local! {
    /// Buffers this thread took from the pool, for tests that check that
    /// recycling happened.
    pub(crate) static POOL_HITS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

static POOL: Mutex<Pool> = Mutex::new(Pool::new(MAX_BUFS, MAX_BYTES));

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    // A panic while the lock was held cannot leave the pool inconsistent
    // (its updates finish before anything can panic), so poisoning is ignored.
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A buffer of `n` f32 whose contents are unspecified (stale data of an
/// earlier op; NaN under `cfg(test)`): the caller must write every element.
pub(crate) fn take(n: usize) -> Vec<f32> {
    let taken = if n < MIN_LEN { None } else { pool().take(n) };
    #[cfg(test)]
    if taken.is_some() {
        POOL_HITS.with(|h| h.set(h.get() + 1));
    }
    #[allow(unused_mut)]
    let mut v = taken.unwrap_or_else(|| vec![0f32; n]);
    #[cfg(test)]
    v.fill(f32::NAN);
    v
}

/// A pooled buffer holding a copy of `src`.
pub(crate) fn copy_of(src: &[f32]) -> Vec<f32> {
    let mut v = take(src.len());
    v.copy_from_slice(src);
    v
}

/// Give `v` back for reuse.
pub(crate) fn recycle(v: Vec<f32>) {
    if v.len() < MIN_LEN {
        return;
    }
    let freed = pool().put(v);
    drop(freed);
}

/// A buffer that returns to the pool when dropped: the executor's values
/// hold one in an `Arc`, so the buffer is recycled when the last holder of
/// the value (the graph's last reader, or the end of the run) lets go.
pub(crate) struct Pooled(Vec<f32>);

impl Pooled {
    pub(crate) fn new(v: Vec<f32>) -> Arc<Pooled> {
        Arc::new(Pooled(v))
    }

    /// The buffer itself when `a` is its only holder, else a copy.
    pub(crate) fn into_vec(a: Arc<Pooled>) -> Vec<f32> {
        match Arc::try_unwrap(a) {
            Ok(mut p) => std::mem::take(&mut p.0),
            Err(a) => copy_of(&a.0),
        }
    }
}

impl std::ops::Deref for Pooled {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        recycle(std::mem::take(&mut self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_smallest_fit_within_twice_the_request() {
        let mut p = Pool::new(8, 1 << 20);
        for n in [4096, 2048, 10_000] {
            assert!(p.put(vec![1.0; n]).is_empty());
        }
        // 2048 fits 2000; 4096 is more than twice 2000.
        let v = p.take(2000).unwrap();
        assert_eq!((v.len(), v.capacity()), (2000, 2048));
        assert_eq!(p.take(5001).unwrap().capacity(), 10_000);
        // A small request does not pin the 4096 one.
        assert!(p.take(1500).is_none());
        // Longer than the buffer's length but within its capacity: resized.
        let mut w = p.take(4000).unwrap();
        assert_eq!((w.len(), w.capacity()), (4000, 4096));
        w.truncate(1024);
        assert!(p.put(w).is_empty());
        assert_eq!(p.take(3000).unwrap().len(), 3000);
        assert_eq!((p.len(), p.bytes()), (0, 0));
        assert!(p.take(100).is_none());
        // Too small to pool.
        assert_eq!(p.put(vec![0.0; MIN_LEN - 1]).len(), 1);
    }

    #[test]
    fn keeps_at_most_the_caps_dropping_the_oldest() {
        let mut p = Pool::new(3, 1 << 20);
        for i in 0..3 {
            assert!(p.put(vec![i as f32; 2000]).is_empty());
        }
        // A fourth buffer evicts the oldest (count cap).
        let out = p.put(vec![3.0; 2000]);
        assert_eq!(out.iter().map(|v| v[0]).collect::<Vec<_>>(), vec![0.0]);
        assert_eq!((p.len(), p.bytes()), (3, 3 * 4 * 2000));

        let mut p = Pool::new(10, 4 * 10_000);
        for i in 0..3 {
            assert!(p.put(vec![i as f32; 2000]).is_empty());
        }
        // 3 × 2000 + 7000 floats is over 10_000: the two oldest go (byte cap).
        let out = p.put(vec![3.0; 7000]);
        assert_eq!(out.iter().map(|v| v[0]).collect::<Vec<_>>(), vec![0.0, 1.0]);
        assert_eq!((p.len(), p.bytes()), (2, 4 * 9000));
        // Larger than the whole cap: not kept, nothing evicted.
        assert_eq!(p.put(vec![0.0; 20_000]).len(), 1);
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn a_taken_buffer_reuses_the_freed_allocation() {
        // The global pool is shared with concurrently running tests, so this
        // checks only what no other test can disturb: a length other tests
        // never use comes back as the very allocation that was freed.
        let n = 123_457;
        let v = take(n);
        let ptr = v.as_ptr();
        drop(Pooled::new(v));
        let w = take(n);
        assert_eq!((w.as_ptr(), w.len()), (ptr, n));
        assert!(w.iter().all(|x| x.is_nan()), "cfg(test) poisons taken buffers");
    }
}
