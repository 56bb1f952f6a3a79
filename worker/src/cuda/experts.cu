// Routed experts on a CUDA GPU, compiled at run time with NVRTC
// (worker/src/cuda/mod.rs prepends the EXP_* constants, as the bits of the
// CPU's, and compiles with --fmad=false --ftz=false: no operation is
// contracted or flushed, so each one is the exactly rounded IEEE operation
// the CPU performs).
//
// Every output element is the canonical dot product of ADR 0001: lane l
// (of 16) accumulates x[j]·w[j] for j ≡ l (mod 16) in increasing j with a
// fused multiply-add, then the lanes are added as a fixed binary tree
// (8, 4, 2, 1). Here the 16 lanes are 16 threads of a half-warp, and the
// tree is four shuffles. Which outputs a block computes, and how many
// tokens a launch carries, never change that order: a token's result does
// not depend on its batch, and equals the CPU backend's bits.
//
// Weights stay in their stored format and are expanded per weight exactly as
// `myriad_model::quant` defines (BF16, F16, block-FP8 with its decoded
// scales, MXFP4 in kernel order with E8M0 scales): the same f32 values the
// CPU's kernels multiply.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

// Tokens one thread accumulates at once: each weight it loads serves them all.
#define TOKENS 8
// Weight rows of one block (blockDim.y); blockDim.x is the 16 lanes.
#define ROWS 16

struct F32W {
    const float* w;
    __device__ float at(long row, long k, long j) const { return w[row * k + j]; }
};

struct Bf16W {
    const u16* w;
    __device__ float at(long row, long k, long j) const { return __uint_as_float((u32)w[row * k + j] << 16); }
};

struct F16W {
    const u16* w;
    __device__ float at(long row, long k, long j) const {
        float f;
        u16 h = w[row * k + j];
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
        return f;
    }
};

// Block-FP8: e4m3 code times its 128 x 128 block's decoded scale (one f32
// product, as the CPU's expansion computes it).
struct Fp8W {
    const u8* codes;
    const float* scales;
    const float* e4m3;  // every code's value (myriad_model::quant::e4m3)
    long blocks_per_row;
    __device__ float at(long row, long k, long j) const {
        float scale = scales[(row / 128) * blocks_per_row + j / 128];
        return e4m3[codes[row * k + j]] * scale;
    }
};

// MXFP4 in kernel order: a 32-input group's 16 bytes hold its inputs
// 0..15 in their low nibbles and 16..31 in their high ones.
struct Fp4W {
    const u8* packed;
    const u8* scales;
    const float* e2m1;  // the 16 codes' values
    const float* e8m0;  // every scale code's value
    __device__ float at(long row, long k, long j) const {
        long group = j / 32, within = j % 32;
        u8 byte = packed[row * (k / 2) + group * 16 + (within & 15)];
        u8 code = within < 16 ? (byte & 15) : (byte >> 4);
        return e2m1[code] * e8m0[scales[row * (k / 32) + group]];
    }
};

// y[r][c] = dot(x[r], w[c]) for r < rows, c < n. Block (16 lanes, ROWS weight
// rows); grid (ceil(n / ROWS), ceil(rows / TOKENS)).
template <typename W>
__device__ void matmul(const float* __restrict__ x, int rows, W w, int n, int k, float* __restrict__ y) {
    int lane = threadIdx.x;
    long row = (long)blockIdx.x * ROWS + threadIdx.y;
    long token0 = (long)blockIdx.y * TOKENS;
    bool live = row < n;
    float acc[TOKENS];
    for (int t = 0; t < TOKENS; t++) acc[t] = 0.0f;
    if (live) {
        // Full steps of 16, then the tail: lane l takes input full + l.
        for (long j = lane; j < k; j += 16) {
            float v = w.at(row, k, j);
            for (int t = 0; t < TOKENS; t++) {
                if (token0 + t < rows) acc[t] = fmaf(x[(token0 + t) * k + j], v, acc[t]);
            }
        }
    }
    // The fixed tree, every thread of the warp taking part.
    for (int width = 8; width > 0; width >>= 1) {
        for (int t = 0; t < TOKENS; t++) acc[t] += __shfl_down_sync(0xffffffffu, acc[t], width, 16);
    }
    if (live && lane == 0) {
        for (int t = 0; t < TOKENS; t++) {
            if (token0 + t < rows) y[(token0 + t) * n + row] = acc[t];
        }
    }
}

extern "C" __global__ void matmul_f32(const float* x, int rows, const float* w, int n, int k, float* y) {
    matmul(x, rows, F32W{w}, n, k, y);
}

extern "C" __global__ void matmul_bf16(const float* x, int rows, const u16* w, int n, int k, float* y) {
    matmul(x, rows, Bf16W{w}, n, k, y);
}

extern "C" __global__ void matmul_f16(const float* x, int rows, const u16* w, int n, int k, float* y) {
    matmul(x, rows, F16W{w}, n, k, y);
}

extern "C" __global__ void matmul_fp8(const float* x, int rows, const u8* codes, const float* scales,
                                      const float* e4m3, int n, int k, float* y) {
    matmul(x, rows, Fp8W{codes, scales, e4m3, (k + 127) / 128}, n, k, y);
}

extern "C" __global__ void matmul_fp4(const float* x, int rows, const u8* packed, const u8* scales,
                                      const float* e2m1, const float* e8m0, int n, int k, float* y) {
    matmul(x, rows, Fp4W{packed, scales, e2m1, e8m0}, n, k, y);
}

// myriad_model::kernels::exp, step for step.
__device__ float exp_(float x) {
    x = x < EXP_CLAMP_LO ? EXP_CLAMP_LO : (x > EXP_CLAMP_HI ? EXP_CLAMP_HI : x);
    float n = rintf(x * EXP_LOG2_E);
    float r = fmaf(n, -EXP_LN2_LO, fmaf(n, -EXP_LN2_HI, x));
    float p = EXP_TAYLOR_0;
    p = fmaf(p, r, EXP_TAYLOR_1);
    p = fmaf(p, r, EXP_TAYLOR_2);
    p = fmaf(p, r, EXP_TAYLOR_3);
    p = fmaf(p, r, EXP_TAYLOR_4);
    p = fmaf(p, r, EXP_TAYLOR_5);
    p = fmaf(p, r, EXP_TAYLOR_6);
    p = fmaf(p, r, EXP_TAYLOR_7);
    int m = (int)n;
    int a = m >> 1, b = m - (m >> 1);
    return p * __uint_as_float((u32)(a + 127) << 23) * __uint_as_float((u32)(b + 127) << 23);
}

// gate[i] <- silu(min(gate[i], limit)) * clamp(up[i], -limit, limit), as
// myriad_model::moe::experts_ffn computes it (min returns the limit for a
// NaN gate, the clamp keeps a NaN up).
extern "C" __global__ void swiglu(float* gate, const float* up, long len, float limit) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= len) return;
    float g = fminf(gate[i], limit);
    float u = up[i];
    u = u < -limit ? -limit : (u > limit ? limit : u);
    gate[i] = g / (1.0f + exp_(-g)) * u;
}

// out[slot[r]] <- y[r] * weight[r] for each of `rows` rows `width` wide: the
// weighted contributions, in the batch's pair order.
extern "C" __global__ void weigh(const float* y, const int* slot, const float* weight, int rows, int width,
                                 float* out) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)rows * width) return;
    long r = i / width, c = i % width;
    out[(long)slot[r] * width + c] = y[i] * weight[r];
}
