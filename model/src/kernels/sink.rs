//! Attention's softmax, vectorised with one set of bits on every CPU.
//!
//! A score costs the attention a few dozen flops, so a libm `expf` call and
//! two serial chains (the running max, the running sum) per score would
//! take most of its time. Here the exponential is our own: range reduction
//! to `|r| ≤ ln2/2`, a degree-7 Taylor polynomial in fused multiply-adds
//! (under 2 ulp), and scaling by `2^n` in two exact steps, so every
//! operation is exactly rounded IEEE arithmetic and the AVX-512, AVX2 and
//! portable builds of the same code give the same bits. The sum is taken in
//! the canonical order of ADR 0001 (16 strided lanes, then the fixed tree).

use super::{LANES, reduce};

/// `l[j] ← e_j / (Σ_j e_j + exp(sink − m))` with `e_j = exp(scale·l[j] − m)`
/// and `m` the largest of `sink` and every `scale·l[j]`: one attention
/// head's weights over its keys, with its sink logit in the denominator.
pub fn softmax_with_sink(l: &mut [f32], scale: f32, sink: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { softmax_avx512(l, scale, sink) };
        }
        if super::avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { softmax_avx2(l, scale, sink) };
        }
    }
    softmax_generic(l, scale, sink)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn softmax_avx512(l: &mut [f32], scale: f32, sink: f32) {
    softmax_generic(l, scale, sink)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn softmax_avx2(l: &mut [f32], scale: f32, sink: f32) {
    softmax_generic(l, scale, sink)
}

#[inline(always)]
fn softmax_generic(l: &mut [f32], scale: f32, sink: f32) {
    // The max does not depend on the order it is taken in.
    let mut top = [sink; LANES];
    let mut chunks = l.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (t, v) in top.iter_mut().zip(chunk.iter_mut()) {
            *v *= scale;
            *t = t.max(*v);
        }
    }
    for (t, v) in top.iter_mut().zip(chunks.into_remainder()) {
        *v *= scale;
        *t = t.max(*v);
    }
    let max = top.into_iter().fold(sink, f32::max);
    let mut sum = [0.0f32; LANES];
    let mut chunks = l.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (s, v) in sum.iter_mut().zip(chunk.iter_mut()) {
            *v = exp(*v - max);
            *s += *v;
        }
    }
    for (s, v) in sum.iter_mut().zip(chunks.into_remainder()) {
        *v = exp(*v - max);
        *s += *v;
    }
    let denom = reduce(sum) + exp(sink - max);
    l.iter_mut().for_each(|v| *v /= denom);
}

/// [`exp`]'s constants, for copies of it elsewhere (the CUDA experts):
/// ln 2 in two parts, the first with trailing zero bits so `n·ln2` is
/// exact for every `n` used; the clamp of `x`, past which the result is 0
/// or infinite anyway (it keeps `n` in range); the Taylor coefficients,
/// highest degree (7) first.
pub const EXP_LN2: [f32; 2] = [0.693_145_75, 1.428_606_8e-6];
pub const EXP_CLAMP: [f32; 2] = [-104.0, 88.8];
pub const EXP_TAYLOR: [f32; 8] = [1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];

/// `e^x`, within 2 ulp; NaN stays NaN, `x > 88.8` is infinite, very
/// negative `x` gives 0 (through the subnormals, rounded once).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    let x = x.clamp(EXP_CLAMP[0], EXP_CLAMP[1]);
    let n = (x * LOG2_E).round_ties_even();
    let r = n.mul_add(-EXP_LN2[1], n.mul_add(-EXP_LN2[0], x));
    let mut p = EXP_TAYLOR[0];
    for c in &EXP_TAYLOR[1..] {
        p = p.mul_add(r, *c);
    }
    // 2^n as two normal powers of two (n is in -150..=129): the first
    // product is exact, the second rounds once, into the subnormals or to
    // infinity where the result lies there.
    let n = n as i32;
    let (a, b) = (n >> 1, n - (n >> 1));
    p * f32::from_bits(((a + 127) as u32) << 23) * f32::from_bits(((b + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_the_exact_value() {
        let mut worst = 0.0f64;
        for i in 0..200_000 {
            let x = -104.0 + i as f32 * (104.0 + 88.7) / 200_000.0;
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            // Ulps at the result's size (normal results only).
            if want > f32::MIN_POSITIVE as f64 {
                let ulp = (want as f32).to_bits();
                let ulp = f32::from_bits(ulp + 1) as f64 - want as f32 as f64;
                worst = worst.max((got - want).abs() / ulp);
            } else {
                assert!((got - want).abs() <= f32::MIN_POSITIVE as f64 * 2f64.powi(-22), "x {x}");
            }
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn with_sink_is_a_softmax_and_variants_agree() {
        for n in [0, 1, 5, 16, 37, 300] {
            let logits: Vec<f32> = (0..n).map(|i| ((i * 7919) % 23) as f32 * 0.37 - 4.0).collect();
            let mut w = logits.clone();
            softmax_with_sink(&mut w, 0.5, 1.0);
            let max = logits.iter().map(|l| l * 0.5).fold(1.0f32, f32::max) as f64;
            let denom: f64 = logits.iter().map(|&l| (l as f64 * 0.5 - max).exp()).sum::<f64>() + (1.0 - max).exp();
            for (got, l) in w.iter().zip(&logits) {
                assert!((*got as f64 - (*l as f64 * 0.5 - max).exp() / denom).abs() < 1e-6, "n {n}");
            }
            let mut portable = logits.clone();
            softmax_generic(&mut portable, 0.5, 1.0);
            assert_eq!(
                w.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                portable.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            #[cfg(target_arch = "x86_64")]
            if crate::kernels::avx2() {
                let mut avx2 = logits.clone();
                // SAFETY: AVX2 and FMA checked just above.
                unsafe { softmax_avx2(&mut avx2, 0.5, 1.0) };
                assert_eq!(
                    avx2.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    portable.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
            }
        }
    }
}
