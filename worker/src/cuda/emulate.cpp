// The CUDA kernels of experts.cu run on the CPU: every thread of a block is
// an OS thread, warp shuffles exchange values through a barrier, and shared
// memory is a static array the block's threads share (blocks run one after
// another). worker/src/cuda/emulate.rs compiles this with the
// kernels' source (as NVRTC gets it, the F16 conversion's PTX aside), lays
// out a batch with the backend's own code and checks the contributions
// against the CPU backend's, bit for bit: the kernels' indexing, expansion
// and order, and the batch layout, are checked where there is no GPU.
//
// Usage: emulate DIR CASE, with DIR/CASE holding what emulate.rs writes:
//   plan:     "hidden inter limit-bits members slots x_at token_at slot_at
//             weight_at", then a
//             line "kind format first grid.x grid.y grid.z block.x block.y"
//             per launch (its table's first entry, and its dimensions as
//             the backend computes them);
//   image:    the experts' weights (the tables' addresses are offsets in it);
//   upload:   the batch's upload;
//   expected: the CPU backend's contributions.
// and DIR holding the value tables e4m3, e2m1 and e8m0.
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

struct Dim {
    unsigned x = 1, y = 1, z = 1;
};
thread_local Dim threadIdx, blockIdx;
static Dim blockDim, gridDim;
#define __global__
#define __device__
#define __restrict__
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
static inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
static inline float half_to_float(unsigned short h) {
    _Float16 v;
    std::memcpy(&v, &h, 2);
    return (float)v;
}
static std::barrier<>* block_barrier;
static float exchange[1024];
static void __syncthreads() { block_barrier->arrive_and_wait(); }
static float __shfl_xor_sync(unsigned, float v, int mask) {
    unsigned id = threadIdx.x + threadIdx.y * blockDim.x;
    exchange[id] = v;
    __syncthreads();
    float got = exchange[id ^ mask];
    __syncthreads();
    return got;
}
#include "experts.cu"

template <class F> static void launch(Dim grid, Dim block, F kernel) {
    blockDim = block;
    gridDim = grid;
    for (unsigned bz = 0; bz < grid.z; bz++) {
        for (unsigned by = 0; by < grid.y; by++) {
            for (unsigned bx = 0; bx < grid.x; bx++) {
                std::barrier<> barrier(block.x * block.y);
                block_barrier = &barrier;
                std::vector<std::thread> threads;
                for (unsigned ty = 0; ty < block.y; ty++) {
                    for (unsigned tx = 0; tx < block.x; tx++) {
                        threads.emplace_back([=] {
                            threadIdx = {tx, ty, 0};
                            blockIdx = {bx, by, bz};
                            kernel();
                        });
                    }
                }
                for (auto& t : threads) t.join();
            }
        }
    }
}

template <class T> static std::vector<T> load(const std::string& path) {
    std::ifstream file(path, std::ios::binary);
    std::vector<char> bytes((std::istreambuf_iterator<char>(file)), {});
    std::vector<T> v((bytes.size() + sizeof(T) - 1) / sizeof(T));
    std::memcpy(v.data(), bytes.data(), bytes.size());
    return v;
}

typedef void GateUp(const Group*, const float*, const int*, int, int, float, const float*, const float*, const float*,
                    float*);
typedef void Down(const Group*, const float*, int, int, const int*, const float*, const float*, const float*,
                  const float*, float*);

int main(int argc, char** argv) {
    if (argc != 3) return 2;
    std::string dir = argv[1], cases = dir + "/" + argv[2] + "/";
    std::map<std::string, GateUp*> gate_up = {{"f32", gate_up_f32}, {"bf16", gate_up_bf16}, {"f16", gate_up_f16},
                                              {"fp8", gate_up_fp8}, {"fp4", gate_up_fp4}};
    std::map<std::string, Down*> down = {
        {"f32", down_f32}, {"bf16", down_bf16}, {"f16", down_f16}, {"fp8", down_fp8}, {"fp4", down_fp4}};
    auto e4m3 = load<float>(dir + "/e4m3"), e2m1 = load<float>(dir + "/e2m1"), e8m0 = load<float>(dir + "/e8m0");
    // Both 8-byte aligned, as the GPU's buffers are.
    auto image = load<u64>(cases + "image"), upload = load<u64>(cases + "upload");
    auto* input = (unsigned char*)upload.data();
    std::ifstream plan(cases + "plan");
    int hidden, inter, members, slots;
    unsigned limit_bits;
    long x_at, token_at, slot_at, weight_at;
    plan >> hidden >> inter >> limit_bits >> members >> slots >> x_at >> token_at >> slot_at >> weight_at;
    float limit = __uint_as_float(limit_bits);
    auto* x = (const float*)(input + x_at);
    auto* token = (const int*)(input + token_at);
    std::vector<float> act((size_t)members * inter, NAN), out((size_t)slots * hidden, NAN);
    std::string kind, format;
    long first;
    Dim grid, block;
    while (plan >> kind >> format >> first >> grid.x >> grid.y >> grid.z >> block.x >> block.y) {
        auto* groups = (Group*)(input + first * sizeof(Group));
        for (unsigned g = 0; g < grid.z; g++) {
            for (u64* p : {&groups[g].a, &groups[g].a_scales, &groups[g].b, &groups[g].b_scales}) {
                *p += (u64)image.data();
            }
        }
        if (kind == "gate_up") {
            launch(grid, block, [&] {
                gate_up[format](groups, x, token, hidden, inter, limit, e4m3.data(), e2m1.data(), e8m0.data(),
                                act.data());
            });
        } else {
            auto* slot = (const int*)(input + slot_at);
            auto* weight = (const float*)(input + weight_at);
            launch(grid, block, [&] {
                down[format](groups, act.data(), inter, hidden, slot, weight, e4m3.data(), e2m1.data(), e8m0.data(),
                             out.data());
            });
        }
    }
    auto want = load<float>(cases + "expected");
    size_t same = 0;
    for (size_t i = 0; i < want.size() && i < out.size(); i++) same += std::memcmp(&out[i], &want[i], 4) == 0;
    printf("%s: %zu of %zu bit-identical\n", argv[2], same, want.size());
    return same == want.size() && out.size() == want.size() ? 0 : 1;
}
