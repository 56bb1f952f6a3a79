// Routed experts on a CUDA GPU, compiled at run time with NVRTC
// (worker/src/cuda/mod.rs prepends the launch geometry and the EXP_*
// constants, as the bits of the CPU's, and compiles with --fmad=false
// --ftz=false: no operation is contracted or flushed, so each one is the
// exactly rounded IEEE operation the CPU performs).
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
// (8, 4, 2, 1). Here a pair of threads owns a weight row: thread h holds
// lanes 8h..8h+7, so that each step it loads the 8 consecutive weights
// 16i + 8h.. of the row at once (16 bytes of BF16) and its partner the next
// 8. The tree's first level is one shuffle between the pair, the rest is in
// the thread. A thread keeps its lanes for TOKENS tokens (and for both gate
// and up, or for two rows of down), so each weight it loads serves several
// multiply-adds. Which rows a block takes, which experts share the launch
// and how many tokens each carries never change that order: a token's
// result does not depend on its batch, and equals the CPU backend's bits.
//
// Weights stay in their stored format and are expanded per weight exactly as
// `myriad_model::quant` defines (BF16, F16, block-FP8 with its decoded
// scales, MXFP4 in kernel order with E8M0 scales): the same f32 values the
// CPU's kernels multiply.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// Defined by mod.rs, which sizes the grids with them: PAIRS, thread pairs
// of a block (blockDim.x is twice this), each owning a row; TOKENS, tokens
// one thread accumulates at once (each weight it loads serves them all);
// DOWN_ROWS, rows a pair of down_* owns (gate_up_* owns one row of w1 and
// of w3).
// Inputs of the block's tokens in shared memory at a time.
#define CHUNK 512
// Entries of the value tables: e4m3, e2m1, e8m0.
#define TABLE_ENTRIES (256 + 16 + 256)
#define ALL_LANES 0xffffffffu
// 2^126, exactly: what an E2M1 code's magnitude bits read as an f32 are
// multiplied by to give its magnitude.
#define E2M1_UNIT __uint_as_float(0x7e800000u)

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

// A weight matrix [n, k] in its stored format: at(row, j) is one weight;
// load(row, j0) the raw bytes of weights j0..j0 + 7 of a row (and their
// scale), in one aligned load when j0 is a multiple of 8 and k of 16, and
// expand(raw, v) their values, so that a load can be issued steps before
// its values are needed.
struct F32W {
    struct Raw {
        float4 a, b;
    };
    const float* w;
    long k;
    __device__ F32W(u64 w, u64, int k, Tables) : w((const float*)w), k(k) {}
    __device__ float at(int row, int j) const { return w[row * k + j]; }
    __device__ Raw load(int row, int j0) const {
        const float4* p = (const float4*)(w + row * k + j0);
        return Raw{p[0], p[1]};
    }
    __device__ void expand(Raw q, float* v) const {
        v[0] = q.a.x, v[1] = q.a.y, v[2] = q.a.z, v[3] = q.a.w, v[4] = q.b.x, v[5] = q.b.y, v[6] = q.b.z, v[7] = q.b.w;
    }
};

// Four 32-bit words as eight 16-bit halves, low half first.
__device__ void halves(uint4 q, u32* h) {
    u32 words[4] = {q.x, q.y, q.z, q.w};
    for (int i = 0; i < 4; i++) h[2 * i] = words[i] & 0xffffu, h[2 * i + 1] = words[i] >> 16;
}

struct Bf16W {
    typedef uint4 Raw;
    const u16* w;
    long k;
    __device__ Bf16W(u64 w, u64, int k, Tables) : w((const u16*)w), k(k) {}
    __device__ float at(int row, int j) const { return __uint_as_float((u32)w[row * k + j] << 16); }
    __device__ Raw load(int row, int j0) const { return *(const uint4*)(w + row * k + j0); }
    __device__ void expand(Raw q, float* v) const {
        u32 h[8];
        halves(q, h);
        for (int i = 0; i < 8; i++) v[i] = __uint_as_float(h[i] << 16);
    }
};

