/*
 * Shared-memory bank conflicts and global-memory sectors without a GPU: the kernels' source
 * under the CUDA emulation, compiled with the compiler's load and store hooks
 * (-fsanitize=kernel-address, no sanitizer runtime) over the runtime built with
 * MRA_EMULATION_MEMORY_COUNTS, which counts each shared-memory instruction's wavefronts and each
 * global one's 32-byte sectors as Nsight Compute does (memoryCounts.cpp says how).
 *
 *   mra_emulation_memory_counts patterns     small kernels whose counts the CUDA guide's rules give
 *   mra_emulation_memory_counts attention    the attention on small problems, every kernel and dtype
 *   mra_emulation_memory_counts overrun      a kernel reading 4 bytes named an overrun: the launch
 *                                            fails, and the program exits 1 naming them
 *   mra_emulation_memory_counts profile      tools/kernel_profile.py's case at batch 1, whose
 *                                            shared-memory table tools/gpu_session.sh saves on a GPU
 *
 * Prints one line per instruction ("<shared|global> <offset> <load|store> <bytes> <requests>
 * <wavefronts or sectors> <ideal> <worst>"; addr2line -f -C -i -e this program <offset> names
 * its source), then "ran <what>". tools/memory_counts.py reads it; tests/test_cuda_memory_counts.py
 * runs it. Any access by the kernels to memory named an overrun (the gaps between the workspace's
 * sections, emu::setFaultNames) fails the launch, reads included.
 */
#include "attentionCall.h"
#include "ptxMma.h"

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

extern "C" void mraCudaEmulationTakeCounts(FILE* out);
extern "C" void mraCudaEmulationCountGlobal(void const* start, size_t bytes);
extern "C" void mraCudaEmulationSetMultiprocessors(uint32_t count);

