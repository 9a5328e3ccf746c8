//! Host buffers for weights that decode streams: backed by 2 MiB pages
//! where the OS allows it.
//!
//! Why: a decode step reads every weight once, gigabytes in 4 KiB pages,
//! so it takes a TLB miss every 4 KiB; in a virtual machine each miss is a
//! two-level (guest and host) page walk, and the walks stall the loads
//! behind them. Linux backs anonymous memory with transparent huge pages
//! either always or, as on many distributions and cloud images, only where
//! the program asks (`/sys/kernel/mm/transparent_hugepage/enabled` =
//! `madvise`). [`huge_vec`] asks (`madvise(MADV_HUGEPAGE)`) before the first
//! touch, so the page faults that fill the buffer already take huge pages.
//!
//! Advice only: where the kernel says no (other OSes, THP `never`, no free
//! 2 MiB pages) the buffer is an ordinary one and nothing else changes.
//! Weights borrowed from a file mapping (a bf16 checkpoint, an artifact)
//! stay in the page cache's pages; this serves the buffers qvc fills
//! itself (int4 words regrouped for the kernels, synthetic weights).

use rayon::prelude::*;

/// Bytes of a huge page on x86-64 Linux.
pub const HUGE_PAGE: usize = 2 << 20;

/// Buffers smaller than this are left to the allocator: they cost a handful
/// of TLB entries at most.
const MIN_ADVISED: usize = 4 * HUGE_PAGE;

/// A vector of `n` copies of `value`, its memory advised for huge pages
/// before it is first written (in parallel, in 1 MiB pieces).
pub fn huge_vec<T: Copy + Send + Sync>(n: usize, value: T) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    advise_huge(v.spare_capacity_mut());
    let piece = (1 << 20) / std::mem::size_of::<T>().max(1);
    v.spare_capacity_mut()[..n].par_chunks_mut(piece.max(1)).for_each(|c| {
        for x in c {
            x.write(value);
        }
    });
    // SAFETY: the capacity is at least n and its first n elements were all
    // written just above.
    unsafe { v.set_len(n) };
    v
}

/// Advise the whole 2 MiB-aligned pages inside `buf` for huge pages
/// (Linux; nothing elsewhere). Returns whether the kernel accepted it.
pub fn advise_huge<T>(buf: &mut [T]) -> bool {
    let (start, len) = (buf.as_mut_ptr() as usize, std::mem::size_of_val(buf));
    if len < MIN_ADVISED {
        return false;
    }
    let a = start.next_multiple_of(HUGE_PAGE);
    let b = (start + len) / HUGE_PAGE * HUGE_PAGE;
    if b <= a {
        return false;
    }
    madvise_huge(a, b - a)
}

#[cfg(target_os = "linux")]
fn madvise_huge(addr: usize, len: usize) -> bool {
    extern "C" {
        fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
    }
    /// `MADV_HUGEPAGE` in Linux's `asm-generic/mman-common.h` (every
    /// architecture).
    const MADV_HUGEPAGE: i32 = 14;
    // SAFETY: [addr, addr + len) lies inside one live allocation of ours
    // (page-aligned, whole pages); MADV_HUGEPAGE changes no contents.
    unsafe { madvise(addr as *mut std::ffi::c_void, len, MADV_HUGEPAGE) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn madvise_huge(_addr: usize, _len: usize) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_vec_holds_the_value_at_every_size() {
        for n in [0, 1, 7, (1 << 18) + 3, (MIN_ADVISED / 4) + 12_345] {
            let v = huge_vec(n, 0xA5A5_5A5Au32);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&x| x == 0xA5A5_5A5A), "n = {n}");
        }
    }

    #[test]
    fn small_buffers_are_not_advised() {
        let mut v = vec![0u8; HUGE_PAGE];
        assert!(!advise_huge(&mut v));
    }

    /// Where the kernel has THP in `always` or `madvise` mode, the advice is
    /// accepted (`madvise` returns 0); elsewhere the test only checks that
    /// asking does not fail loudly.
    #[cfg(target_os = "linux")]
    #[test]
    fn large_buffers_are_advised_where_thp_is_on() {
        let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
        let on = mode.contains("[always]") || mode.contains("[madvise]");
        let mut v: Vec<u8> = Vec::with_capacity(MIN_ADVISED + HUGE_PAGE);
        let ok = advise_huge(v.spare_capacity_mut());
        if on {
            assert!(ok, "madvise(MADV_HUGEPAGE) refused with THP mode {mode:?}");
        }
    }
}
