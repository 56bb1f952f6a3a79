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
/// Block-FP8 scales must be smaller than this in magnitude (`2^120`):
/// weights this large would not be finite in f32 (`448 · 2^120 > f32::MAX`).
pub const FP8_SCALE_LIMIT: f32 = f32::from_bits((120 + 127) << 23);
/// The kernels read block-FP8 matrices whose scales are all smaller than
/// this in magnitude (`2^8`): one of their routes holds a scale times
/// `2^120` (E4M3's exponent bias against f32's), which must be finite. A
/// matrix with a larger scale (none in DeepSeek's checkpoints: their
/// weights are far below `2^8`) is kept expanded to f32 instead.
pub const FP8_KERNEL_SCALE_LIMIT: f32 = 256.0;
/// Inputs sharing one MXFP4 scale.
pub const FP4_GROUP: usize = 32;

/// `2^120` (E4M3's exponent bias 7 against f32's 127).
pub(crate) const E4M3_REBIAS: f32 = f32::from_bits((120 + 127) << 23);

/// The value of an `F8_E4M3` (OCP "fn") code.
pub const fn e4m3(code: u8) -> f32 {
    if code & 0x7F == 0x7F {
        return f32::NAN;
    }
    e4m3_low(code) * E4M3_REBIAS
}

/// The value of a (non-NaN) `F8_E4M3` code times `2^-120`: the code's
/// exponent and mantissa bits moved onto an f32's, and its sign onto the
/// f32's. Exact, the subnormal codes included (as f32 subnormals), and
/// only bit moves, which is how the kernels read bare codes.
pub(crate) const fn e4m3_low(code: u8) -> f32 {
    f32::from_bits((((code & 0x80) as u32) << 24) | (((code & 0x7F) as u32) << 20))
}

/// The value of an `F8_E8M0` scale code, `None` for the NaN code 255.
pub const fn e8m0(code: u8) -> Option<f32> {
    match code {
        0xFF => None,
        // 2^-127 is subnormal in f32: the one mantissa bit below the top.
        0 => Some(f32::from_bits(1 << 22)),
        e => Some(f32::from_bits((e as u32) << 23)),
    }
}

/// Every `F8_E4M3` code's value.
pub(crate) const E4M3: [f32; 256] = {
    let mut table = [0.0; 256];
    let mut code = 0;
    while code < 256 {
        table[code] = e4m3(code as u8);
        code += 1;
    }
    table
};

/// `e8m0(code)` for every code (NaN for 255).
pub(crate) const E8M0: [f32; 256] = {
    let mut table = [f32::NAN; 256];
    let mut code = 0;
    while code < 255 {
        table[code] = match e8m0(code as u8) {
            Some(v) => v,
            None => f32::NAN,
        };
        code += 1;
    }
    table
};

/// `e8m0(code) / 2` for every code (NaN for 255): the kernels read MXFP4
/// codes as twice their value ([`E2M1_TWICE`]) and take the half back here.
/// Still exact: 2^-128 is an f32 subnormal.
pub(crate) const E8M0_HALF: [f32; 256] = {
    let mut table = [f32::NAN; 256];
    table[0] = f32::from_bits(1 << 21);
    table[1] = f32::from_bits(1 << 22);
    let mut code = 2;
    while code < 255 {
        table[code] = f32::from_bits(((code - 1) as u32) << 23);
        code += 1;
    }
    table
};

/// `e2m1` magnitudes by the low three bits of a code.
const E2M1_MAGNITUDE: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// The value of an `e2m1` code (the low four bits of `code`).
pub fn e2m1(code: u8) -> f32 {
    let magnitude = E2M1_MAGNITUDE[usize::from(code & 0x07)];
    if code & 0x08 != 0 { -magnitude } else { magnitude }
}

/// Twice every `e2m1` code's value as an integer (a byte-shuffle table for
/// the kernels). Code 8 (-0) reads as +0 here, which never changes a dot
/// product: an accumulator that starts at +0 can never become -0.
pub(crate) const E2M1_TWICE: [i8; 16] = {
    let mut table = [0i8; 16];
    let mut code = 0;
    while code < 16 {
        let twice = (E2M1_MAGNITUDE[code & 7] * 2.0) as i8;
        table[code] = if code & 8 != 0 { -twice } else { twice };
        code += 1;
    }
    table
};

/// Appends rows `first..first + codes.len() / inp` of a block-FP8 matrix to
/// `out`: `codes` holds those rows' codes, `scales` the whole matrix's
/// decoded block scales (`ceil(inp/128)` per block row).
pub fn expand_fp8(codes: &[u8], scales: &[f32], inp: usize, first: usize, out: &mut Vec<f32>) {
    let blocks_per_row = inp.div_ceil(FP8_BLOCK);
    let table = &E4M3;
    for (i, row) in codes.chunks_exact(inp).enumerate() {
        let block_row = &scales[((first + i) / FP8_BLOCK) * blocks_per_row..][..blocks_per_row];
        for (block, &scale) in row.chunks(FP8_BLOCK).zip(block_row) {
            out.extend(block.iter().map(|&q| table[usize::from(q)] * scale));
        }
    }
}