namespace
{

// ---- patterns: one warp, one instruction under test each ----------------------------------------

//! Every pattern's memory, shared or global: lane 31's furthest access lies within 33 vectors of
//! 16 bytes a lane.
constexpr size_t kPatternBytes = 32 * 33 * 16;

//! Lane l loads word kStride * l (0: every lane the same word).
template <int kStride>
__global__ void loadWords(float* out)
{
    auto const* words = reinterpret_cast<float const*>(::emu::dynamicSharedMemory());
    out[threadIdx.x] = words[kStride * threadIdx.x];
}

//! Lane l stores word kStride * l.
template <int kStride>
__global__ void storeWords(float*)
{
    auto* words = reinterpret_cast<float*>(::emu::dynamicSharedMemory());
    words[kStride * threadIdx.x] = 1.0f;
}

//! Lane l loads byte l.
__global__ void loadBytes(float* out)
{
    auto const* bytes = reinterpret_cast<unsigned char const*>(::emu::dynamicSharedMemory());
    out[threadIdx.x] = bytes[threadIdx.x];
}

//! Lane l loads the 8-byte double l.
__global__ void loadDoubles(float* out)
{
    auto const* doubles = reinterpret_cast<double const*>(::emu::dynamicSharedMemory());
    out[threadIdx.x] = static_cast<float>(doubles[threadIdx.x]);
}

//! Lane l loads the 16-byte float4 kStride * l.
template <int kStride>
__global__ void loadVectors(float* out)
{
    auto const* vectors = reinterpret_cast<float4 const*>(::emu::dynamicSharedMemory());
    float4 const v = vectors[kStride * threadIdx.x];
    out[threadIdx.x] = v.x + v.w;
}

//! ldmatrix.x4 of four 8x8 matrices of 16-bit elements stacked in rows kRowElements apart: lane l
//! gives row l of that stack.
template <int kRowElements>
__global__ void loadMatrixRows(float* out)
{
    uint32_t r[4];
    ::emu::ldmatrixX4(__FILE__, __LINE__, r, ::emu::dynamicSharedMemory() + 2 * kRowElements * threadIdx.x, false);
    out[threadIdx.x] = static_cast<float>(r[0] & 1u);
}

//! cp.async of 16 bytes to the float4 kStride * l.
template <int kStride>
__global__ void copyVectors(float const* in)
{
    ::emu::asyncCopy(__FILE__, __LINE__, ::emu::dynamicSharedMemory() + 16 * kStride * threadIdx.x, in, 16, 16);
    ::emu::asyncCommit();
    ::emu::asyncWait(0);
}

//! Lane l loads global float kStride * l.
template <int kStride>
__global__ void loadGlobalWords(float const* in, float* out)
{
    out[threadIdx.x] = in[kStride * threadIdx.x];
}

//! Lane l loads the global float4 l, kOffset floats past a 128-byte boundary.
template <int kOffset>
__global__ void loadGlobalVectors(float const* in, float* out)
{
    float4 const v = reinterpret_cast<float4 const*>(in + kOffset)[threadIdx.x];
    out[threadIdx.x] = v.x + v.w;
}

//! Lane l stores global float kStride * l.
template <int kStride>
__global__ void storeGlobalWords(float const*, float* out)
{
    out[kStride * threadIdx.x] = 1.0f;
}

//! One warp of `kernel(in, out)` on 128-byte aligned buffers both counted as global memory.
template <typename Kernel>
void launchGlobal(Kernel kernel)
{
    alignas(128) static float in[kPatternBytes / sizeof(float)];
    alignas(128) static float out[kPatternBytes / sizeof(float)];
    mraCudaEmulationCountGlobal(in, sizeof(in));
    mraCudaEmulationCountGlobal(out, sizeof(out));
    kernel | ::emu::Launch(1, 32, 0) | ::emu::args(static_cast<float const*>(in), static_cast<float*>(out));
    mraCudaEmulationCountGlobal(nullptr, 0);
}

//! One thread reads float `index` of `in`.
__global__ void readFloat(float const* in, float* out, int index)
{
    out[0] = in[index];
}

//! Float 1 of a buffer of 4, the last 3 named an overrun as the workspace's gaps are.
void readPastABuffersFloat()
{
    alignas(16) static float cells[4] = {};
    static float out[1];
    ::emu::setFaultNames({{cells + 1, 3 * sizeof(float), "past the one float of a test buffer", true}});
    readFloat | ::emu::Launch(1, 1, 0) | ::emu::args(static_cast<float const*>(cells), static_cast<float*>(out), 1);
    ::emu::setFaultNames({});
}

//! One warp of `kernel(buffer)` with the patterns' shared memory; `buffer`, 64 floats, is where
//! the loads write what they read and where the copies read from.
template <typename Kernel>
void launchWarp(Kernel kernel)
{
    std::vector<float> buffer(64, 0.5f);
    kernel | ::emu::Launch(1, 32, kPatternBytes) | ::emu::args(buffer.data());
}

void runPatterns()
{
    launchWarp(loadWords<0>);
    launchWarp(loadWords<1>);
    launchWarp(loadWords<2>);
    launchWarp(loadWords<32>);
    launchWarp(loadWords<33>);
    launchWarp(storeWords<2>);
    launchWarp(loadBytes);
    launchWarp(loadDoubles);
    launchWarp(loadVectors<1>);
    launchWarp(loadVectors<2>);
    launchWarp(loadMatrixRows<64>);
    launchWarp(loadMatrixRows<72>);
    launchWarp(copyVectors<1>);
    launchWarp(copyVectors<8>);
    launchGlobal(loadGlobalWords<0>);
    launchGlobal(loadGlobalWords<1>);
    launchGlobal(loadGlobalWords<2>);
    launchGlobal(loadGlobalWords<8>);
    launchGlobal(loadGlobalVectors<0>);
    launchGlobal(loadGlobalVectors<4>);
    launchGlobal(storeGlobalWords<32>);
}

// ---- the attention --------------------------------------------------------------------------------

//! One call (checks::runAttention) on `multiprocessors` emulated SMs, its buffers counted as
//! global memory; false on failure.
bool runCounted(MraAttentionParams const& params, int32_t realTokens, uint32_t seed, uint32_t multiprocessors)
{
    mraCudaEmulationSetMultiprocessors(multiprocessors);
    bool const ran = checks::runAttention(params, realTokens, seed, [](checks::Spans const& buffers) {
        for (auto const& [start, bytes] : buffers)
        {
            mraCudaEmulationCountGlobal(start, bytes);
        }
    });
    mraCudaEmulationCountGlobal(nullptr, 0);
    return ran;
}

//! Every kernel at least once: each dtype (the tensor-core kernels for 16-bit, FMA for float32),
//! head sizes 32, 64 and 128, both modes, both layouts, a ragged batch; the selection in clusters
//! (132 SMs and rows of more than 512 cells: the 1024-token one there) and in CTAs alone; the
//! high-resolution kernels split over two thread groups (few query blocks for the GPU's SMs) and
//! not (32 a row on one SM).
bool runAttentionProblems()
{
    struct Problem
    {
        MraAttentionParams params;
        int32_t realTokens;
        uint32_t multiprocessors;
    };
    Problem const problems[] = {
        {{1, 2, 256, 64, 8, 32, MRA_SPARSE, 0, 0, MRA_FLOAT16, MRA_BHSD}, 256, 132},
        {{1, 2, 256, 64, 8, 32, MRA_FULL, 1, 1, MRA_BFLOAT16, MRA_BHSD}, 256, 3},
        {{2, 1, 200, 32, 7, 32, MRA_FULL, 0, 0, MRA_FLOAT16, MRA_BHSD}, 150, 1},
        {{1, 1, 256, 128, 8, 32, MRA_FULL, 0, 0, MRA_FLOAT16, MRA_BHSD}, 256, 132},
        {{1, 2, 256, 64, 8, 32, MRA_SPARSE, 0, 0, MRA_FLOAT32, MRA_BHSD}, 256, 132},
        {{2, 1, 200, 32, 7, 32, MRA_FULL, 0, 0, MRA_FLOAT32, MRA_BHSD}, 150, 1},
        {{1, 1, 256, 128, 8, 32, MRA_FULL, 0, 0, MRA_FLOAT32, MRA_BHSD}, 256, 3},
        {{2, 2, 1024, 64, 8, 32, MRA_FULL, 1, 0, MRA_FLOAT16, MRA_BHSD}, 700, 1},
        {{1, 2, 1024, 32, 8, 32, MRA_SPARSE, 0, 0, MRA_FLOAT16, MRA_BHSD}, 1024, 1},
        {{1, 2, 1024, 128, 8, 32, MRA_FULL, 0, 0, MRA_BFLOAT16, MRA_BHSD}, 1024, 1},
        {{1, 2, 1024, 64, 8, 32, MRA_FULL, 0, 0, MRA_FLOAT32, MRA_BHSD}, 1024, 1},
        {{1, 2, 1024, 32, 8, 32, MRA_FULL, 0, 0, MRA_FLOAT32, MRA_BHSD}, 1024, 1},
        // [batch, tokens, heads, head_dim], as the patched model's projections lie (rows of one
        // head heads * head_dim apart)
        {{1, 4, 1024, 64, 8, 32, MRA_FULL, 0, 0, MRA_FLOAT16, MRA_BSHD}, 1024, 1},
        {{1, 4, 1024, 64, 8, 32, MRA_SPARSE, 0, 0, MRA_FLOAT32, MRA_BSHD}, 1024, 132}, // selection clusters of 2
        // The tensor-core kernels' other instantiations (tools/sass_accesses.py compares each
        // kernel nvcc compiles), the selection's 16-byte reads of a row's logits (64 blocks:
        // 8 cells a thread) and its cells past the 32 a thread caches (192 blocks).
        {{1, 1, 256, 32, 8, 32, MRA_FULL, 0, 0, MRA_BFLOAT16, MRA_BHSD}, 256, 132},
        {{1, 1, 256, 128, 8, 32, MRA_FULL, 0, 0, MRA_BFLOAT16, MRA_BHSD}, 256, 132},
        {{1, 1, 1024, 128, 8, 32, MRA_FULL, 0, 0, MRA_FLOAT16, MRA_BHSD}, 1024, 1},
        {{1, 1, 2048, 64, 8, 32, MRA_FULL, 0, 0, MRA_BFLOAT16, MRA_BHSD}, 2048, 1},
        {{1, 1, 6144, 32, 8, 32, MRA_SPARSE, 0, 0, MRA_BFLOAT16, MRA_BHSD}, 6144, 1},
    };
    uint32_t seed = 1;
    for (Problem const& problem : problems)
    {
        if (!runCounted(problem.params, problem.realTokens, seed++, problem.multiprocessors))
        {
            return false;
        }
    }
    return true;
}

//! tools/kernel_profile.py's first case (fp16, 12 heads, head_dim 64, 4096 tokens, 8 blocks a
//! row in mode "full", [batch, heads, tokens, head_dim]) at batch 1, on an H100's or H200's 132
//! SMs: what the GPU session's ncu section profiles, to hold these counts to Nsight Compute's.
bool runProfileCase()
{
    MraAttentionParams const params{1, 12, 4096, 64, 8 * 4096 / 32, 32, MRA_FULL, 0, 0, MRA_FLOAT16, MRA_BHSD};
    return runCounted(params, params.seq_len, 1, 132);
}

} // namespace

int main(int argc, char** argv)
{
    std::string const what = argc == 2 ? argv[1] : "";
    if (what == "patterns")
    {
        runPatterns();
    }
    else if (what == "profile")
    {
        if (!runProfileCase())
        {
            return 1;
        }
    }
    else if (what == "overrun")
    {
        readPastABuffersFloat();
    }
    else if (what == "attention")
    {
        if (!runAttentionProblems())
        {
            return 1;
        }
    }
    else
    {
        std::fprintf(stderr, "usage: mra_emulation_memory_counts patterns | attention | overrun | profile\n");
        return 2;
    }
    cudaError_t const error = cudaGetLastError();
    if (error != cudaSuccess)
    {
        std::fprintf(stderr, "launch failed: %s\n", cudaGetErrorString(error));
        return 1;
    }
    mraCudaEmulationTakeCounts(stdout);
    std::printf("ran %s\n", what.c_str());
    return 0;
}
