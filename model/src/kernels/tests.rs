use super::*;

pub(super) fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
    random_bits(n, seed).into_iter().map(|s| (s as f32 / u32::MAX as f32) - 0.5).collect()
}

fn random_bits(n: usize, seed: u32) -> Vec<u32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s
        })
        .collect()
}

#[test]
fn linear_matches_f64_reference() {
    let (rows, k, n) = (7, 37, 29);
    let x = pseudo_random(rows * k, 1);
    let w = pseudo_random(n * k, 2);
    let y = linear(&x, rows, &w, n);
    for r in 0..rows {
        for c in 0..n {
            let exact: f64 = (0..k).map(|i| x[r * k + i] as f64 * w[c * k + i] as f64).sum();
            assert!((y[r * n + c] as f64 - exact).abs() < 1e-5, "({r},{c})");
        }
    }
}

/// The property the exactness contract rests on: a row's result is the
/// same bits whether it is computed alone or inside any batch, tiled or
/// split across threads.
#[test]
fn linear_is_batch_invariant() {
    let (k, n) = (1000, 300);
    let w = pseudo_random(n * k, 3);
    let batch = pseudo_random(13 * k, 4);
    let together = linear(&batch, 13, &w, n);
    for r in 0..13 {
        let alone = linear(&batch[r * k..(r + 1) * k], 1, &w, n);
        assert_eq!(alone, together[r * n..(r + 1) * n], "row {r}");
        let pair = linear(&batch[r * k..(r + 1) * k].repeat(2), 2, &w, n);
        assert_eq!(alone, pair[..n], "row {r} in a pair");
    }
}

/// Every instruction-set variant must produce the same bits, on shapes
/// that hit full tiles, edge tiles and scalar tails.
#[test]
fn variants_agree() {
    for (rows, k, cols) in [(5, 203, 9), (8, 64, 8), (1, 16, 1), (3, 7, 2), (9, 1000, 13)] {
        let x = pseudo_random(rows * k, 5);
        let w = pseudo_random(cols * k, 6);
        assert_variants_agree(&x, rows, k, F32Rows { w: &w, k }, cols, &format!("f32 {rows}x{k}x{cols}"));
        assert_eq!(dot_generic(&x[..k], &w[..k]), dot(&x[..k], &w[..k]), "dot {k}");
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: AVX2 and FMA checked.
            assert_eq!(dot_generic(&x[..k], &w[..k]), unsafe { x86::dot_avx2(&x[..k], &w[..k]) });
        }
    }
}

/// The portable path, every SIMD path the CPU has, and (for stored
/// formats) the SIMD expansion give the same bits on weight rows `1..cols`.
fn assert_variants_agree<W: Source>(x: &[f32], rows: usize, k: usize, w: W, cols: usize, what: &str) {
    let out = |f: &dyn Fn(&mut [f32])| {
        let mut block = vec![0.0; rows * (cols - 1)];
        f(&mut block);
        block
    };
    let generic = out(&|b| tile_generic(x, rows, k, w, 1, cols, b));
    assert_eq!(generic, out(&|b| tile(x, rows, k, w, 1, cols, b)), "best ISA, {what}");
    let mut expanded = vec![0.0; (cols - 1) * k];
    expand(w, k, 1, cols, &mut expanded);
    let from_expanded = out(&|b| tile_generic(x, rows, k, F32Rows { w: &expanded, k }, 0, cols - 1, b));
    assert_eq!(generic, from_expanded, "expanded, {what}");
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2, FMA and F16C checked; shapes match.
        assert_eq!(generic, out(&|b| unsafe { x86::tile_avx2(x, rows, k, w, 1, cols, b) }), "avx2, {what}");
        let mut avx2_expanded = vec![0.0; (cols - 1) * k];
        // SAFETY: as above.
        unsafe { x86::expand_avx2(w, k, 1, cols, &mut avx2_expanded) };
        assert!(bits_equal(&expanded, &avx2_expanded), "avx2 expansion, {what}");
    }
}

fn bits_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Random stored matrices `[cols, k]` of every format, with every code
/// that can occur (NaN codes excluded, as the loader refuses them).
struct Stored {
    half: Vec<u8>,
    fp8: Vec<u8>,
    fp8_scales: Vec<f32>,
    fp4: Vec<u8>,
    fp4_scales: Vec<u8>,
}

