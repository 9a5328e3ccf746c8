//! Emulated global memory: a list of allocations with far-apart bases.
//!
//! Invariant: allocation `i` lives at `(i + 1) << 36` and is at most 2^36
//! bytes, so an address names its allocation by its top bits (O(1) lookup)
//! and a wild pointer (a length used as an address, an offset gone negative)
//! lands in no allocation and is reported. Host-side misuse of the API (a
//! download outside an allocation) panics, like a failed `cudaMemcpy` would
//! abort a test; device-side misuse is an [`super::EmuError`].

use half::{bf16, f16};

const SHIFT: u32 = 36;
const OFF_MASK: u64 = (1 << SHIFT) - 1;

/// Emulated device (global) memory.
#[derive(Clone, Debug)]
pub struct Device {
    allocs: Vec<Vec<u8>>,
    pub(crate) step_limit: u64,
}

impl Default for Device {
    fn default() -> Self {
        Device::new()
    }
}

/// Where an out-of-bounds access fell, for the error message.
pub(crate) fn describe_nearest(dev: &Device, addr: u64) -> String {
    if dev.allocs.is_empty() {
        return "no allocations exist".to_string();
    }
    let idx = (addr >> SHIFT) as usize;
    // The allocation whose range is closest to addr.
    let nearest = if idx >= 1 && idx <= dev.allocs.len() {
        idx - 1
    } else if idx == 0 {
        0
    } else {
        dev.allocs.len() - 1
    };
    let base = Device::base(nearest);
    let end = base + dev.allocs[nearest].len() as u64;
    let rel = if addr >= end {
        format!("{} bytes past its end", addr - end)
    } else if addr < base {
        format!("{} bytes before its start", base - addr)
    } else {
        format!("at offset {}", addr - base)
    };
    format!("nearest allocation #{nearest} [{base:#x}, {end:#x}) ({} bytes), {rel}", end - base)
}

impl Device {
    pub fn new() -> Device {
        Device { allocs: Vec::new(), step_limit: 1 << 34 }
    }

    /// Thread-instructions one launch may execute before it fails with
    /// `StepLimit` (default 2^34).
    pub fn set_step_limit(&mut self, n: u64) {
        self.step_limit = n;
    }

    fn base(i: usize) -> u64 {
        (i as u64 + 1) << SHIFT
    }

    fn push(&mut self, data: Vec<u8>) -> u64 {
        assert!((data.len() as u64) < (1 << SHIFT), "allocation of {} bytes is too large", data.len());
        self.allocs.push(data);
        Device::base(self.allocs.len() - 1)
    }

    /// An allocation filled with 0xFF (NaN as f32/bf16/f16): elements a
    /// kernel forgets to write stand out.
    pub fn alloc_poisoned(&mut self, bytes: usize) -> u64 {
        self.push(vec![0xFF; bytes])
    }

    pub fn alloc_zeroed(&mut self, bytes: usize) -> u64 {
        self.push(vec![0; bytes])
    }

    pub fn upload(&mut self, bytes: &[u8]) -> u64 {
        self.push(bytes.to_vec())
    }

