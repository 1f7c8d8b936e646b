//! Large read-mostly arrays of the vector index, in memory backed by huge pages where
//! the kernel offers them, and cache-line prefetching for the graph walk.
//!
//! A search at scale visits a few thousand nodes spread over hundreds of megabytes. With
//! 4 KiB pages nearly every visit also misses the TLB and walks the page tables (twice
//! over in a virtual machine); with 2 MiB pages the whole index fits the TLB. Measured
//! on a 2-core VM: a visit to a random node of a 1M-node code array costs about half as
//! much with huge pages.

use bytemuck::Pod;
use memmap2::MmapMut;

/// Arrays at least this large ask for huge pages; smaller ones are plain vectors.
const HUGE_FROM: usize = 4 << 20;

/// A fixed-length array of `T`, zeroed on creation.
pub(crate) enum Pages<T> {
    Vec(Vec<T>),
    /// An anonymous mapping advised `MADV_HUGEPAGE` (Linux's transparent huge pages
    /// in `madvise` mode, the default of most distributions, serve only such memory).
    Map(MmapMut),
}

impl<T: Pod> Pages<T> {
    /// `len` zeroed elements.
    pub(crate) fn zeroed(len: usize) -> Self {
        let bytes = len.saturating_mul(size_of::<T>());
        if bytes >= HUGE_FROM && size_of::<T>() > 0 {
            if let Ok(map) = MmapMut::map_anon(bytes) {
                #[cfg(target_os = "linux")]
                {
                    // Advice only: without huge pages the mapping works the same.
                    let _ = map.advise(memmap2::Advice::HugePage);
                }
                // The mapping is page-aligned and `bytes` a multiple of `T`'s size,
                // so it casts to `[T]`; if it ever did not, fall back to a vector.
                if bytemuck::try_cast_slice::<u8, T>(&map[..]).is_ok() {
                    return Pages::Map(map);
                }
            }
        }
        Pages::Vec(vec![T::zeroed(); len])
    }

    /// A copy of `items` (a large one in its own mapping, given back to the system
    /// as soon as it is dropped).
    pub(crate) fn from_slice(items: &[T]) -> Self {
        let mut pages = Pages::zeroed(items.len());
        pages.as_mut_slice().copy_from_slice(items);
        pages
    }

    pub(crate) fn as_slice(&self) -> &[T] {
        match self {
            Pages::Vec(v) => v,
            Pages::Map(map) => bytemuck::try_cast_slice(&map[..]).unwrap_or_default(),
        }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [T] {
        match self {
            Pages::Vec(v) => v,
            Pages::Map(map) => bytemuck::try_cast_slice_mut(&mut map[..]).unwrap_or_default(),
        }
    }
}

/// Brings the cache lines of a slice in ahead of its use, so that the loads of many
/// nodes overlap instead of each waiting for memory in turn: a prefetch instruction on
/// x86-64, elsewhere a read of one byte per line.
#[derive(Clone, Copy)]
pub(crate) struct Fetch {
    #[cfg(target_arch = "x86_64")]
    simd: Option<pulp::x86::V3>,
}

impl Fetch {
    pub(crate) fn new() -> Self {
        Fetch {
            #[cfg(target_arch = "x86_64")]
            simd: pulp::x86::V3::try_new(),
        }
    }

    /// Asks for every line of `v`. The result (reads made, if any) must reach
    /// [`std::hint::black_box`] so that they are not optimised away.
    #[inline]
    pub(crate) fn lines<T: Pod>(&self, v: &[T]) -> u32 {
        let bytes: &[u8] = bytemuck::cast_slice(v);
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = self.simd {
            use core::arch::x86_64::_MM_HINT_T0;
            for line in bytes.chunks(64) {
                simd.sse._mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast());
            }
            if let Some(last) = bytes.last() {
                simd.sse
                    ._mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(last).cast());
            }
            return 0;
        }
        bytes
            .iter()
            .step_by(64)
            .chain(bytes.last())
            .fold(0, |a, b| a ^ u32::from(*b))
    }
}

impl Fetch {
    /// Asks for the first three cache lines of `v` (a link list), whatever its type.
    /// Returns 0; on targets without a prefetch instruction it does nothing.
    #[inline]
    pub(crate) fn head<T>(&self, v: &[T]) -> u32 {
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = self.simd {
            use core::arch::x86_64::_MM_HINT_T0;
            let bytes = size_of_val(v);
            let p = v.as_ptr().cast::<i8>();
            for at in (0..bytes.min(192)).step_by(64) {
                // A prefetch of any address is safe; this one is inside `v`.
                simd.sse._mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(at));
            }
        }
        let _ = v;
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_arrays_are_vectors_large_ones_mappings_and_both_hold_their_values() {
        let small = Pages::<u32>::from_slice(&[1, 2, 3]);
        assert!(matches!(small, Pages::Vec(_)));
        assert_eq!(small.as_slice(), &[1, 2, 3]);
        let n = (HUGE_FROM / 4) + 5;
        let items: Vec<u32> = (0..n as u32).collect();
        let mut large = Pages::from_slice(&items);
        #[cfg(target_os = "linux")]
        assert!(matches!(large, Pages::Map(_)));
        assert_eq!(large.as_slice().len(), n);
        assert_eq!(large.as_slice(), &items[..]);
        large.as_mut_slice()[n - 1] = 7;
        assert_eq!(large.as_slice()[n - 1], 7);
        let zero = Pages::<f32>::zeroed(HUGE_FROM);
        assert!(zero.as_slice().iter().all(|x| *x == 0.0));
        assert!(Pages::<i8>::zeroed(0).as_slice().is_empty());
    }

    #[test]
    fn fetching_reads_nothing_wrong() {
        let f = Fetch::new();
        let v: Vec<i8> = (0..1000).map(|i| (i % 100) as i8).collect();
        std::hint::black_box(f.lines(&v));
        std::hint::black_box(f.lines::<i8>(&[]));
        std::hint::black_box(f.lines(&[1.0f32]));
        std::hint::black_box(f.head(&[std::sync::atomic::AtomicU32::new(1)]));
        std::hint::black_box(f.head::<u8>(&[]));
    }
}
