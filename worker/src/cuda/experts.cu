// Routed experts on a CUDA GPU, compiled at run time with NVRTC
// (worker/src/cuda/mod.rs prepends the EXP_* constants, as the bits of the
// CPU's, and compiles with --fmad=false --ftz=false: no operation is
// contracted or flushed, so each one is the exactly rounded IEEE operation
// the CPU performs).
//
// A batch runs as two grouped launches per stored format, every expert of
// the batch in one grid (blockIdx.z picks the expert's entry of the group
// table, worker/src/cuda/batch.rs):
//   gate_up_*: act = silu(min(x·w1ᵀ, limit)) * clamp(x·w3ᵀ, ±limit)
//   down_*:    out[slot] = (act·w2ᵀ) * weight
//
// Every projection output is the canonical dot product of ADR 0001: lane l
// (of 16) accumulates x[j]·w[j] for j ≡ l (mod 16) in increasing j with a
// fused multiply-add, then the lanes are added as a fixed binary tree
// (8, 4, 2, 1). Here the 16 lanes are 16 threads of a half-warp, each
// computing THREAD_ROWS outputs for TOKENS tokens at once (so that a load
// serves several multiply-adds), and the tree is four shuffles. Which outputs a block computes, which experts share
// the launch and how many tokens each carries never change that order: a
// token's result does not depend on its batch, and equals the CPU backend's
// bits.
//
// Weights stay in their stored format and are expanded per weight exactly as
// `myriad_model::quant` defines (BF16, F16, block-FP8 with its decoded
// scales, MXFP4 in kernel order with E8M0 scales): the same f32 values the
// CPU's kernels multiply.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// Tokens one thread accumulates at once: each weight it loads serves them all.
#define TOKENS 8
// Weight rows one thread accumulates at once: each input it loads serves them all.
#define THREAD_ROWS 4
// Weight rows of one block; blockDim is (16 lanes, ROWS / THREAD_ROWS).
#define ROWS 16

// One expert's share of a launch: its tokens are members first..first + rows
// of the batch (member m is row token[m] of x), and its weight matrices
// (with their scales, for the quantized formats) are at a and b (b: the up
// projection; unused by down).
struct Group {
    u64 first, rows, a, a_scales, b, b_scales;
};

// Every code's value: myriad_model::quant's e4m3, e2m1 and e8m0.
struct Tables {
    const float* e4m3;
    const float* e2m1;
    const float* e8m0;
};

struct F32W {
    const float* w;
    __device__ F32W(u64 w, u64, Tables) : w((const float*)w) {}
    __device__ float at(long row, long k, long j) const { return w[row * k + j]; }
};

struct Bf16W {
    const u16* w;
    __device__ Bf16W(u64 w, u64, Tables) : w((const u16*)w) {}
    __device__ float at(long row, long k, long j) const { return __uint_as_float((u32)w[row * k + j] << 16); }
};

struct F16W {
    const u16* w;
    __device__ F16W(u64 w, u64, Tables) : w((const u16*)w) {}
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
    const float* e4m3;
    __device__ Fp8W(u64 w, u64 s, Tables t) : codes((const u8*)w), scales((const float*)s), e4m3(t.e4m3) {}
    __device__ float at(long row, long k, long j) const {
        float scale = scales[(row / 128) * ((k + 127) / 128) + j / 128];
        return e4m3[codes[row * k + j]] * scale;
    }
};

// MXFP4 in kernel order: a 32-input group's 16 bytes hold its inputs
// 0..15 in their low nibbles and 16..31 in their high ones.
struct Fp4W {
    const u8* packed;
    const u8* scales;
    const float* e2m1;
    const float* e8m0;
    __device__ Fp4W(u64 w, u64 s, Tables t)
        : packed((const u8*)w), scales((const u8*)s), e2m1(t.e2m1), e8m0(t.e8m0) {}
    __device__ float at(long row, long k, long j) const {
        long group = j / 32, within = j % 32;
        u8 byte = packed[row * (k / 2) + group * 16 + (within & 15)];
        u8 code = within < 16 ? (byte & 15) : (byte >> 4);
        return e2m1[code] * e8m0[scales[row * (k / 32) + group]];
    }
};

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

// silu(min(gate, limit)) * clamp(up, -limit, limit), as
// myriad_model::moe::experts_ffn computes it (min returns the limit for a
// NaN gate, the clamp keeps a NaN up).
__device__ float swiglu(float gate, float up, float limit) {
    float g = fminf(gate, limit);
    float u = up < -limit ? -limit : (up > limit ? limit : up);
    return g / (1.0f + exp_(-g)) * u;
}

// The 16 lanes' partial sums added in the fixed tree, every thread of the
// warp taking part; lane 0 ends with the sums.
__device__ void tree(float* acc) {
    for (int width = 8; width > 0; width >>= 1) {
        for (int t = 0; t < TOKENS; t++) acc[t] += __shfl_down_sync(0xffffffffu, acc[t], width, 16);
    }
}