    pub fn upload_f32(&mut self, v: &[f32]) -> u64 {
        self.push(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    pub fn upload_bf16(&mut self, v: &[bf16]) -> u64 {
        self.push(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    pub fn upload_f16(&mut self, v: &[f16]) -> u64 {
        self.push(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    pub fn upload_u32(&mut self, v: &[u32]) -> u64 {
        self.push(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    pub fn upload_i32(&mut self, v: &[i32]) -> u64 {
        self.push(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    /// Releases an allocation's bytes (its address range stays reserved, so a
    /// stale pointer is reported as out of bounds, never aliased). Freeing a
    /// pointer that is not an allocation's base does nothing.
    pub fn free(&mut self, ptr: u64) {
        let idx = (ptr >> SHIFT) as usize;
        if ptr & OFF_MASK == 0 && idx >= 1 && idx <= self.allocs.len() {
            self.allocs[idx - 1] = Vec::new();
        }
    }

    /// Whether `[ptr, ptr + bytes)` lies inside one allocation.
    pub fn contains(&self, ptr: u64, bytes: usize) -> bool {
        self.locate(ptr, bytes).is_some()
    }

    /// Number of bytes in the allocation `ptr` points into (from its base).
    pub fn alloc_len(&self, ptr: u64) -> Option<usize> {
        let idx = (ptr >> SHIFT) as usize;
        (idx >= 1 && idx <= self.allocs.len()).then(|| self.allocs[idx - 1].len())
    }

    /// The allocation index and offset of `[addr, addr + bytes)`, if it lies
    /// inside one allocation.
    #[inline]
    pub(crate) fn locate(&self, addr: u64, bytes: usize) -> Option<(usize, usize)> {
        let idx = (addr >> SHIFT) as usize;
        let off = (addr & OFF_MASK) as usize;
        let a = self.allocs.get(idx.wrapping_sub(1))?;
        (off + bytes <= a.len()).then_some((idx - 1, off))
    }

    #[inline]
    pub(crate) fn slice(&self, addr: u64, bytes: usize) -> Option<&[u8]> {
        let (i, o) = self.locate(addr, bytes)?;
        Some(&self.allocs[i][o..o + bytes])
    }

    #[inline]
    pub(crate) fn slice_mut(&mut self, addr: u64, bytes: usize) -> Option<&mut [u8]> {
        let (i, o) = self.locate(addr, bytes)?;
        Some(&mut self.allocs[i][o..o + bytes])
    }

    /// Whether `ptr` points into (or one past the end of) an allocation.
    pub(crate) fn valid_ptr(&self, ptr: u64) -> bool {
        self.alloc_len(ptr).is_some_and(|len| (ptr & OFF_MASK) as usize <= len)
    }

    fn host_range(&self, ptr: u64, bytes: usize) -> &[u8] {
        self.slice(ptr, bytes)
            .unwrap_or_else(|| panic!("host access of {bytes} bytes at {ptr:#x}: {}", describe_nearest(self, ptr)))
    }

    /// Overwrites bytes of an existing allocation (reuse across launches).
    /// Panics if the range is not inside one allocation.
    pub fn write(&mut self, ptr: u64, bytes: &[u8]) {
        let msg = self.slice(ptr, bytes.len()).is_none().then(|| describe_nearest(self, ptr));
        if let Some(m) = msg {
            panic!("host write of {} bytes at {ptr:#x}: {m}", bytes.len());
        }
        self.slice_mut(ptr, bytes.len()).unwrap().copy_from_slice(bytes);
    }

    pub fn write_f32(&mut self, ptr: u64, v: &[f32]) {
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.write(ptr, &b);
    }

    /// Fills an existing range with 0xFF again (re-poison before a rerun).
    pub fn poison(&mut self, ptr: u64, bytes: usize) {
        self.write(ptr, &vec![0xFF; bytes]);
    }

    /// Copies `bytes` bytes out. Panics if the range is not inside one allocation.
    pub fn download(&self, ptr: u64, bytes: usize) -> Vec<u8> {
        self.host_range(ptr, bytes).to_vec()
    }

    pub fn download_f32(&self, ptr: u64, n: usize) -> Vec<f32> {
        self.host_range(ptr, n * 4).chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    pub fn download_bf16(&self, ptr: u64, n: usize) -> Vec<bf16> {
        self.host_range(ptr, n * 2).chunks_exact(2).map(|c| bf16::from_le_bytes(c.try_into().unwrap())).collect()
    }

    pub fn download_f16(&self, ptr: u64, n: usize) -> Vec<f16> {
        self.host_range(ptr, n * 2).chunks_exact(2).map(|c| f16::from_le_bytes(c.try_into().unwrap())).collect()
    }

    pub fn download_u32(&self, ptr: u64, n: usize) -> Vec<u32> {
        self.host_range(ptr, n * 4).chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    pub fn download_i32(&self, ptr: u64, n: usize) -> Vec<i32> {
        self.host_range(ptr, n * 4).chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect()
    }
}