fn stored(cols: usize, k: usize, seed: u32) -> Stored {
    let bits = random_bits(cols * k, seed);
    // Half floats: random mantissas and signs, exponents kept moderate.
    let half = bits.iter().flat_map(|&b| (((b >> 16) as u16 & 0x83FF) | 0x3800).to_le_bytes()).collect();
    let fp8 = bits.iter().map(|&b| if b as u8 & 0x7F == 0x7F { b as u8 & 0xF0 } else { b as u8 }).collect();
    let blocks = cols.div_ceil(128) * k.div_ceil(128);
    // F32 scales (the Base layout) and E8M0 powers of two from 2^-127 to
    // 2^7 (the largest the kernels take: FP8_KERNEL_SCALE_LIMIT).
    let fp8_scales = random_bits(blocks, seed + 1)
        .iter()
        .map(|&b| if b % 2 == 0 { 1.0 + (b % 1000) as f32 / 997.0 } else { 2f32.powi((b / 2 % 135) as i32 - 127) })
        .collect();
    let fp4 = bits[..cols * k / 2].iter().map(|&b| (b >> 8) as u8).collect();
    // Scale codes from the subnormal 2^-127 up to 2^32 (larger ones only overflow the sums).
    let fp4_scales = random_bits(cols * k / 32, seed + 2).iter().map(|&b| (b % 160) as u8).collect();
    Stored { half, fp8, fp8_scales, fp4, fp4_scales }
}

/// Every stored format: fused and expanded kernels agree with the
/// portable path on every ISA, including tails (k % 16 != 0), partial
/// 128-blocks, a block row picked by `first`, and E8M0 scales down to the
/// subnormal 2^-127.
#[test]
fn stored_formats_agree_across_variants() {
    for (rows, k, cols) in [(1, 320, 140), (5, 203, 9), (9, 1000, 13), (3, 64, 5), (2, 33, 3)] {
        let x = pseudo_random(rows * k, 7);
        let s = stored(cols, k, 8);
        let what = |f: &str| format!("{f} {rows}x{k}x{cols}");
        assert_variants_agree(&x, rows, k, Bf16Rows { bytes: &s.half, k }, cols, &what("bf16"));
        assert_variants_agree(&x, rows, k, F16Rows { bytes: &s.half, k }, cols, &what("f16"));
        for first in [0, 100] {
            let (codes, scales) = (&s.fp8[..], &s.fp8_scales[..]);
            let half = Fp8Rows { codes, scales, first, k, route: PhantomData::<ViaHalf> };
            assert_variants_agree(&x, rows, k, half, cols, &what(&format!("fp8 via F16 from {first}")));
            let bits = Fp8Rows { codes, scales, first, k, route: PhantomData::<ViaBits> };
            assert_variants_agree(&x, rows, k, bits, cols, &what(&format!("fp8 via bits from {first}")));
        }
        let half = Fp8Codes { codes: &s.fp8, k, route: PhantomData::<ViaHalf> };
        assert_variants_agree(&x, rows, k, half, cols, &what("fp8 codes via F16"));
        let bits = Fp8Codes { codes: &s.fp8, k, route: PhantomData::<ViaBits> };
        assert_variants_agree(&x, rows, k, bits, cols, &what("fp8 codes via bits"));
        if k % 32 == 0 {
            let fp4 = Fp4Rows { packed: &s.fp4, scales: &s.fp4_scales, k };
            assert_variants_agree(&x, rows, k, fp4, cols, &what("fp4"));
        }
    }
}

/// A stored matrix computes exactly what its values expanded to f32
/// (`Weights::expand`, the reference expansion) compute, one row or many,
/// in registers or expanded once per task of one run of inputs or several.
#[test]
fn stored_formats_compute_their_expanded_values() {
    let (k, n) = (320, 600);
    let s = stored(n, k, 9);
    let formats = [
        ("bf16", Weights::Half { bytes: &s.half, bf16: true }),
        ("f16", Weights::Half { bytes: &s.half, bf16: false }),
        ("fp8", Weights::Fp8 { codes: &s.fp8, scales: &s.fp8_scales, first: 0 }),
        ("fp4", Weights::Fp4 { packed: &s.fp4, scales: &s.fp4_scales }),
    ];
    let batch = pseudo_random(150 * k, 10);
    for (name, w) in formats {
        let mut values = Vec::new();
        w.expand(k, &mut values);
        assert!(values.iter().all(|v| v.is_finite()), "{name}");
        // 13 rows: tasks of one run and a share of the weight rows, more
        // than are expanded at a time; 150: tasks of several runs that
        // share one expansion (all of them on one thread).
        for (rows, threads) in [(13, 1), (13, 2), (150, 1), (150, 2)] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let what = format!("{name}, {rows} rows on {threads} threads");
            let batch = &batch[..rows * k];
            let together = pool.install(|| linear_with(batch, rows, w, n, k));
            assert_eq!(together, linear(batch, rows, &values, n), "{what}");
            for r in [0, 6, 12] {
                let alone = linear_with(&batch[r * k..(r + 1) * k], 1, w, n, k);
                assert_eq!(alone, together[r * n..(r + 1) * n], "{what}: row {r}");
            }
            // A group of rows as a matrix of its own.
            let group = pool.install(|| linear_with(batch, rows, w.rows(k, 130, 170), 40, k));
            assert_eq!(group, linear(batch, rows, &values[130 * k..170 * k], 40), "{what}: rows 130..170");
        }
    }
}

