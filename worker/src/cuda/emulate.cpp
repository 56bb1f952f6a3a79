// The CUDA kernels of experts.cu run on the CPU: every thread of a block is
// an OS thread, and warp shuffles exchange values through a barrier, as a
// half-warp's do. worker/src/cuda/emulate.rs compiles this with the
// kernels' source (as NVRTC gets it, the F16 conversion's PTX aside) and
// checks its outputs against the CPU backend's kernels, bit for bit: the
// kernels' indexing, expansion and order are checked where there is no GPU.
//
// Usage: emulate DIR N K K4 (the files emulate.rs writes to DIR).
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

struct Dim {
    unsigned x = 1, y = 1, z = 1;
};
thread_local Dim threadIdx, blockIdx;
static Dim blockDim;
#define __global__
#define __device__
#define __restrict__
static inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static inline float half_to_float(unsigned short h) {
    _Float16 v;
    std::memcpy(&v, &h, 2);
    return (float)v;
}
static std::barrier<>* block_barrier;
static float exchange[1024];
static float __shfl_down_sync(unsigned, float v, int delta, int width) {
    unsigned id = threadIdx.x + threadIdx.y * blockDim.x;
    exchange[id] = v;
    block_barrier->arrive_and_wait();
    int lane = id % 32 % width;
    float got = lane + delta < width ? exchange[id + delta] : v;
    block_barrier->arrive_and_wait();
    return got;
}
#include "experts.cu"

template <class F> static void launch(Dim grid, Dim block, F kernel) {
    blockDim = block;
    for (unsigned by = 0; by < grid.y; by++) {
        for (unsigned bx = 0; bx < grid.x; bx++) {
            std::barrier<> barrier(block.x * block.y);
            block_barrier = &barrier;
            std::vector<std::thread> threads;
            for (unsigned ty = 0; ty < block.y; ty++) {
                for (unsigned tx = 0; tx < block.x; tx++) {
                    threads.emplace_back([=] {
                        threadIdx = {tx, ty, 0};
                        blockIdx = {bx, by, 0};
                        kernel();
                    });
                }
            }
            for (auto& t : threads) t.join();
        }
    }
}

static std::string dir;
template <class T> static std::vector<T> load(const std::string& name) {
    std::ifstream file(dir + "/" + name, std::ios::binary);
    std::vector<char> bytes((std::istreambuf_iterator<char>(file)), {});
    std::vector<T> v(bytes.size() / sizeof(T));
    std::memcpy(v.data(), bytes.data(), bytes.size());
    return v;
}

static int failures = 0;
static void check(const std::string& what, const std::vector<float>& got, const std::string& expected) {
    auto want = load<float>(expected);
    size_t same = 0;
    for (size_t i = 0; i < want.size() && i < got.size(); i++) same += std::memcmp(&got[i], &want[i], 4) == 0;
    bool ok = same == want.size() && got.size() == want.size();
    printf("%s: %zu of %zu bit-identical\n", what.c_str(), same, want.size());
    failures += !ok;
}

int main(int argc, char** argv) {
    if (argc != 5) return 2;
    dir = argv[1];
    int n = std::stoi(argv[2]), k = std::stoi(argv[3]), k4 = std::stoi(argv[4]);
    auto x = load<float>("x"), x4 = load<float>("x4");
    auto f32 = load<float>("f32"), e4m3 = load<float>("e4m3"), e2m1 = load<float>("e2m1"), e8m0 = load<float>("e8m0");
    auto bf16 = load<unsigned short>("bf16"), f16 = load<unsigned short>("f16");
    auto fp8 = load<unsigned char>("fp8"), fp4 = load<unsigned char>("fp4"), fp4_scales = load<unsigned char>("fp4_scales");
    auto fp8_scales = load<float>("fp8_scales");
    for (int rows : {1, 3, 13}) {
        Dim grid{(unsigned)(n + 15) / 16, (unsigned)(rows + 7) / 8, 1}, block{16, 16, 1};
        std::vector<float> y(rows * n);
        auto run = [&](const char* format, auto kernel) {
            std::fill(y.begin(), y.end(), NAN);
            launch(grid, block, kernel);
            check(std::string(format) + ", " + std::to_string(rows) + " rows", y, std::string(format) + "_" + std::to_string(rows));
        };
        run("f32", [&] { matmul_f32(x.data(), rows, f32.data(), n, k, y.data()); });
        run("bf16", [&] { matmul_bf16(x.data(), rows, bf16.data(), n, k, y.data()); });
        run("f16", [&] { matmul_f16(x.data(), rows, f16.data(), n, k, y.data()); });
        run("fp8", [&] { matmul_fp8(x.data(), rows, fp8.data(), fp8_scales.data(), e4m3.data(), n, k, y.data()); });
        run("fp4", [&] { matmul_fp4(x4.data(), rows, fp4.data(), fp4_scales.data(), e2m1.data(), e8m0.data(), n, k4, y.data()); });
    }
    auto gate = load<float>("gate"), up = load<float>("up");
    long len = gate.size();
    launch(Dim{(unsigned)(len + 255) / 256, 1, 1}, Dim{256, 1, 1}, [&] { swiglu(gate.data(), up.data(), len, 7.0f); });
    check("swiglu", gate, "swiglu");
    auto y = load<float>("y"), weight = load<float>("weight");
    auto slot = load<int>("slot");
    int members = slot.size(), width = y.size() / members;
    std::vector<float> out(members * width, NAN);
    launch(Dim{(unsigned)(members * width + 255) / 256, 1, 1}, Dim{256, 1, 1},
           [&] { weigh(y.data(), slot.data(), weight.data(), members, width, out.data()); });
    check("weigh", out, "weighed");
    return failures ? 1 : 0;
}