/// MXFP4 bytes rearranged for the kernels (same size): within each 32-input
/// group of 16 bytes, byte `j` holds input `j` in its low nibble and input
/// `j + 16` in its high nibble, where the checkpoint has inputs `2j` and
/// `2j + 1`. One widening then gives 16 consecutive inputs' codes in the low
/// bits of 16 lanes, and a shift by 4 the next 16.
pub fn fp4_kernel_order(stored: &[u8]) -> Vec<u8> {
    use rayon::prelude::*;
    const HALF: usize = FP4_GROUP / 4;
    let mut out = vec![0u8; stored.len()];
    // Output byte 2m holds inputs 2m and 2m + 16: the low nibbles of stored
    // bytes m and m + 8; byte 2m + 1 holds inputs 2m + 1 and 2m + 17: their
    // high nibbles.
    out.par_chunks_mut(1 << 16).zip(stored.par_chunks(1 << 16)).for_each(|(out, stored)| {
        for (o, s) in out.chunks_exact_mut(FP4_GROUP / 2).zip(stored.chunks_exact(FP4_GROUP / 2)) {
            for m in 0..HALF {
                o[2 * m] = (s[m] & 0x0F) | (s[m + HALF] << 4);
                o[2 * m + 1] = (s[m] >> 4) | (s[m + HALF] & 0xF0);
            }
        }
    });
    out
}

/// Appends rows `first..first + packed.len() / (inp/2)` of an MXFP4 matrix
/// to `out`: `packed` holds those rows' bytes in kernel order
/// ([`fp4_kernel_order`]), `scales` the whole matrix's E8M0 group scales as
/// stored (`inp/32` per row, none of them the NaN code: checked at load, as
/// is `inp` being a multiple of 32).
pub fn expand_fp4(packed: &[u8], scales: &[u8], inp: usize, first: usize, out: &mut Vec<f32>) {
    let groups = inp / FP4_GROUP;
    for (i, row) in packed.chunks_exact(inp / 2).enumerate() {
        let row_scales = &scales[(first + i) * groups..][..groups];
        for (group, &scale) in row.chunks_exact(FP4_GROUP / 2).zip(row_scales) {
            let scale = e8m0(scale).unwrap_or(f32::NAN);
            out.extend(group.iter().map(|&b| e2m1(b) * scale));
            out.extend(group.iter().map(|&b| e2m1(b >> 4) * scale));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dequantize_fp8(codes: &[u8], scales: &[f32], out: usize, inp: usize) -> Vec<f32> {
        let mut w = Vec::with_capacity(out * inp);
        expand_fp8(&codes[..out * inp], scales, inp, 0, &mut w);
        w
    }

    fn dequantize_fp4(packed: &[u8], scales: &[u8], out: usize, inp: usize) -> Vec<f32> {
        let mut w = Vec::with_capacity(out * inp);
        expand_fp4(&fp4_kernel_order(&packed[..out * inp / 2]), scales, inp, 0, &mut w);
        w
    }

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
        assert!((0u8..255).all(|e| e8m0(e) == Some(2f32.powi(i32::from(e) - 127))));
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
        // Rows expanded from the middle see their own block row.
        let mut tail = Vec::new();
        expand_fp8(&codes[127 * inp..130 * inp], &scales, inp, 127, &mut tail);
        assert_eq!(tail, w[127 * inp..]);
    }

    #[test]
    fn fp4_kernel_order_puts_input_j_and_j_plus_16_in_byte_j() {
        // Stored: byte b = input 2b (low) | input 2b+1 (high), here input i has code i % 16.
        let stored: Vec<u8> = (0..16u8).map(|b| ((2 * b) % 16) | (((2 * b + 1) % 16) << 4)).collect();
        let kernel = fp4_kernel_order(&stored);
        assert!((0..16).all(|j| kernel[j] == (j as u8 % 16) | (((j as u8 + 16) % 16) << 4)));
    }

    #[test]
    fn fp4_low_nibble_is_the_even_input_and_groups_share_a_scale() {
        // One row of 64 inputs: bytes 0x21 (inputs 0.5 then 1.0), scales 1 and 4.
        let packed = vec![0x21u8; 32];
        let w = dequantize_fp4(&packed, &[127, 129], 1, 64);
        assert_eq!((w[0], w[1], w[31]), (0.5, 1.0, 1.0));
        assert_eq!((w[32], w[33], w[63]), (2.0, 4.0, 4.0));
        let mut second = Vec::new();
        expand_fp4(&fp4_kernel_order(&[0x21u8; 16]), &[127, 130], 32, 1, &mut second);
        assert_eq!((second[0], second[1]), (4.0, 8.0));
        let negative = dequantize_fp4(&[0xF9; 16], &[128], 1, 32);
        assert_eq!(negative[..2], [-1.0, -12.0]);
    }
}
