//! The quantized weight formats of DeepSeek's released V4 checkpoints, and
//! their exact expansion to f32.
//!
//! - **Block FP8**: `F8_E4M3` codes `[out, in]` (1 sign, 4 exponent bits with
//!   bias 7, 3 mantissa bits; no infinities; `0x7F`/`0xFF` are NaN; largest
//!   448) and a sibling scale `[ceil(out/128), ceil(in/128)]`, `F8_E8M0` or
//!   F32: `w[i][j] = e4m3(q[i][j]) · scale[i/128][j/128]`.
//! - **MXFP4** (routed experts): two `e2m1` codes per byte, `[out, in/2]`
//!   stored as `I8`/`U8`, the low nibble holding the even input index; bit 3
//!   is the sign and the magnitudes are 0, 0.5, 1, 1.5, 2, 3, 4, 6. Scale
//!   `F8_E8M0` `[out, in/32]`: one power of two per 32 inputs.
//! - `F8_E8M0`: `2^(e - 127)`; 255 is NaN, which a weight scale must never be.
//!
//! Every product here is of a small-mantissa value by a power of two, so the
//! expansion is exact in f32: the same f32 weights the reference computes on.

/// Rows and columns of one block-FP8 scale.
pub const FP8_BLOCK: usize = 128;
/// Inputs sharing one MXFP4 scale.
pub const FP4_GROUP: usize = 32;

/// The value of an `F8_E4M3` (OCP "fn") code.
pub fn e4m3(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let exponent = i32::from((code >> 3) & 0x0F);
    let mantissa = f32::from(code & 0x07);
    if exponent == 0x0F && code & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exponent == 0 {
        // Subnormal: 0.mmm · 2^(1 - 7).
        return sign * mantissa / 8.0 * 2f32.powi(-6);
    }
    sign * (1.0 + mantissa / 8.0) * 2f32.powi(exponent - 7)
}

/// The value of an `F8_E8M0` scale code, `None` for the NaN code 255.
pub fn e8m0(code: u8) -> Option<f32> {
    (code != 0xFF).then(|| 2f32.powi(i32::from(code) - 127))
}

/// The value of an `e2m1` code (the low four bits of `code`).
pub fn e2m1(code: u8) -> f32 {
    const MAGNITUDE: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
    let magnitude = MAGNITUDE[usize::from(code & 0x07)];
    if code & 0x08 != 0 { -magnitude } else { magnitude }
}

/// Expands block-FP8 `codes` (`[out, inp]`) with per-block `scales`
/// (`[ceil(out/128), ceil(inp/128)]`, already decoded) into f32 rows.
pub fn dequantize_fp8(codes: &[u8], scales: &[f32], out: usize, inp: usize) -> Vec<f32> {
    let blocks_per_row = inp.div_ceil(FP8_BLOCK);
    let mut w = Vec::with_capacity(out * inp);
    for (i, row) in codes.chunks_exact(inp).take(out).enumerate() {
        let block_row = &scales[(i / FP8_BLOCK) * blocks_per_row..][..blocks_per_row];
        w.extend(row.iter().enumerate().map(|(j, &q)| e4m3(q) * block_row[j / FP8_BLOCK]));
    }
    w
}

/// Expands MXFP4 `packed` (`[out, inp/2]` bytes) with per-group `scales`
/// (`[out, inp/32]`, already decoded) into f32 rows. `inp` must be a
/// multiple of 32 (checked by the caller).
pub fn dequantize_fp4(packed: &[u8], scales: &[f32], out: usize, inp: usize) -> Vec<f32> {
    let groups = inp / FP4_GROUP;
    let mut w = Vec::with_capacity(out * inp);
    for (i, row) in packed.chunks_exact(inp / 2).take(out).enumerate() {
        let row_scales = &scales[i * groups..][..groups];
        for (b, &byte) in row.iter().enumerate() {
            let scale = row_scales[2 * b / FP4_GROUP];
            w.push(e2m1(byte) * scale);
            w.push(e2m1(byte >> 4) * scale);
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_codes_have_their_documented_values() {
        assert_eq!(e4m3(0x00), 0.0);
        assert_eq!(e4m3(0x80), 0.0);
        assert!(e4m3(0x80).is_sign_negative());
        assert_eq!(e4m3(0x38), 1.0); // exponent 7, mantissa 0
        assert_eq!(e4m3(0xB8), -1.0);
        assert_eq!(e4m3(0x01), 2f32.powi(-9)); // smallest subnormal
        assert_eq!(e4m3(0x07), 0.875 * 2f32.powi(-6)); // largest subnormal
        assert_eq!(e4m3(0x08), 2f32.powi(-6)); // smallest normal
        assert_eq!(e4m3(0x7E), 448.0); // largest finite
        assert_eq!(e4m3(0x3C), 1.5);
        assert!(e4m3(0x7F).is_nan() && e4m3(0xFF).is_nan());
        // Every other code is finite, and the positive codes increase.
        let finite: Vec<f32> = (0u8..0x7F).map(e4m3).collect();
        assert!(finite.windows(2).all(|w| w[0] < w[1]));
        assert!((0x80u8..0xFF).all(|c| e4m3(c) == -e4m3(c & 0x7F)));
    }

    #[test]
    fn e8m0_and_e2m1_codes_have_their_documented_values() {
        assert_eq!(e8m0(127), Some(1.0));
        assert_eq!(e8m0(130), Some(8.0));
        assert_eq!(e8m0(0), Some(2f32.powi(-127)));
        assert_eq!(e8m0(254), Some(2f32.powi(127)));
        assert_eq!(e8m0(255), None);
        let values: Vec<f32> = (0u8..16).map(e2m1).collect();
        assert_eq!(values, [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]);
    }

    #[test]
    fn fp8_blocks_scale_their_own_rows_and_columns() {
        // 130 x 129: four blocks, the last row and column blocks partial.
        let (out, inp) = (130, 129);
        let codes = vec![0x38u8; out * inp]; // every code 1.0
        let scales = [1.0, 2.0, 4.0, 8.0];
        let w = dequantize_fp8(&codes, &scales, out, inp);
        assert_eq!((w[0], w[127], w[128]), (1.0, 1.0, 2.0));
        assert_eq!((w[128 * inp], w[129 * inp + 128]), (4.0, 8.0));
    }

    #[test]
    fn fp4_low_nibble_is_the_even_input_and_groups_share_a_scale() {
        // One row of 64 inputs: bytes 0x21 (inputs 0.5 then 1.0), scales 1 and 4.
        let packed = vec![0x21u8; 32];
        let w = dequantize_fp4(&packed, &[1.0, 4.0], 1, 64);
        assert_eq!((w[0], w[1], w[31]), (0.5, 1.0, 1.0));
        assert_eq!((w[32], w[33], w[63]), (2.0, 4.0, 4.0));
        let negative = dequantize_fp4(&[0xF9; 16], &[2.0], 1, 32);
        assert_eq!(negative[..2], [-1.0, -12.0]);
    }
}