// Block (16 lanes, ROWS / THREAD_ROWS): thread (l, y) is lane l of weight
// rows ROWS * blockIdx.x + THREAD_ROWS * y + r for r < THREAD_ROWS. Grid
// (ceil(n / ROWS), up to ceil(most rows of a group / TOKENS), groups): a
// block takes every gridDim.y-th run of TOKENS tokens of its group. Whether
// a block has a run to do is the same for all its threads, so they reach
// the shuffles together.
template <typename W>
__device__ void gate_up(const Group* groups, const float* __restrict__ x, const int* token, int k, int n, float limit,
                        Tables tables, float* __restrict__ act) {
    Group g = groups[blockIdx.z];
    W w1(g.a, g.a_scales, tables), w3(g.b, g.b_scales, tables);
    int lane = threadIdx.x;
    long row0 = (long)blockIdx.x * ROWS + (long)threadIdx.y * THREAD_ROWS;
    for (long token0 = (long)blockIdx.y * TOKENS; token0 < (long)g.rows; token0 += (long)gridDim.y * TOKENS) {
        int count = (long)g.rows - token0 < TOKENS ? (int)((long)g.rows - token0) : TOKENS;
        long member0 = (long)g.first + token0;
        const float* xs[TOKENS];
        for (int t = 0; t < TOKENS; t++) xs[t] = x + (long)token[member0 + (t < count ? t : 0)] * k;
        float gate[THREAD_ROWS][TOKENS], up[THREAD_ROWS][TOKENS];
        for (int r = 0; r < THREAD_ROWS; r++) {
            for (int t = 0; t < TOKENS; t++) gate[r][t] = up[r][t] = 0.0f;
        }
        for (long j = lane; j < k; j += 16) {
            float xj[TOKENS];
            for (int t = 0; t < TOKENS; t++) xj[t] = t < count ? xs[t][j] : 0.0f;
            for (int r = 0; r < THREAD_ROWS; r++) {
                if (row0 + r >= n) break;
                float v1 = w1.at(row0 + r, k, j), v3 = w3.at(row0 + r, k, j);
                for (int t = 0; t < TOKENS; t++) {
                    gate[r][t] = fmaf(xj[t], v1, gate[r][t]);
                    up[r][t] = fmaf(xj[t], v3, up[r][t]);
                }
            }
        }
        for (int r = 0; r < THREAD_ROWS; r++) {
            tree(gate[r]);
            tree(up[r]);
        }
        if (lane == 0) {
            for (int r = 0; r < THREAD_ROWS && row0 + r < n; r++) {
                for (int t = 0; t < count; t++) {
                    act[(member0 + t) * n + row0 + r] = swiglu(gate[r][t], up[r][t], limit);
                }
            }
        }
    }
}

// As gate_up, for w2: each token's output row goes, times its route weight,
// to its contribution's slot.
template <typename W>
__device__ void down(const Group* groups, const float* __restrict__ act, int k, int n, const int* slot,
                     const float* weight, Tables tables, float* __restrict__ out) {
    Group g = groups[blockIdx.z];
    W w2(g.a, g.a_scales, tables);
    int lane = threadIdx.x;
    long row0 = (long)blockIdx.x * ROWS + (long)threadIdx.y * THREAD_ROWS;
    for (long token0 = (long)blockIdx.y * TOKENS; token0 < (long)g.rows; token0 += (long)gridDim.y * TOKENS) {
        int count = (long)g.rows - token0 < TOKENS ? (int)((long)g.rows - token0) : TOKENS;
        long member0 = (long)g.first + token0;
        const float* xs = act + member0 * k;
        float acc[THREAD_ROWS][TOKENS];
        for (int r = 0; r < THREAD_ROWS; r++) {
            for (int t = 0; t < TOKENS; t++) acc[r][t] = 0.0f;
        }
        for (long j = lane; j < k; j += 16) {
            float xj[TOKENS];
            for (int t = 0; t < TOKENS; t++) xj[t] = t < count ? xs[t * k + j] : 0.0f;
            for (int r = 0; r < THREAD_ROWS; r++) {
                if (row0 + r >= n) break;
                float v = w2.at(row0 + r, k, j);
                for (int t = 0; t < TOKENS; t++) acc[r][t] = fmaf(xj[t], v, acc[r][t]);
            }
        }
        for (int r = 0; r < THREAD_ROWS; r++) tree(acc[r]);
        if (lane == 0) {
            for (int r = 0; r < THREAD_ROWS && row0 + r < n; r++) {
                for (int t = 0; t < count; t++) {
                    out[(long)slot[member0 + t] * n + row0 + r] = acc[r][t] * weight[member0 + t];
                }
            }
        }
    }
}

#define KERNELS(NAME, W)                                                                                      \
    extern "C" __global__ void gate_up_##NAME(const Group* groups, const float* x, const int* token, int k, int n, \
                                              float limit, const float* e4m3, const float* e2m1,             \
                                              const float* e8m0, float* act) {                                \
        gate_up<W>(groups, x, token, k, n, limit, Tables{e4m3, e2m1, e8m0}, act);                             \
    }                                                                                                         \
    extern "C" __global__ void down_##NAME(const Group* groups, const float* act, int k, int n, const int* slot, \
                                           const float* weight, const float* e4m3, const float* e2m1,        \
                                           const float* e8m0, float* out) {                                   \
        down<W>(groups, act, k, n, slot, weight, Tables{e4m3, e2m1, e8m0}, out);                              \
    }

KERNELS(f32, F32W)
KERNELS(bf16, Bf16W)
KERNELS(f16, F16W)
KERNELS(fp8, Fp8W)
KERNELS(fp4, Fp4W)