__device__ float half_(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

struct F16W {
    typedef uint4 Raw;
    const u16* w;
    long k;
    __device__ F16W(u64 w, u64, int k, Tables) : w((const u16*)w), k(k) {}
    __device__ float at(int row, int j) const { return half_(w[row * k + j]); }
    __device__ Raw load(int row, int j0) const { return *(const uint4*)(w + row * k + j0); }
    __device__ void expand(Raw q, float* v) const {
        u32 h[8];
        halves(q, h);
        for (int i = 0; i < 8; i++) v[i] = half_((u16)h[i]);
    }
};

// Block-FP8: e4m3 code times its 128 x 128 block's decoded scale (one f32
// product, as the CPU's expansion computes it).
struct Fp8W {
    struct Raw {
        uint2 codes;
        float scale;
    };
    const u8* codes;
    const float* scales;
    const float* e4m3;
    long k, blocks;
    __device__ Fp8W(u64 w, u64 s, int k, Tables t)
        : codes((const u8*)w), scales((const float*)s), e4m3(t.e4m3), k(k), blocks((k + 127) / 128) {}
    __device__ float scale(int row, int j) const { return scales[(row / 128) * blocks + j / 128]; }
    __device__ float at(int row, int j) const { return e4m3[codes[row * k + j]] * scale(row, j); }
    __device__ Raw load(int row, int j0) const { return Raw{*(const uint2*)(codes + row * k + j0), scale(row, j0)}; }
    __device__ void expand(Raw q, float* v) const {
        for (int i = 0; i < 4; i++) v[i] = e4m3[(q.codes.x >> (8 * i)) & 255u] * q.scale;
        for (int i = 0; i < 4; i++) v[4 + i] = e4m3[(q.codes.y >> (8 * i)) & 255u] * q.scale;
    }
};

// MXFP4 in kernel order: a 32-input group's 16 bytes hold its inputs
// 0..15 in their low nibbles and 16..31 in their high ones.
struct Fp4W {
    struct Raw {
        uint2 packed;
        u32 scale, shift;
    };
    const u8* packed;
    const u8* scales;
    const float* e2m1;
    const float* e8m0;
    long k;
    __device__ Fp4W(u64 w, u64 s, int k, Tables t)
        : packed((const u8*)w), scales((const u8*)s), e2m1(t.e2m1), e8m0(t.e8m0), k(k) {}
    __device__ float at(int row, int j) const {
        int group = j / 32, within = j % 32;
        u8 byte = packed[row * (k / 2) + group * 16 + (within & 15)];
        u8 code = within < 16 ? (byte & 15) : (byte >> 4);
        return e2m1[code] * e8m0[scales[row * (k / 32) + group]];
    }
    __device__ Raw load(int row, int j0) const {
        int group = j0 / 32, within = j0 % 32;
        return Raw{*(const uint2*)(packed + row * (k / 2) + group * 16 + (within & 15)),
                   scales[row * (k / 32) + group], within < 16 ? 0u : 4u};
    }
    // Without the table: a code's magnitude bits (exponent, mantissa) put
    // at the bottom of an f32's exponent and top of its mantissa read as
    // the magnitude times 2^-126 (a subnormal for the exponent 0), which
    // the multiplication by 2^126 makes exact; the sign goes on after the
    // scale, as (-a)·s is -(a·s) bit for bit.
    __device__ void expand(Raw q, float* v) const {
        float s = e8m0[q.scale];
        u32 words[2] = {q.packed.x >> q.shift, q.packed.y >> q.shift};
        for (int i = 0; i < 8; i++) {
            u32 code = words[i / 4] >> (8 * (i % 4));
            float magnitude = __uint_as_float((code & 7u) << 22) * E2M1_UNIT;
            v[i] = __uint_as_float(__float_as_uint(magnitude * s) ^ ((code & 8u) << 28));
        }
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

// The value tables in shared memory, read by every thread of the block.
__device__ Tables shared_tables(const float* e4m3, const float* e2m1, const float* e8m0) {
    __shared__ float table[TABLE_ENTRIES];
    for (int i = threadIdx.x; i < TABLE_ENTRIES; i += blockDim.x) {
        table[i] = i < 256 ? e4m3[i] : (i < 272 ? e2m1[i - 256] : e8m0[i - 272]);
    }
    __syncthreads();
    return Tables{table, table + 256, table + 272};
}

// x_t, one of the thread's TOKENS rows, picked without indexing an array
// by a variable (which would put it in local memory).
__device__ const float* pick(const float* const* xs, int t) {
    const float* x = xs[0];
#pragma unroll
    for (int u = 1; u < TOKENS; u++) x = u == t ? xs[u] : x;
    return x;
}

// Inputs c0..c0 + width of the block's first count tokens into chunk, by
// every thread of the block: four at a time when they are aligned.
__device__ void stage(float (*chunk)[CHUNK], const float* const* xs, int count, int c0, int width, bool vector) {
    for (int t = 0; t < count; t++) {
        const float* x = pick(xs, t) + c0;
        if (vector) {
            for (int q = threadIdx.x; q < width / 4; q += blockDim.x) {
                *(float4*)&chunk[t][4 * q] = *(const float4*)(x + 4 * q);
            }
        } else {
            for (int q = threadIdx.x; q < width; q += blockDim.x) chunk[t][q] = x[q];
        }
    }
}

// acc[m][r][t][l] accumulates x_t[j]·w[m](rows[r], j) for the thread's
// lanes l (j = 16i + 8h + l) in increasing i: the canonical lanes 8h..8h+7
// of each output. The block's tokens go through shared memory CHUNK inputs
// at a time (a multiple of 16, so a chunk's lanes are the row's); the
// weights are loaded two steps before they are used. Tokens from count on
// are left alone or accumulate what they may: their sums are not written.
// Every thread of the block calls it.
template <typename W, int M, int R>
__device__ void accumulate(const W* w, const int* rows, const float* const* xs, int count, int k, int h,
                           float (&acc)[M][R][TOKENS][8]) {
    __shared__ __align__(16) float chunk[TOKENS][CHUNK];
    bool vector = k % 16 == 0;
    typename W::Raw now[M][R], soon[M][R];
    if (vector) {
        for (int m = 0; m < M; m++) {
            for (int r = 0; r < R; r++) {
                now[m][r] = w[m].load(rows[r], 8 * h);
                if (16 + 8 * h < k) soon[m][r] = w[m].load(rows[r], 16 + 8 * h);
            }
        }
    }
    for (int c0 = 0; c0 < k; c0 += CHUNK) {
        int width = k - c0 < CHUNK ? k - c0 : CHUNK;
        __syncthreads();
        stage(chunk, xs, count, c0, width, vector);
        __syncthreads();
        if (vector) {
#pragma unroll 3
            for (int j0 = 8 * h; j0 < width; j0 += 16) {
                typename W::Raw later[M][R];
                float v[M][R][8];
                for (int m = 0; m < M; m++) {
                    for (int r = 0; r < R; r++) {
                        if (c0 + j0 + 32 < k) later[m][r] = w[m].load(rows[r], c0 + j0 + 32);
                        w[m].expand(now[m][r], v[m][r]);
                        now[m][r] = soon[m][r];
                        soon[m][r] = later[m][r];
                    }
                }
                // Every token, also those past count: the multiply-adds
                // cost less than a branch.
#pragma unroll
                for (int t = 0; t < TOKENS; t++) {
                    const float4* p = (const float4*)&chunk[t][j0];
                    float4 a = p[0], b = p[1];
                    float x[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
                    for (int m = 0; m < M; m++) {
                        for (int r = 0; r < R; r++) {
                            for (int l = 0; l < 8; l++) acc[m][r][t][l] = fmaf(x[l], v[m][r][l], acc[m][r][t][l]);
                        }
                    }
                }
            }
        } else {
            // Widths that are not a multiple of 16: one weight at a time,
            // the last step's lanes past k left out.
            for (int j0 = 8 * h; j0 < width; j0 += 16) {
#pragma unroll
                for (int l = 0; l < 8; l++) {
                    int j = j0 + l;
                    if (j < width) {
                        float v[M][R];
                        for (int m = 0; m < M; m++) {
                            for (int r = 0; r < R; r++) v[m][r] = w[m].at(rows[r], c0 + j);
                        }
#pragma unroll
                        for (int t = 0; t < TOKENS; t++) {
                            if (t < count) {
                                float x = chunk[t][j];
                                for (int m = 0; m < M; m++) {
                                    for (int r = 0; r < R; r++) acc[m][r][t][l] = fmaf(x, v[m][r], acc[m][r][t][l]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

// The 16 lanes of an output added in the fixed tree (8, 4, 2, 1): the first
// level takes the partner's lanes 8..15, the rest is in the thread. Both
// threads of the pair call it; the one with lanes 0..7 gets the sum.
__device__ float tree(const float* a) {
    float s[8];
    for (int l = 0; l < 8; l++) s[l] = a[l] + __shfl_xor_sync(ALL_LANES, a[l], 1);
    for (int l = 0; l < 4; l++) s[l] += s[l + 4];
    for (int l = 0; l < 2; l++) s[l] += s[l + 2];
    return s[0] + s[1];
}

// Block (2 * PAIRS): pair p owns weight row PAIRS * blockIdx.x + p of w1
// and w3. Grid (ceil(n / PAIRS), up to ceil(most rows of a group /
// TOKENS), groups): a block takes every gridDim.y-th run of TOKENS tokens
// of its group. Rows past n repeat the last (their sums are not written),
// so every thread of a warp reaches the shuffles.
template <typename W>
__device__ void gate_up(const Group* groups, const float* __restrict__ x, const int* token, int k, int n, float limit,
                        Tables global, float* __restrict__ act) {
    Tables tables = shared_tables(global.e4m3, global.e2m1, global.e8m0);
    Group g = groups[blockIdx.z];
    W w[2] = {W(g.a, g.a_scales, k, tables), W(g.b, g.b_scales, k, tables)};
    int h = threadIdx.x & 1;
    int row = blockIdx.x * PAIRS + (threadIdx.x >> 1);
    int rows[1] = {row < n ? row : n - 1};
    for (long token0 = (long)blockIdx.y * TOKENS; token0 < (long)g.rows; token0 += (long)gridDim.y * TOKENS) {
        int count = (long)g.rows - token0 < TOKENS ? (int)((long)g.rows - token0) : TOKENS;
        long member0 = (long)g.first + token0;
        const float* xs[TOKENS];
        for (int t = 0; t < TOKENS; t++) xs[t] = x + (long)token[member0 + (t < count ? t : 0)] * k;
        float acc[2][1][TOKENS][8];
        for (int t = 0; t < TOKENS; t++) {
            for (int l = 0; l < 8; l++) acc[0][0][t][l] = acc[1][0][t][l] = 0.0f;
        }
        accumulate<W, 2, 1>(w, rows, xs, count, k, h, acc);
#pragma unroll
        for (int t = 0; t < TOKENS; t++) {
            float gate = tree(acc[0][0][t]), up = tree(acc[1][0][t]);
            if (h == 0 && row < n && t < count) act[(member0 + t) * n + row] = swiglu(gate, up, limit);
        }
    }
}

// As gate_up, for w2, a pair owning DOWN_ROWS rows: each token's output
// row goes, times its route weight, to its contribution's slot.
template <typename W>
__device__ void down(const Group* groups, const float* __restrict__ act, int k, int n, const int* slot,
                     const float* weight, Tables global, float* __restrict__ out) {
    Tables tables = shared_tables(global.e4m3, global.e2m1, global.e8m0);
    Group g = groups[blockIdx.z];
    W w[1] = {W(g.a, g.a_scales, k, tables)};
    int h = threadIdx.x & 1;
    int row0 = (blockIdx.x * PAIRS + (threadIdx.x >> 1)) * DOWN_ROWS;
    int rows[DOWN_ROWS];
    for (int r = 0; r < DOWN_ROWS; r++) rows[r] = row0 + r < n ? row0 + r : n - 1;
    for (long token0 = (long)blockIdx.y * TOKENS; token0 < (long)g.rows; token0 += (long)gridDim.y * TOKENS) {
        int count = (long)g.rows - token0 < TOKENS ? (int)((long)g.rows - token0) : TOKENS;
        long member0 = (long)g.first + token0;
        const float* xs[TOKENS];
        for (int t = 0; t < TOKENS; t++) xs[t] = act + (member0 + (t < count ? t : 0)) * k;
        float acc[1][DOWN_ROWS][TOKENS][8];
        for (int r = 0; r < DOWN_ROWS; r++) {
            for (int t = 0; t < TOKENS; t++) {
                for (int l = 0; l < 8; l++) acc[0][r][t][l] = 0.0f;
            }
        }
        accumulate<W, 1, DOWN_ROWS>(w, rows, xs, count, k, h, acc);
#pragma unroll
        for (int r = 0; r < DOWN_ROWS; r++) {
#pragma unroll
            for (int t = 0; t < TOKENS; t++) {
                float sum = tree(acc[0][r][t]);
                if (h == 0 && row0 + r < n && t < count) {
                    out[(long)slot[member0 + t] * n + row0 + r] = sum * weight[member0 + t];
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