/// A task of few input rows moves block-FP8 scales onto its inputs where
/// that is exact, and keeps them on the weights where it is not: either
/// way, through either E4M3 route, each output is the bits the expanded
/// weights give. The inputs are powers of two, so only these block rows
/// need the scales kept on the weights: one whose scale pushes an input
/// out of f32's range (`2^121 / REBIAS · 2^7 · REBIAS`), and one of F32
/// scales `1 + 2^-23`, which make `q·s` inexact. (An input pushed into
/// f32's subnormals would also count as inexact, but its products are then
/// too small to change any sum.)
#[test]
fn fp8_scales_move_onto_inputs_only_when_exact() {
    fn check<R: Fp8Source>(route: &str) {
        let (k, n) = (300, 260);
        let s = stored(n, k, 11);
        let blocks = k.div_ceil(128);
        let mut scales: Vec<f32> = (0..s.fp8_scales.len()).map(|b| 2f32.powi(b as i32 % 7 - 4)).collect();
        scales[1] = 2f32.powi(7);
        scales[blocks..2 * blocks].iter_mut().for_each(|s| *s = 1.0 + f32::EPSILON);
        let mut values = Vec::new();
        Weights::Fp8 { codes: &s.fp8, scales: &scales, first: 0 }.expand(k, &mut values);
        let w = Fp8Rows { codes: &s.fp8, scales: &scales, first: 0, k, route: PhantomData::<R> };
        for rows in 1..=7 {
            let mut x: Vec<f32> = random_bits(rows * k, 12 + rows as u32)
                .iter()
                .map(|&b| (b as i32 % 9 - 4) as f32)
                .map(f32::exp2)
                .collect();
            x.iter_mut().step_by(3).for_each(|v| *v = -*v);
            x[130] = 2f32.powi(121) / R::REBIAS; // row 0, block 1
            let mut got = vec![0.0; rows * n];
            fp8(&x, rows, k, w, 0, n, &mut got);
            assert!(bits_equal(&got, &linear(&x, rows, &values, n)), "{rows} rows via {route}");
        }
    }
    check::<ViaHalf>("F16");
    check::<ViaBits>("bits");
}

/// Projections run as one group give each the bits it gives alone, in
/// every format, for one input row (decode: tasks split by bytes across
/// the group), a few and many (prefill tiles), on pools of 1 to 3 threads.
#[test]
fn grouped_projections_keep_their_own_bits() {
    let (k, n) = (320, 200);
    let s = stored(n, k, 11);
    let f32s = pseudo_random(n * k, 12);
    let formats = [
        Weights::F32(&f32s),
        Weights::Half { bytes: &s.half, bf16: true },
        Weights::Half { bytes: &s.half, bf16: false },
        Weights::Fp8 { codes: &s.fp8, scales: &s.fp8_scales, first: 0 },
        Weights::Fp4 { packed: &s.fp4, scales: &s.fp4_scales },
        // A slice of rows, as a grouped output projection takes.
        Weights::Fp8 { codes: &s.fp8, scales: &s.fp8_scales, first: 0 }.rows(k, 130, 170),
    ];
    let inputs = pseudo_random(76 * k, 13);
    for rows in [&[1usize, 1, 1, 1, 1, 1][..], &[1, 3, 0, 70, 1, 2]] {
        let group: Vec<Projection<'_>> = formats
            .iter()
            .zip(rows)
            .enumerate()
            .map(|(i, (&w, &rows))| {
                let x = &inputs[i * k..][..rows * k];
                Projection { x, rows, w, n: if i == 5 { 40 } else { n }, k }
            })
            .collect();
        let alone: Vec<Vec<f32>> = group.iter().map(|p| linear_with(p.x, p.rows, p.w, p.n, p.k)).collect();
        for threads in 1..=3 {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let together = pool.install(|| linear_group(&group));
            for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
                assert!(bits_equal(a, t), "projection {i} of rows {rows:?} on {threads} threads");
            }
        }
    }
}
