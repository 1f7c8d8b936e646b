//! Dot products for the vector index, with AVX2 kernels chosen at run time.
//!
//! A similarity is computed for every node a search visits, so its cost is most of a
//! search's compute. The portable versions below are what any target gets; on x86-64
//! processors with AVX2 and FMA (almost every one since 2013) the same sums run in
//! 256-bit registers, about five times faster for byte codes. The processor is asked
//! once (the answer is cached) and the kernels are compiled for AVX2 through [pulp], so
//! the crate itself holds no `unsafe` code.

/// The dot product of two `f32` slices (of equal length; a longer one's tail is
/// ignored).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = pulp::x86::V3::try_new() {
        return x86::dot_f32(simd, a, b);
    }
    dot_portable(a, b)
}

/// The integer dot product of two byte codes whose components lie in `-127..=127`
/// (as [`code_of`](super) makes them; `-128` is never produced).
pub(crate) fn dot_codes(a: &[i8], b: &[i8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = pulp::x86::V3::try_new() {
        return x86::dot_i8::<false>(simd, a, b).0;
    }
    dot_codes_portable(a, b)
}

/// `(q · c, c · c)` of two byte codes in `-127..=127`: the walk scores a node by the
/// cosine of the codes, so it needs no per-node scale (one memory access less a node).
pub(crate) fn dot_codes_and_norm(q: &[i8], c: &[i8]) -> (i32, i32) {
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = pulp::x86::V3::try_new() {
        return x86::dot_i8::<true>(simd, q, c);
    }
    (dot_codes_portable(q, c), dot_codes_portable(c, c))
}

/// The dot product in eight lanes, which compilers vectorise for the target's baseline.
pub(crate) fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// The integer dot product in sixteen lanes.
pub(crate) fn dot_codes_portable(a: &[i8], b: &[i8]) -> i32 {
    let mut acc = [0i32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += i32::from(x[i]) * i32::from(y[i]);
        }
    }
    acc.iter().sum::<i32>() + tail_i8(ra, rb)
}

fn tail_i8(a: &[i8], b: &[i8]) -> i32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| i32::from(*x) * i32::from(*y))
        .sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::{__m256, __m256i};

    use pulp::bytemuck::cast;
    use pulp::x86::V3;

    /// Eight-lane fused multiply-adds, two accumulators deep.
    pub(super) fn dot_f32(simd: V3, a: &[f32], b: &[f32]) -> f32 {
        simd.vectorize(
            #[inline(always)]
            || {
                let n = a.len().min(b.len());
                let (a, b) = (&a[..n], &b[..n]);
                let (xa, ra) = pulp::as_arrays::<16, f32>(a);
                let (xb, rb) = pulp::as_arrays::<16, f32>(b);
                let mut acc0 = simd.avx._mm256_setzero_ps();
                let mut acc1 = simd.avx._mm256_setzero_ps();
                for (x, y) in xa.iter().zip(xb) {
                    let [x0, x1]: [__m256; 2] = cast(*x);
                    let [y0, y1]: [__m256; 2] = cast(*y);
                    acc0 = simd.fma._mm256_fmadd_ps(x0, y0, acc0);
                    acc1 = simd.fma._mm256_fmadd_ps(x1, y1, acc1);
                }
                let lanes: [f32; 8] = cast(simd.avx._mm256_add_ps(acc0, acc1));
                let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
                lanes.iter().sum::<f32>() + tail
            },
        )
    }

    /// `q · c`, and `c · c` when `NORM` (else 0), in one pass. Bytes are multiplied in
    /// pairs into 16-bit sums (`maddubs` takes one side unsigned, so `|q|` and `c`
    /// with `q`'s sign; `|c|` and `|c|` for the norm), widened into 32-bit lanes. A
    /// pair sums to at most 2 · 127 · 127, inside 16 bits, for components in
    /// `-127..=127`.
    pub(super) fn dot_i8<const NORM: bool>(simd: V3, q: &[i8], c: &[i8]) -> (i32, i32) {
        simd.vectorize(
            #[inline(always)]
            || {
                let n = q.len().min(c.len());
                let (q, c) = (&q[..n], &c[..n]);
                let (xq, rq) = pulp::as_arrays::<32, i8>(q);
                let (xc, rc) = pulp::as_arrays::<32, i8>(c);
                let ones = simd.avx._mm256_set1_epi16(1);
                let mut dot = simd.avx._mm256_setzero_si256();
                let mut norm = simd.avx._mm256_setzero_si256();
                for (x, y) in xq.iter().zip(xc) {
                    let x: __m256i = cast(*x);
                    let y: __m256i = cast(*y);
                    let ax = simd.avx2._mm256_sign_epi8(x, x);
                    let sy = simd.avx2._mm256_sign_epi8(y, x);
                    let pairs = simd.avx2._mm256_maddubs_epi16(ax, sy);
                    dot = simd
                        .avx2
                        ._mm256_add_epi32(dot, simd.avx2._mm256_madd_epi16(pairs, ones));
                    if NORM {
                        let ay = simd.avx2._mm256_sign_epi8(y, y);
                        let squares = simd.avx2._mm256_maddubs_epi16(ay, ay);
                        norm = simd
                            .avx2
                            ._mm256_add_epi32(norm, simd.avx2._mm256_madd_epi16(squares, ones));
                    }
                }
                let (d, m): ([i32; 8], [i32; 8]) = (cast(dot), cast(norm));
                let d = d.iter().sum::<i32>() + super::tail_i8(rq, rc);
                if NORM {
                    (d, m.iter().sum::<i32>() + super::tail_i8(rc, rc))
                } else {
                    (d, 0)
                }
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    #[test]
    fn kernels_agree_with_the_portable_sums_at_every_length() {
        let mut seed = 11;
        for len in [
            0usize, 1, 7, 15, 16, 17, 31, 32, 33, 63, 100, 384, 385, 1536,
        ] {
            let a: Vec<i8> = (0..len)
                .map(|_| ((lcg(&mut seed) % 255) as i32 - 127) as i8)
                .collect();
            let b: Vec<i8> = (0..len)
                .map(|_| ((lcg(&mut seed) % 255) as i32 - 127) as i8)
                .collect();
            assert_eq!(dot_codes(&a, &b), dot_codes_portable(&a, &b), "len {len}");
            assert_eq!(
                dot_codes_and_norm(&a, &b),
                (dot_codes_portable(&a, &b), dot_codes_portable(&b, &b)),
                "len {len}"
            );
            let extremes = vec![127i8; len];
            let negative = vec![-127i8; len];
            assert_eq!(dot_codes(&extremes, &extremes), 127 * 127 * len as i32);
            assert_eq!(dot_codes(&extremes, &negative), -127 * 127 * (len as i32));
            let x: Vec<f32> = (0..len)
                .map(|_| lcg(&mut seed) as f32 / u32::MAX as f32 - 0.25)
                .collect();
            let y: Vec<f32> = (0..len)
                .map(|_| lcg(&mut seed) as f32 / u32::MAX as f32 - 0.25)
                .collect();
            let (fast, plain) = (dot(&x, &y), dot_portable(&x, &y));
            assert!(
                (fast - plain).abs() <= 1e-4 * (1.0 + plain.abs()),
                "len {len}: {fast} vs {plain}"
            );
        }
    }

    #[test]
    fn unequal_lengths_use_the_shorter() {
        assert_eq!(dot_codes(&[1, 2, 3], &[4, 5]), 14);
        assert_eq!(dot(&[1.0, 2.0, 3.0], &[4.0, 5.0]), 14.0);
    }
}
