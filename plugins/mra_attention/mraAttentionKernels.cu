/*
 * CUDA kernels of the MRA attention plugin (mraAttention.h), stage by stage like the CPU twin
 * (mraAttentionReference.cpp):
 *   (a) blockMeans, lowResolutionLogits: real tokens per block, block means and low-resolution
 *       logits;
 *   (b) selectBlocks: row max, masking and priors (selectionScore), then a radix select of the
 *       k-th largest score and a scan that takes ties in flat order; on sm_90 a row's cells
 *       are split over a thread-block cluster of up to 8 CTAs where rows alone would leave the
 *       GPU idle and the row has more cells than a CTA has threads (SelectionCluster);
 *   (c) highResolutionMma (fp16/bf16: tensor cores, mma.sync.m16n8k16, fp32 accumulation, sm_80
 *       and later) and highResolutionFma (fp32): per (batch * head, query block), a loop over
 *       that row's selected key blocks with an online (FlashAttention-style) running max, 32x32
 *       scores, exp and P.V accumulation in registers; no S x S or nb x nb x 32 x 32 tensor in
 *       global memory;
 *   (d) lowResolutionTerms (mode "full"), then the epilogue of (c): the 1e-3-quantised row max,
 *       the low-resolution term and the correction.
 * Everything runs on the caller's stream, uses only the workspace, and reports launch errors;
 * on sm_90 the kernels after (a)'s first are programmatic dependent launches (launchKernel).
 */
#include "mraAttention.h"
#include "mraAttentionCommon.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#ifdef MRA_CUDA_EMULATION_H
#include "ptxMma.h" // the CPU emulation's mma.sync (plugins/tests/cuda_emulation)
#endif

#include <cub/block/block_scan.cuh>
#include <cooperative_groups.h>

#include <cfloat>
#include <cstdint>
#include <cstdio>
#include <map>
#include <mutex>
#include <type_traits>

// Loops over register arrays (fragments, accumulators) are unrolled so that the arrays stay in
// registers: indexed at run time they would live in local memory. Some others are, for fewer
// instructions (each says why). The emulation has no pragma.
#ifdef MRA_CUDA_EMULATION_H
#define MRA_UNROLL
#else
#define MRA_UNROLL _Pragma("unroll")
#endif

namespace mra
{
namespace
{

constexpr int kBlock = 32;           // tokens per block: the kernels are written for 32
// highResolution: 4 warps hold one query block, warp w its rows 8w..8w+7 (4 threads per row).
constexpr int kHighResThreads = 128;
constexpr int kSelectThreads = 512;
constexpr int kLogitThreads = 128;
constexpr int kLogitQueryBlocks = 8; // query blocks per lowResolutionLogits CTA
constexpr int kMaxHeadDim = 128;

// The tensor-core kernel's key-block stages (MmaSmem), with one group of 2 warps a CTA and with
// several (each has its own: 2 keep head_dim 128 within sm_86's 99 KB); a build may set others
// for an A/B.
#ifndef MRA_MMA_STAGES
#define MRA_MMA_STAGES 3
#endif
#ifndef MRA_MMA_SPLIT_STAGES
#define MRA_MMA_SPLIT_STAGES 2
#endif

// The thread groups a high-resolution CTA splits its query block's key blocks over where it
// splits (launchHighResolution): below MRA_SPLIT_BELOW_WAVES waves of unsplit CTAs. For A/B
// builds: MRA_SPLIT=1 never splits, as before; a large MRA_SPLIT_BELOW_WAVES always does.
#ifndef MRA_SPLIT
#define MRA_SPLIT 2
#endif
#ifndef MRA_SPLIT_BELOW_WAVES
#define MRA_SPLIT_BELOW_WAVES 3
#endif

// The CTAs an SM ptxas must fit the split tensor-core kernel at head_dim 64 in on sm_90 (its
// launch bounds' minimum), for an A/B build: 0, the default, leaves ptxas its own choice, 103
// registers and 4 CTAs an SM, though its shared memory allows 5 (tools/occupancy.py). 5 holds it
// to 96 registers, and ptxas then spills 16 bytes (docs/gpu.md).
#ifndef MRA_MMA_SPLIT_MIN_CTAS
#define MRA_MMA_SPLIT_MIN_CTAS 0
#endif

// The 16-bit kernels' lazy softmax base (SoftmaxArithmetic::kTensorCore); 0 for an A/B build
// whose base is always the real keys' maximum, as before (docs/gpu.md: a lazy base costs 16-bit
// results some accuracy, within their tolerances).
#ifndef MRA_LAZY_SOFTMAX_BASE
#define MRA_LAZY_SOFTMAX_BASE 1
#endif

// Programmatic dependent launches (waitForPreviousKernel); 0 for an A/B build without them.
#ifndef MRA_DEPENDENT_LAUNCH
#define MRA_DEPENDENT_LAUNCH 1
#endif

// The most CTAs selectBlocks splits a row over (SelectionCluster; 8 is CUDA's portable cluster
// limit); 1 for an A/B build with one CTA per row, as before clusters.
#ifndef MRA_SELECT_CLUSTER
#define MRA_SELECT_CLUSTER 8
#endif

// selectBlocks' CTAs per row no more than shorten its threads' runs of cells
// (selectionClusterSize); 0 for an A/B build sized by the SMs alone, as before 2026-12-07.
#ifndef MRA_SELECT_CLUSTER_BY_CELLS
#define MRA_SELECT_CLUSTER_BY_CELLS 1
#endif

// Thread-block clusters and their distributed shared memory: sm_90 and later (and the emulation).
#if defined(MRA_CUDA_EMULATION_H) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
#define MRA_HAS_CLUSTERS 1
#else
#define MRA_HAS_CLUSTERS 0
#endif

//! lowResolutionLogits' CTAs per row: the launch and the kernel agree on it through this.
__host__ __device__ inline int32_t logitQueryGroups(int32_t nb)
{
    return (nb + kLogitQueryBlocks - 1) / kLogitQueryBlocks;
}

thread_local char gLastCudaError[256] = "";

//! Q, K, V and the output are read and written in 16-byte vectors (uint4).
bool isVectorAligned(void const* pointer)
{
    return reinterpret_cast<std::uintptr_t>(pointer) % 16 == 0;
}

// ---- programmatic dependent launch (sm_90 and later) ----------------------------------------
//
// Every kernel after blockMeans is launched as a programmatic dependent of the one before it
// (launchKernel): it may start while that one's last CTAs still run, does what needs none of
// its output, and waits in waitForPreviousKernel until that kernel has completed and its writes
// are visible. The launch, the CTAs' start and the query tile's copies then overlap the previous
// kernel's tail instead of following it. Each kernel with a successor lets it launch as it
// starts (startNextKernel): the successor's CTAs wait, so no read is early. Where the GPU, the
// code it runs or the launch has no such dependency, both return at once
// (DeviceCode::sm90). blockMeans, whose inputs come from the caller's kernels, starts
// after them as any launch does.

//! Returns once the kernel launched before this one on the stream has completed and its writes
//! are visible. Every thread of a dependent kernel calls it before reading what that kernel wrote
//! (and so before exiting: a kernel completes only after the one it depends on, in turn).
__device__ inline void waitForPreviousKernel()
{
#ifdef MRA_CUDA_EMULATION_H
    ::emu::gridDependencyWait();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

//! Lets the next kernel on the stream, if it is a programmatic dependent, launch now.
__device__ inline void startNextKernel()
{
#if !defined(MRA_CUDA_EMULATION_H) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// ---- storage types -------------------------------------------------------------------------

template <typename T>
struct Storage;

template <>
struct Storage<float>
{
    __device__ static float toFloat(float x) { return x; }
    __device__ static float fromFloat(float x) { return x; }
};

template <>
struct Storage<__half>
{
    __device__ static float toFloat(__half x) { return __half2float(x); }
    __device__ static __half fromFloat(float x) { return __float2half_rn(x); }
};

template <>
struct Storage<__nv_bfloat16>
{
    __device__ static float toFloat(__nv_bfloat16 x) { return __bfloat162float(x); }
    __device__ static __nv_bfloat16 fromFloat(float x) { return __float2bfloat16_rn(x); }
};

__device__ inline bool isReal(Problem const& p, int32_t const* mask, int32_t batch, int32_t position)
{
    return position < p.seqLen && mask[static_cast<size_t>(batch) * p.seqLen + position] != 0;
}

//! Bit t set where token t of `block` is real; called by a whole warp (lane t reads token t).
__device__ inline uint32_t realTokenBits(Problem const& p, int32_t const* mask, int32_t batch, int32_t block)
{
    return __ballot_sync(0xffffffffu, isReal(p, mask, batch, block * kBlock + threadIdx.x % 32));
}

//! `combine` of `value` over the kLanes threads of one query row (kLanes adjacent lanes of a
//! warp, aligned), by butterfly shuffles: every lane gets the result.
template <int kLanes, typename Combine>
__device__ inline float rowReduceOver(float value, Combine combine)
{
    MRA_UNROLL
    for (int32_t offset = 1; offset < kLanes; offset *= 2)
    {
        value = combine(value, __shfl_xor_sync(0xffffffffu, value, offset));
    }
    return value;
}

template <int kLanes>
__device__ inline float rowMaxOver(float value)
{
    return rowReduceOver<kLanes>(value, [](float a, float b) { return fmaxf(a, b); });
}

template <int kLanes>
__device__ inline float rowSumOver(float value)
{
    return rowReduceOver<kLanes>(value, [](float a, float b) { return a + b; });
}

// ---- (a) block means and low-resolution logits -----------------------------------------------

//! blockMeans' threads for head_dim D: one per (tensor, 16-byte vector of a token's D values)
//! of Q, K and V, rounded up to whole warps (the mask's ballot takes a whole warp).
template <typename T>
constexpr int32_t meanThreads(int32_t headDim)
{
    return (3 * headDim / (16 / static_cast<int32_t>(sizeof(T))) + 31) / 32 * 32;
}

//! One CTA per (row, block): block means of the masked Q, K, V, sums in token order over
//! c + 1e-6, c the block's real tokens, which the CTAs of head 0 also write to `counts` for the
//! kernels after. Thread x sums vector x % (D / kVector) of tensor x / (D / kVector), so each
//! load is 16 bytes; each dimension's sum keeps its token order (the C++ twin's bits).
template <typename T>
__global__ void blockMeans(Problem p, T const* query, T const* key, T const* value, int32_t const* mask,
    float* counts, float* queryMean, float* keyMean, float* valueMean)
{
    constexpr int32_t kVector = 16 / sizeof(T);
    startNextKernel();
    int32_t const block = blockIdx.x % p.nb;
    int32_t const row = blockIdx.x / p.nb;
    // Each warp reads the block's 32 mask entries once, instead of every thread reading each.
    uint32_t const real = realTokenBits(p, mask, row / p.heads, block);
    float const count = static_cast<float>(__popc(real));
    if (row % p.heads == 0 && threadIdx.x == 0)
    {
        counts[(row / p.heads) * p.nb + block] = count;
    }
    int32_t const vectors = p.headDim / kVector;
    int32_t const tensor = threadIdx.x / vectors;
    if (tensor >= 3)
    {
        return; // the last warp's spare lanes
    }
    int32_t const d = (threadIdx.x % vectors) * kVector;
    T const* const source = (tensor == 0 ? query : tensor == 1 ? key : value) + tokenOffset(p, row, block * kBlock) + d;
    size_t const stride = p.tokenStride;
    union Token
    {
        uint4 raw;
        T values[kVector];
    };
    float sums[kVector] = {};
    // kInFlight tokens' loads issued together (only real tokens are read: past the sequence
    // there is no memory), then added in token order.
    constexpr int32_t kInFlight = 8;
    auto const isRealToken = [real](int32_t token) { return ((real >> token) & 1u) != 0; };
    for (int32_t first = 0; first < kBlock; first += kInFlight)
    {
        Token tokens[kInFlight];
        MRA_UNROLL
        for (int32_t u = 0; u < kInFlight; ++u)
        {
            tokens[u].raw = isRealToken(first + u) ? *reinterpret_cast<uint4 const*>(source + (first + u) * stride)
                                                   : make_uint4(0, 0, 0, 0);
        }
        MRA_UNROLL
        for (int32_t u = 0; u < kInFlight; ++u)
        {
            if (isRealToken(first + u))
            {
                MRA_UNROLL
                for (int32_t e = 0; e < kVector; ++e)
                {
                    sums[e] += Storage<T>::toFloat(tokens[u].values[e]);
                }
            }
        }
    }
    float const denominator = count + kNormaliserEps;
    float* const mean = (tensor == 0 ? queryMean : tensor == 1 ? keyMean : valueMean)
        + (static_cast<size_t>(row) * p.nb + block) * p.headDim + d;
    MRA_UNROLL
    for (int32_t e = 0; e < kVector; e += 4)
    {
        *reinterpret_cast<float4*>(mean + e) = make_float4(
            sums[e] / denominator, sums[e + 1] / denominator, sums[e + 2] / denominator, sums[e + 3] / denominator);
    }
}

//! One CTA per (row, group of kLogitQueryBlocks query blocks i), a thread per key block j:
//! L[i, j] = Qh_i . Kh_j / sqrt(D) (summed in d order), r_i = max_j L before masking, then the
//! masking. The group shares each Kh_j a thread loads (16-byte loads, Qh from shared memory).
__global__ void __launch_bounds__(kLogitThreads) lowResolutionLogits(Problem p, Scratch s)
{
    constexpr int kWarps = kLogitThreads / 32;
    __shared__ float4 queries[kLogitQueryBlocks][kMaxHeadDim / 4];
    __shared__ float warpMaxima[kLogitQueryBlocks][kWarps];
    waitForPreviousKernel(); // the block means and counts
    startNextKernel();
    int32_t const groups = logitQueryGroups(p.nb);
    int32_t const row = blockIdx.x / groups;
    int32_t const first = (blockIdx.x % groups) * kLogitQueryBlocks; // the group's first query block
    int32_t const vectors = p.headDim / 4;
    float const* counts = s.counts + (row / p.heads) * p.nb;
    for (int32_t index = threadIdx.x; index < kLogitQueryBlocks * vectors; index += blockDim.x)
    {
        int32_t const u = index / vectors;
        float4 const* q = reinterpret_cast<float4 const*>(s.queryMean + (static_cast<size_t>(row) * p.nb + first + u) * p.headDim);
        queries[u][index % vectors] = first + u < p.nb ? q[index % vectors] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    __syncthreads();

    float localMax[kLogitQueryBlocks];
    for (int32_t u = 0; u < kLogitQueryBlocks; ++u)
    {
        localMax[u] = -FLT_MAX;
    }
    for (int32_t j = threadIdx.x; j < p.nb; j += blockDim.x)
    {
        float4 const* k = reinterpret_cast<float4 const*>(s.keyMean + (static_cast<size_t>(row) * p.nb + j) * p.headDim);
        float dot[kLogitQueryBlocks] = {};
        for (int32_t v = 0; v < vectors; ++v)
        {
            float4 const key = k[v];
            for (int32_t u = 0; u < kLogitQueryBlocks; ++u)
            {
                float4 const query = queries[u][v];
                dot[u] += query.x * key.x;
                dot[u] += query.y * key.y;
                dot[u] += query.z * key.z;
                dot[u] += query.w * key.w;
            }
        }
        for (int32_t u = 0; u < kLogitQueryBlocks && first + u < p.nb; ++u)
        {
            int32_t const i = first + u;
            float const logit = dot[u] / p.scaleDivisor;
            localMax[u] = fmaxf(localMax[u], logit);
            s.lowLogits[(static_cast<size_t>(row) * p.nb + i) * p.nb + j]
                = logit - (counts[i] * counts[j] < 0.5f ? kMaskedLogitPenalty : 0.0f);
        }
    }
    // The group's row maxima in one exchange: each warp's by shuffles, then thread u takes the
    // warps' maximum for query block first + u (one barrier for all 8).
    MRA_UNROLL
    for (int32_t u = 0; u < kLogitQueryBlocks; ++u)
    {
        float const warpMax = rowMaxOver<32>(localMax[u]);
        if (threadIdx.x % 32 == 0)
        {
            warpMaxima[u][threadIdx.x / 32] = warpMax;
        }
    }
    __syncthreads();
    int32_t const u = threadIdx.x;
    if (u < kLogitQueryBlocks && first + u < p.nb)
    {
        float rowMax = warpMaxima[u][0];
        for (int32_t w = 1; w < kWarps; ++w)
        {
            rowMax = fmaxf(rowMax, warpMaxima[u][w]);
        }
        s.rowMax[row * p.nb + first + u] = rowMax;
    }
}

// ---- (b) selection -----------------------------------------------------------------------

using SelectScan = cub::BlockScan<int32_t, kSelectThreads>;

//! The selection key of `cell` of a row whose low-resolution logit is `logit`.
__device__ inline uint32_t keyOf(Problem const& p, Scratch const& s, int32_t row, int32_t cell, float logit)
{
    int32_t const i = cell / p.nb;
    int32_t const j = cell - i * p.nb;
    return orderedKey(selectionScore(logit, s.rowMax[row * p.nb + i], i, j, p.priorFirst, p.priorDiagonal));
}

__device__ inline uint32_t scoreKey(Problem const& p, Scratch const& s, int32_t row, int32_t cell)
{
    return keyOf(p, s, row, cell, s.lowLogits[static_cast<size_t>(row) * p.nb * p.nb + cell]);
}

//! The CTAs that select one row's blocks together: a thread-block cluster, whose CTAs read each
//! other's histograms and totals through distributed shared memory, or the CTA alone. At batch 1
//! a CTA per row kept 12 of the H200's 132 SMs busy for 31 us (2026-12-04); a cluster of 8 per
//! row gives each CTA an eighth of the cells, and the passes' chains shorten with it. A grid of
//! one CTA per row (sm_80 to sm_89, rows enough to fill the GPU, or rows of up to 512 cells)
//! uses no cluster instruction.
struct SelectionCluster
{
    uint32_t ctas; //!< per row: the launch's grid is rows x ctas, in clusters of ctas
    uint32_t index;

    __device__ explicit SelectionCluster(Problem const& p)
        : ctas(gridDim.x / static_cast<uint32_t>(p.rows))
        , index(blockIdx.x % ctas)
    {
    }

    __device__ uint32_t rank() const
    {
        return index;
    }

    __device__ uint32_t size() const
    {
        return ctas;
    }

    //! Every thread of every CTA of the row: their shared memory writes are visible to all.
    __device__ void sync() const
    {
#if MRA_HAS_CLUSTERS
        if (ctas > 1)
        {
            cooperative_groups::this_cluster().sync();
            return;
        }
#endif
        __syncthreads();
    }

    //! `local`, a shared variable of this CTA, in CTA `cta` of the row.
    template <typename T>
    __device__ T* at(T* local, uint32_t cta) const
    {
#if MRA_HAS_CLUSTERS
        if (ctas > 1)
        {
            return cooperative_groups::this_cluster().map_shared_rank(local, static_cast<int>(cta));
        }
#endif
        return local;
    }

    //! The sum of `local[index]` (a shared array) over the row's CTAs of ranks below `end`. The
    //! loads, each a round trip to another SM, are all issued before the first is waited for.
    template <typename T>
    __device__ int32_t sumOver(T const* local, int32_t index, uint32_t end) const
    {
        T values[MRA_SELECT_CLUSTER];
        MRA_UNROLL
        for (uint32_t cta = 0; cta < MRA_SELECT_CLUSTER; ++cta)
        {
            values[cta] = cta < end ? at(local, cta)[index] : T(0);
        }
        int32_t sum = 0;
        MRA_UNROLL
        for (uint32_t cta = 0; cta < MRA_SELECT_CLUSTER; ++cta)
        {
            sum += static_cast<int32_t>(values[cta]);
        }
        return sum;
    }

    //! The sum of `value` (a shared variable) over the CTAs of ranks below this one's.
    __device__ int32_t sumBelow(int32_t const& value) const
    {
        return sumOver(&value, 0, rank());
    }
};

//! One thread's share of a row's selection keys: the contiguous run of cells [begin, end) of
//! the row's thread `thread` out of `threads` (the row's CTAs' threads, in rank order), its
//! first kCachedKeys keys held in registers from one load (all of them up to 16 K cells, nb =
//! 128 or 4096 tokens, on one CTA), the rest recomputed from global memory on each pass. The
//! radix passes and the final scans read every key six times: from global memory each pass
//! waited on L2 latency (selectBlocks took 31 us at 4096 tokens, alike at batch 1 and 8).
struct ThreadKeys
{
    static constexpr int kCachedKeys = 32;
    uint32_t cached[kCachedKeys];
    int32_t begin, end;

    __device__ ThreadKeys(Problem const& p, Scratch const& s, int32_t row, int32_t thread, int32_t threads)
    {
        int32_t const cells = p.nb * p.nb;
        int32_t const perThread = (cells + threads - 1) / threads;
        begin = min(thread * perThread, cells);
        end = min(begin + perThread, cells);
        // The run's logits are contiguous: 16-byte loads where the run starts 16-byte aligned
        // (nb = 128: 32 cells a thread, 8 loads instead of 32; each load of a warp touches 32
        // lines, one per thread's run, so this also cuts the L1 requests 4x).
        float const* const logits = s.lowLogits + static_cast<size_t>(row) * cells + begin;
        bool const aligned = reinterpret_cast<uintptr_t>(logits) % 16 == 0;
        MRA_UNROLL
        for (int32_t c = 0; c < kCachedKeys; c += 4)
        {
            if (aligned && begin + c + 4 <= end)
            {
                float4 const four = *reinterpret_cast<float4 const*>(logits + c);
                cached[c] = keyOf(p, s, row, begin + c, four.x);
                cached[c + 1] = keyOf(p, s, row, begin + c + 1, four.y);
                cached[c + 2] = keyOf(p, s, row, begin + c + 2, four.z);
                cached[c + 3] = keyOf(p, s, row, begin + c + 3, four.w);
            }
            else
            {
                MRA_UNROLL
                for (int32_t e = c; e < c + 4; ++e)
                {
                    cached[e] = begin + e < end ? keyOf(p, s, row, begin + e, logits[e]) : 0u;
                }
            }
        }
    }

    //! visit(cell, key) for the run's cells in ascending order.
    template <typename Visit>
    __device__ void forEach(Problem const& p, Scratch const& s, int32_t row, Visit visit) const
    {
        MRA_UNROLL
        for (int32_t c = 0; c < kCachedKeys; ++c)
        {
            if (begin + c < end)
            {
                visit(begin + c, cached[c]);
            }
        }
        for (int32_t cell = begin + kCachedKeys; cell < end; ++cell)
        {
            visit(cell, scoreKey(p, s, row, cell));
        }
    }
};

//! Counts the run's keys under `prefix` by digit `shift`. Neighbouring cells mostly share a
//! digit (the leading one of nearly every key is alike), so a thread adds each run of equal
//! digits once: fewer atomics on the few crowded bins.
__device__ inline void countDigits(Problem const& p, Scratch const& s, int32_t row, ThreadKeys const& keys,
    uint32_t prefixMask, uint32_t prefix, int32_t shift, uint32_t* histogram)
{
    uint32_t runDigit = 0;
    uint32_t runLength = 0;
    keys.forEach(p, s, row, [&](int32_t, uint32_t key) {
        if ((key & prefixMask) != prefix)
        {
            return;
        }
        uint32_t const digit = (key >> shift) & 0xffu;
        if (runLength > 0 && digit != runDigit)
        {
            atomicAdd(&histogram[runDigit], runLength);
            runLength = 0;
        }
        runDigit = digit;
        ++runLength;
    });
    if (runLength > 0)
    {
        atomicAdd(&histogram[runDigit], runLength);
    }
}

//! What selectBlocks keeps in shared memory: its dynamic shared memory, each CTA's own at its
//! own address under the CUDA emulation too, where racecheck's stand-in follows the cluster's
//! reads of each other's (a static variable there is one copy, swapped between the CTAs).
struct SelectionShared
{
    typename SelectScan::TempStorage scan;
    // By pass parity: a pass zeroes one while the row's other CTAs may still read the last.
    uint32_t histograms[2][256];
    int32_t ties;  //!< this CTA's cells equal to the k-th largest key
    int32_t taken; //!< this CTA's selected cells
    uint32_t prefix;
    int32_t remaining;
};

//! Digit `shift` of the k-th largest key, from the row's CTAs' `histogram`s: thread t < 256 sums
//! the counts of digit 255 - t, so an exclusive scan gives the number of keys above each digit,
//! and the one thread whose digit reaches `remaining` extends the prefix (every CTA of the row
//! finds the same). Every thread calls it; it ends with a barrier.
__device__ inline void chooseDigit(SelectionCluster const& cluster, SelectionShared& shared, uint32_t const* histogram,
    int32_t shift)
{
    int32_t const digit = 255 - static_cast<int32_t>(threadIdx.x);
    int32_t const count = digit >= 0 ? cluster.sumOver(histogram, digit, cluster.size()) : 0;
    int32_t const wanted = shared.remaining; // read by every thread before the one below writes it
    int32_t above;
    int32_t total;
    SelectScan(shared.scan).ExclusiveSum(count, above, total);
    if (count > 0 && above < wanted && above + count >= wanted)
    {
        shared.prefix |= static_cast<uint32_t>(digit) << shift;
        shared.remaining = wanted - above;
    }
    __syncthreads();
}

//! One CTA, or one cluster of CTAs, per row (batch * head): the k best cells, ties in flat
//! order; writes them ascending, with row starts. The row's cells are split over its CTAs in
//! rank order, each thread a contiguous run.
__global__ void __launch_bounds__(kSelectThreads) selectBlocks(Problem p, Scratch s)
{
    extern __shared__ __align__(128) unsigned char smem[];
    SelectionShared& shared = *reinterpret_cast<SelectionShared*>(smem);
    waitForPreviousKernel(); // the low-resolution logits and row maxima
    startNextKernel();
    SelectionCluster const cluster(p);
    int32_t const row = static_cast<int32_t>(blockIdx.x / cluster.size());
    int32_t const threads = static_cast<int32_t>(cluster.size() * blockDim.x);
    ThreadKeys const keys(p, s, row, static_cast<int32_t>(cluster.rank() * blockDim.x + threadIdx.x), threads);

    // Radix select, most significant digit first: the exact key of the k-th largest score.
    if (threadIdx.x == 0)
    {
        shared.prefix = 0;
        shared.remaining = p.topK;
    }
    uint32_t prefixMask = 0;
    for (int32_t pass = 0; pass < 4; ++pass)
    {
        int32_t const shift = 24 - 8 * pass;
        uint32_t* histogram = shared.histograms[pass % 2];
        for (int32_t b = threadIdx.x; b < 256; b += blockDim.x)
        {
            histogram[b] = 0;
        }
        __syncthreads();
        countDigits(p, s, row, keys, prefixMask, shared.prefix, shift, histogram);
        cluster.sync(); // every CTA's counts are in
        chooseDigit(cluster, shared, histogram, shift);
        prefixMask |= 0xffu << shift;
    }
    uint32_t const thresholdKey = shared.prefix;
    int32_t const tiesToTake = shared.remaining; // how many cells equal to the k-th score are selected

    // Each thread holds a contiguous run of cells, so two scans order the whole row: the ties
    // before the run (the first tiesToTake ties in flat order are taken), then the cells taken
    // before it (where the run's cells go in `selected`). Each scan is the CTA's, plus the totals
    // of the row's CTAs before it.
    int32_t above = 0;
    int32_t ties = 0;
    keys.forEach(p, s, row, [&](int32_t, uint32_t key) {
        above += key > thresholdKey ? 1 : 0;
        ties += key == thresholdKey ? 1 : 0;
    });
    int32_t tieRank;
    int32_t total;
    SelectScan(shared.scan).ExclusiveSum(ties, tieRank, total);
    if (threadIdx.x == 0)
    {
        shared.ties = total;
    }
    cluster.sync(); // every CTA's ties are counted (and a barrier before the scan's storage is reused)
    tieRank += cluster.sumBelow(shared.ties);
    int32_t const tiesTaken = min(ties, max(tiesToTake - tieRank, 0));
    int32_t position;
    SelectScan(shared.scan).ExclusiveSum(above + tiesTaken, position, total);
    if (threadIdx.x == 0)
    {
        shared.taken = total;
    }
    cluster.sync(); // every CTA's taken cells are counted
    position += cluster.sumBelow(shared.taken);
    cluster.sync(); // no CTA exits, and its shared memory goes, before the others have read it

    int32_t* selected = s.selected + static_cast<size_t>(row) * p.topK;
    int32_t* rowStart = s.rowStart + static_cast<size_t>(row) * (p.nb + 1);
    keys.forEach(p, s, row, [&](int32_t cell, uint32_t key) {
        bool take = key > thresholdKey;
        if (key == thresholdKey)
        {
            take = tieRank < tiesToTake;
            ++tieRank;
        }
        if (cell % p.nb == 0)
        {
            rowStart[cell / p.nb] = position;
        }
        if (take)
        {
            selected[position++] = cell;
        }
    });
    if (cluster.rank() == 0 && threadIdx.x == 0)
    {
        rowStart[p.nb] = p.topK;
        s.threshold[row] = keyValue(thresholdKey);
    }
}

// ---- (d) low-resolution terms (mode "full") -------------------------------------------------

//! One CTA per (row, group of kLogitQueryBlocks query blocks i), thread d the value dim d:
//! lowOut[i] = sum_j lo_ij Vh_j and lowNorm[i] = sum_j lo_ij, accumulated in j order, with
//! lo_ij = exp((L_ij - r_i) - 1e4 [score_ij >= threshold]) c_j. The group reads each Vh_j once
//! for its query blocks (a CTA per query block read the row's Vh whole, once each).
__global__ void __launch_bounds__(kLogitThreads) lowResolutionTerms(Problem p, Scratch s)
{
    static_assert(kMaxHeadDim <= kLogitThreads, "a thread per value dim");
    // Rows one float longer than the threads: threads u < kLogitQueryBlocks read row u's column k
    // together (the norms), 8-way bank conflicts where rows are a multiple of 32 floats apart.
    __shared__ float weights[kLogitQueryBlocks][kLogitThreads + 1];
    waitForPreviousKernel(); // the threshold (and, before it, the logits and value means)
    startNextKernel();
    int32_t const groups = logitQueryGroups(p.nb);
    int32_t const row = blockIdx.x / groups;
    int32_t const first = (blockIdx.x % groups) * kLogitQueryBlocks; // the group's first query block
    int32_t const d = threadIdx.x;
    float const* counts = s.counts + (row / p.heads) * p.nb;
    float const threshold = s.threshold[row];
    float sums[kLogitQueryBlocks] = {};
    float norm = 0.0f; // thread u < kLogitQueryBlocks: query block first + u
    for (int32_t chunk = 0; chunk < p.nb; chunk += kLogitThreads)
    {
        int32_t const j = chunk + threadIdx.x;
        MRA_UNROLL
        for (int32_t u = 0; u < kLogitQueryBlocks; ++u)
        {
            int32_t const i = first + u;
            float weight = 0.0f;
            if (j < p.nb && i < p.nb)
            {
                float const logit = s.lowLogits[(static_cast<size_t>(row) * p.nb + i) * p.nb + j];
                float const rowMax = s.rowMax[row * p.nb + i];
                float const score = selectionScore(logit, rowMax, i, j, p.priorFirst, p.priorDiagonal);
                float const exact = score >= threshold ? 1.0f : 0.0f;
                weight = expf((logit - rowMax) - kMaskedLogitPenalty * exact) * counts[j];
            }
            weights[u][threadIdx.x] = weight;
        }
        __syncthreads();
        int32_t const count = min(kLogitThreads, p.nb - chunk);
        if (d < p.headDim)
        {
            float const* values = s.valueMean + (static_cast<size_t>(row) * p.nb + chunk) * p.headDim + d;
            for (int32_t k = 0; k < count; ++k)
            {
                float const value = values[static_cast<size_t>(k) * p.headDim];
                MRA_UNROLL
                for (int32_t u = 0; u < kLogitQueryBlocks; ++u)
                {
                    sums[u] += weights[u][k] * value;
                }
            }
        }
        if (threadIdx.x < kLogitQueryBlocks)
        {
            for (int32_t k = 0; k < count; ++k)
            {
                norm += weights[threadIdx.x][k];
            }
        }
        __syncthreads(); // before the next chunk's weights
    }
    MRA_UNROLL
    for (int32_t u = 0; u < kLogitQueryBlocks; ++u) // a constant bound keeps sums in registers
    {
        if (first + u < p.nb && d < p.headDim)
        {
            s.lowOut[(static_cast<size_t>(row) * p.nb + first + u) * p.headDim + d] = sums[u];
        }
    }
    if (threadIdx.x < kLogitQueryBlocks && first + static_cast<int32_t>(threadIdx.x) < p.nb)
    {
        s.lowNorm[row * p.nb + first + threadIdx.x] = norm;
    }
}

// ---- (c) + (d) high resolution and the epilogue: what both kernels share -------------------

//! cp.async.cg (sm_80 and later): 16 bytes from global to shared memory without passing through
//! registers; `real` false writes 16 zero bytes and reads none (a padded token, or one past the
//! sequence, whose address may lie past the tensor: `global` is then not read).
__device__ inline void copyAsync16(void* shared, void const* global, bool real)
{
#ifdef MRA_CUDA_EMULATION_H
    ::emu::asyncCopy(__FILE__, __LINE__, shared, global, 16, real ? 16 : 0);
#else
    uint32_t const address = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global), "r"(real ? 16 : 0)
                 : "memory");
#endif
}

//! cp.async.commit_group: the copies this thread issued since the last commit form a group.
__device__ inline void commitCopies()
{
#ifdef MRA_CUDA_EMULATION_H
    ::emu::asyncCommit();
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

//! cp.async.wait_group: this thread's groups but the newest kPending have landed. Other threads
//! see them after a __syncthreads.
template <int kPending>
__device__ inline void waitForCopies()
{
#ifdef MRA_CUDA_EMULATION_H
    ::emu::asyncWait(kPending);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

constexpr float kLog2e = 1.4426950408889634f; // exp(x) = 2^(x log2 e)

//! 2^x by ex2.approx.ftz (one MUFU.EX2, about 2 ulp), results below 2^-126 flushed to 0: the 16-bit
//! kernels' weights, rescales and epilogue factors. __expf adds three instructions to keep those
//! results, which no fp16 weight holds (its least is 2^-24) and which beside a row's largest weight,
//! at least 1, or its normaliser's 1e-6 floor change no bf16 output by more than about 1e-29
//! max|V| (e^5.5 times that where a lazy base leaves the row's maximum above its base).
__device__ inline float exp2Approximate(float x)
{
#ifdef MRA_CUDA_EMULATION_H
    return std::exp2(x); // the emulation's exponentials are exact (as its __expf)
#else
    float result;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(result) : "f"(x));
    return result;
#endif
}

//! exp(x): by exp2Approximate where kFastExp (the 16-bit kernels), else expf.
template <bool kFastExp>
__device__ inline float exponential(float x)
{
    return kFastExp ? exp2Approximate(x * kLog2e) : expf(x);
}

//! The tile row of 16-byte vector `index` of a [32, D] tile of kVectorsPerRow vectors a row, in
//! the order the copies in and out take them. Rows of 4 vectors (16-bit, head_dim 32) are 80
//! bytes apart in the tensor-core kernel's tiles, so a quarter warp's 8 vectors, two rows, would
//! find rows r and r + 1 sharing a group of 4 banks (2-way conflicts): it takes rows r and r + 4
//! instead (bits 0 and 2 of the row swapped), 320 bytes apart, which fall in the other 4 groups.
//! A warp's 32 vectors are still 8 whole rows.
template <int kVectorsPerRow>
__device__ inline int32_t tileRow(int32_t index)
{
    int32_t const row = index / kVectorsPerRow;
    if constexpr (kVectorsPerRow == 4)
    {
        return (row & ~5) | ((row & 1) << 2) | ((row >> 2) & 1);
    }
    return row;
}

//! Issues the copies of the [32, D] tiles of tokens first + 0..31 of kTensors tensors (Q; or K
//! and V) into shared memory, row-major with rows `stride` elements apart (16-byte aligned):
//! padded tokens and those past the sequence as zeros (`realTokens` bit r: token first + r is
//! real, from realTokenBits: one mask read a warp, where each vector's own would be one a
//! vector, on the way to each copy). Thread `thread` of the kThreads that share the copy takes
//! 16-byte vectors thread, thread + kThreads, ... of each.
template <typename T, int D, int kTensors, int kThreads>
__device__ void copyTiles(Problem const& p, T const* const (&sources)[kTensors], uint32_t realTokens, int32_t row,
    int32_t first, T* const (&tiles)[kTensors], int32_t stride, int32_t thread)
{
    constexpr int kVector = 16 / sizeof(T);
    constexpr int kVectorsPerRow = D / kVector;
    constexpr int kPerThread = kBlock * kVectorsPerRow / kThreads;
    static_assert(kPerThread * kThreads == kBlock * kVectorsPerRow, "the threads share the tile evenly");
    // The tile's first token, then 32-bit steps within the tile (heads * head_dim fits int32).
    size_t const base = tokenOffset(p, row, first);
    int32_t const tokenStride = static_cast<int32_t>(p.tokenStride);
    MRA_UNROLL
    for (int32_t v = 0; v < kPerThread; ++v)
    {
        int32_t const index = thread + v * kThreads;
        int32_t const r = tileRow<kVectorsPerRow>(index);
        int32_t const column = (index % kVectorsPerRow) * kVector;
        bool const real = (realTokens >> r) & 1u;
        // A padded token's copy reads nothing, and names the tensor's first element rather than
        // one that may lie past it; one offset serves the kTensors, which share their layout.
        size_t const from = real ? base + r * tokenStride + column : 0;
        MRA_UNROLL
        for (int32_t t = 0; t < kTensors; ++t)
        {
            copyAsync16(tiles[t] + r * stride + column, sources[t] + from, real);
        }
    }
}

//! Runs `compute(keyTile, valueTile, realKeys)` for each selected key block of query block i
//! that falls to the calling thread's group, once the block's K and V tiles are in shared memory
//! (row-major, rows `stride` apart; `realKeys` bit t: key t is real), with the group's next
//! kStages - 1 blocks' copies in flight: the loop waits on memory only where a block takes
//! longer to arrive than kStages - 1 blocks take to compute. The CTA's kGroups groups of
//! kThreads threads (thread x in group x / kThreads) take the blocks in turn, group g blocks g,
//! g + kGroups, ..., each in its own kStages (K, V) tile pairs of `stageTiles`; every group steps
//! through as many rounds as the first, so that the CTA's barriers stay uniform. A stage's key
//! mask lives in the pad of its K tile's first row (rows are `stride` > D elements apart), which
//! the copies and the compute never touch: a word of its own would cost shared memory, and 12
//! bytes more a CTA fit one CTA fewer on an H200 SM at head_dim 64 (tools/occupancy.py). Copies
//! the caller issued before (the query tile) land with the first round. Every thread calls it;
//! it returns with no copy in flight.
template <typename T, int D, int kThreads, int kStages, int kGroups, typename Compute>
__device__ void forEachKeyBlock(Problem const& p, T const* key, T const* value, int32_t const* mask, Scratch const& s,
    int32_t row, int32_t i, T* stageTiles, int32_t stride, Compute&& compute)
{
    static_assert(kStages >= 2, "one block computed while the next arrives");
    int32_t const* rowStart = s.rowStart + static_cast<size_t>(row) * (p.nb + 1);
    int32_t const* selected = s.selected + static_cast<size_t>(row) * p.topK; // cell (i, j) is i * nb + j
    int32_t const group = threadIdx.x / kThreads;
    int32_t const thread = threadIdx.x % kThreads;
    int32_t const begin = rowStart[i] + group; // the group's first block
    int32_t const end = rowStart[i + 1];
    int32_t const rounds = (end - rowStart[i] + kGroups - 1) / kGroups;
    int32_t const tileElements = kBlock * stride;
    T* const groupTiles = stageTiles + group * kStages * 2 * tileElements;
    auto tile = [&](int32_t stage, int32_t tensor) { return groupTiles + (2 * stage + tensor) * tileElements; };
    auto realKeys = [&](int32_t stage) -> uint32_t& { return *reinterpret_cast<uint32_t*>(tile(stage, 0) + D); };
    // A group of copies per round, empty past the group's last block, so that wait_group counts rounds.
    auto fetch = [&](int32_t round) {
        int32_t const index = begin + round * kGroups;
        if (index < end) // the same in each thread of the group: its warps all read the mask
        {
            int32_t const stage = round % kStages;
            int32_t const j = selected[index] - i * p.nb;
            uint32_t const bits = realTokenBits(p, mask, row / p.heads, j);
            copyTiles<T, D, 2, kThreads>(p, {key, value}, bits, row, j * kBlock, {tile(stage, 0), tile(stage, 1)},
                stride, thread);
            if (thread == 0)
            {
                realKeys(stage) = bits;
            }
        }
        commitCopies();
    };
    for (int32_t ahead = 0; ahead < kStages - 1; ++ahead)
    {
        fetch(ahead);
    }
    for (int32_t round = 0; round < rounds; ++round)
    {
        waitForCopies<kStages - 2>(); // this thread's copies of round `round`
        __syncthreads();              // every thread's; and round - 1's stages are free again
        fetch(round + kStages - 1);
        if (begin + round * kGroups < end)
        {
            int32_t const stage = round % kStages;
            compute(tile(stage, 0), tile(stage, 1), realKeys(stage));
        }
    }
    waitForCopies<0>(); // the query tile's, where no block was selected
}

//! Runs `softmax(everyKeyReal)` with std::true_type where a key block has no padding key (with
//! padding at the end, every block but, at most, a sequence's last), so that its masks compile
//! away; else std::false_type. `realKeys` is the block's, the same in every thread of the group
//! that computes it (each warp lies in one group): the branch does not diverge.
template <typename Softmax>
__device__ inline void byKeyPadding(uint32_t realKeys, Softmax&& softmax)
{
    static_assert(kBlock == 32, "a block's keys are one 32-bit word");
    if (realKeys == 0xffffffffu)
    {
        softmax(std::true_type{});
    }
    else
    {
        softmax(std::false_type{});
    }
}

//! How far a block's real maximum may pass the base before a lazy base (SoftmaxArithmetic's
//! kTensorCore) moves, in nats: weights exp(P - baseMax) then stay below e^5.5 < 2^8, far
//! inside fp16's range, for scores under 2^23 (where baseMax + 5.5 and baseMax log2 e round by
//! less than 1); O's rescale is skipped where no row of a warp moved its base. FlashAttention 4
//! also rescales only where the maximum moved enough.
constexpr float kLazyBaseSlack = 5.5f;

//! The high-resolution kernels' online softmax (SoftmaxStats::absorb).
enum class SoftmaxArithmetic
{
    //! fp32 (highResolutionFma): expf; the base is the real keys' maximum; the normaliser is the
    //! weights' fp32 sum.
    kExact,
    //! fp16, bf16 (highResolutionMma): the fast exponential, 2^(P log2 e - baseMax log2 e) in one
    //! FFMA and one MUFU.EX2 (off by the rounding of baseMax log2 e, above), as the weights round
    //! to 8 or 11 bits anyway; a lazy base: it moves only where the block's real maximum passes it
    //! by more than kLazyBaseSlack, so that after a row's first blocks the rescale is mostly
    //! exactly 1 and the caller skips its multiplies; and no normaliser here: the caller sums the
    //! weights as rounded for P V, by P V's own products (a column of ones), so that the output
    //! divides by the sum of the weights it multiplied. Lazily a row's largest weight is no
    //! longer exactly 1 and rounds too, so 16-bit results lose some accuracy (docs/gpu.md), of
    //! which summing the rounded weights wins part back.
    kTensorCore,
};

//! One query row's online softmax statistics, over the key blocks absorbed so far. Padded keys
//! count for M (they do in the original) but not for the base: with M pinned at 0 by them,
//! exp(P - M) of real keys far below 0 would underflow in an fp16 weight. The base is the real
//! keys' maximum (exp(P - baseMax) <= 1, one weight 1) or, lazily, at most kLazyBaseSlack below it.
//! The fast exponential's exponent is off by up to half an ulp of baseMax log2 e, as in
//! FlashAttention (a weight 1 is off by about 5e-6 at scores of 100).
struct SoftmaxStats
{
    float runningMax = -FLT_MAX; //!< over every key of the selected blocks: the quantised M
    float baseMax = -FLT_MAX;    //!< of real keys only: the base of the exponentials
    float norm = 0.0f;           //!< sum of exp(P - baseMax) over real keys (kTensorCore: the caller's)

    //! Fold in one block's scores of a row, kKeys per thread of its kLanes (`real`: the key is
    //! real), by kArithmetic. Returns the factor the row's earlier sums are rescaled by, and the
    //! weights in `weights`.
    //! kEveryKeyReal: the block has no padding key (`real` unread), so its real keys' max is its
    //! max, one reduction instead of two; the same values either way.
    template <SoftmaxArithmetic kArithmetic, int kLanes, bool kEveryKeyReal, int kKeys>
    __device__ float absorb(float const (&scores)[kKeys], bool const (&real)[kKeys], float (&weights)[kKeys])
    {
        static_assert(kKeys * kLanes == kBlock, "a row's threads hold the block's keys");
        constexpr bool kTensorCore = kArithmetic == SoftmaxArithmetic::kTensorCore;
        constexpr bool kFastExp = kTensorCore;
        constexpr bool kLazyBase = kTensorCore && MRA_LAZY_SOFTMAX_BASE != 0;
        float blockMax = -FLT_MAX;
        float blockRealMax = -FLT_MAX;
        for (int32_t t = 0; t < kKeys; ++t)
        {
            blockMax = fmaxf(blockMax, scores[t]);
            blockRealMax = fmaxf(blockRealMax, kEveryKeyReal || real[t] ? scores[t] : -FLT_MAX);
        }
        float const rowMax = rowMaxOver<kLanes>(blockMax);
        runningMax = fmaxf(runningMax, rowMax);
        float const blockBase = kEveryKeyReal ? rowMax : rowMaxOver<kLanes>(blockRealMax);
        // Lazily: -FLT_MAX + kLazyBaseSlack is -FLT_MAX, so the first real key moves the base.
        bool const moves = blockBase > baseMax + kLazyBaseSlack;
        float const newBase = !kLazyBase ? fmaxf(baseMax, blockBase) : moves ? blockBase : baseMax;
        // 1 while no real key has been seen; 0 from no real key to one (-FLT_MAX log2 e is -inf)
        float const rescale = !kLazyBase || moves ? exponential<kFastExp>(baseMax - newBase) : 1.0f;
        baseMax = newBase;
        float const baseLog2 = newBase * kLog2e; // -inf before a real key, when every weight is 0
        float partial = 0.0f;
        for (int32_t t = 0; t < kKeys; ++t)
        {
            weights[t] = !(kEveryKeyReal || real[t]) ? 0.0f // exp(.. - 1e4) is 0
                : kFastExp                          ? exp2Approximate(fmaf(scores[t], kLog2e, -baseLog2))
                                                    : expf(scores[t] - newBase);
            partial += weights[t];
        }
        if constexpr (!kTensorCore) // else the caller sums the weights as rounded (partial is dropped)
        {
            norm = norm * rescale + rowSumOver<kLanes>(partial);
        }
        return rescale;
    }

    //! Folds in the statistics of the same row over other key blocks. Returns the factors this
    //! row's sums and `other`'s are rescaled by before they are added.
    __device__ void merge(SoftmaxStats const& other, float& ownFactor, float& otherFactor)
    {
        runningMax = fmaxf(runningMax, other.runningMax);
        float const newBase = fmaxf(baseMax, other.baseMax);
        ownFactor = expf(baseMax - newBase); // 1 where both saw no real key (sums 0)
        otherFactor = expf(other.baseMax - newBase);
        baseMax = newBase;
        norm = norm * ownFactor + other.norm * otherFactor;
    }
};

//! Query block i's low-resolution terms (lowResolutionTerms' output; zero in mode "sparse").
struct LowResolution
{
    float const* values = nullptr; //!< sum_j lo_ij Vh_j, D floats
    float norm = 0.0f;             //!< sum_j lo_ij

    __device__ LowResolution(Problem const& p, Scratch const& s, int32_t row, int32_t i)
    {
        if (p.full)
        {
            values = s.lowOut + (static_cast<size_t>(row) * p.nb + i) * p.headDim;
            norm = s.lowNorm[row * p.nb + i];
        }
    }

    __device__ float out(int32_t d) const { return values != nullptr ? values[d] : 0.0f; }

    //! Dims d to d + 3 (d a multiple of 4) in one 16-byte load: where 8 threads of a row each take
    //! 4 dims, four 4-byte loads would each touch the same 4 sectors.
    __device__ float4 out4(int32_t d) const
    {
        return values != nullptr ? *reinterpret_cast<float4 const*>(values + d) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
};

//! (d) The epilogue's combination for one query row: the quantised row max, the low-resolution
//! term (mode "full") and the correction; `hiOut` is sum exp(P - baseMax) V at one dim. Each dim
//! is then one multiply and one FMA, by the row's two factors: the row's one division, its
//! reciprocal, is in them (an ulp or two from dividing each dim, as transformers does; a division
//! is a dozen instructions and a slow-path branch a dim). kFastExp (fp16, bf16): its three
//! exponentials as the weights', by exp2Approximate.
template <bool kFastExp>
struct RowEpilogue
{
    float hiFactor, loFactor;

    __device__ RowEpilogue(Problem const& p, SoftmaxStats const& stats, float blockRowMax, float lowNorm)
    {
        float const quantisedMax = quantisedRowMax(stats.runningMax);
        // exp(P - M) = exp(P - baseMax) * exp(baseMax - M); baseMax <= M + 1e-3, so no overflow,
        // and baseMax = -FLT_MAX (no real key) gives 0.
        float const toQuantised = exponential<kFastExp>(stats.baseMax - quantisedMax);
        float const maxGap = blockRowMax - quantisedMax;
        float const loScale = exponential<kFastExp>(fminf(maxGap, 0.0f));
        float const hiScale = exponential<kFastExp>(-fmaxf(maxGap, 0.0f));
        float const hiNorm = stats.norm * toQuantised;
        float const inverseDenominator
            = 1.0f / (p.full ? hiNorm * hiScale + lowNorm * loScale + kNormaliserEps : hiNorm + kNormaliserEps);
        hiFactor = toQuantised * (p.full ? hiScale : 1.0f) * inverseDenominator;
        loFactor = p.full ? loScale * inverseDenominator : 0.0f; // lowOut is 0 in mode "sparse"
    }

    __device__ float operator()(float hiOut, float lowOut) const { return fmaf(hiOut, hiFactor, lowOut * loFactor); }
};

//! The CTA's [32, D] output tile, staged in shared memory as T, written in 16-byte vectors.
template <typename T, int D>
__device__ void storeOutputTile(Problem const& p, T const* tile, int32_t stride, int32_t row, int32_t i, T* output)
{
    constexpr int kVector = 16 / sizeof(T);
    constexpr int kVectorsPerRow = D / kVector;
    T* const block = output + tokenOffset(p, row, i * kBlock);
    int32_t const tokens = static_cast<int32_t>(p.tokenStride);
    for (int32_t index = threadIdx.x; index < kBlock * kVectorsPerRow; index += blockDim.x)
    {
        int32_t const r = tileRow<kVectorsPerRow>(index);
        int32_t const d = (index % kVectorsPerRow) * kVector;
        int32_t const outPosition = i * kBlock + r;
        if (outPosition < p.seqLen)
        {
            *reinterpret_cast<uint4*>(block + r * tokens + d)
                = *reinterpret_cast<uint4 const*>(tile + r * stride + d);
        }
    }
}

// ---- (c) split query blocks: what both kernels share -----------------------------------------
//
// Where a kernel's CTA splits its query block's key blocks over kSplit thread groups (forEachKeyBlock),
// each group's threads hold partial sums of the same query rows; group 0 merges the others'.
// `accumulators(visit)` calls visit(value, h) on each of a thread's output accumulators, in a fixed
// order, h the thread's row (0 or 1) it belongs to.

//! Floats of one thread's partial sums: each row's 3 statistics and the accumulators.
template <int kAccumulators>
constexpr int kPartialFloats = 6 + kAccumulators;

//! Hands the partial sums of groups 1 to kSplit - 1 to group 0, which merges them in group order
//! (the same bits every run), as two softmaxes' statistics merge. They pass through each group's
//! stage tiles in `smem` (laid out as Smem says: the query tile, then kGroupTiles bytes a group),
//! idle once the key-block loop is done; each of a group's kGroupThreads threads kPartialFloats
//! floats, float v of all of them side by side, so that a warp's 32 stores or loads of one float
//! fall in 32 banks (a thread's floats side by side, an even count apart, took two wavefronts).
//! Every thread calls it; after it, group 0 holds the query block's sums.
template <typename Smem, int kSplit, int kGroupThreads, int kAccumulators, typename Accumulators>
__device__ void mergeGroups(unsigned char* smem, int32_t group, int32_t groupThread, SoftmaxStats (&stats)[2],
    Accumulators&& accumulators)
{
    if constexpr (kSplit > 1)
    {
        auto groupArea = [&](int32_t g) { return reinterpret_cast<float*>(smem + Smem::kTile + g * Smem::kGroupTiles); };
        auto slot = [](int32_t v) { return v * kGroupThreads; }; // float v of a thread, from its first
        __syncthreads(); // every group is done with its stages (a warp may still read the last block)
        if (group > 0)
        {
            float* const partial = groupArea(group) + groupThread;
            MRA_UNROLL
            for (int32_t h = 0; h < 2; ++h)
            {
                partial[slot(3 * h)] = stats[h].runningMax;
                partial[slot(3 * h + 1)] = stats[h].baseMax;
                partial[slot(3 * h + 2)] = stats[h].norm;
            }
            int32_t v = 6;
            accumulators([&](float& value, int32_t) { partial[slot(v++)] = value; });
        }
        __syncthreads();
        for (int32_t other = 1; other < kSplit && group == 0; ++other)
        {
            float const* const partial = groupArea(other) + groupThread;
            float ownFactor[2];
            float otherFactor[2];
            MRA_UNROLL
            for (int32_t h = 0; h < 2; ++h)
            {
                SoftmaxStats theirs;
                theirs.runningMax = partial[slot(3 * h)];
                theirs.baseMax = partial[slot(3 * h + 1)];
                theirs.norm = partial[slot(3 * h + 2)];
                stats[h].merge(theirs, ownFactor[h], otherFactor[h]);
            }
            int32_t v = 6;
            accumulators(
                [&](float& value, int32_t h) { value = value * ownFactor[h] + partial[slot(v++)] * otherFactor[h]; });
        }
    }
}

// ---- (c) fp32: FMA -------------------------------------------------------------------------

//! Shared memory of the fp32 kernel (bytes): the query tile, kStages (K, V) tile pairs (each K
//! tile's first pad holds its stage's key mask), the weights. A 4-element pad keeps rows 16-byte
//! aligned, and float4 reads of 8 rows (a quarter warp) in distinct banks; weight rows 40 floats
//! apart, so that the 4 pairs of rows of a warp store and load them in distinct banks. Two
//! stages: three would not fit sm_86's 99 KB at head_dim 128. With kSplit groups of 128 threads,
//! each group has its own stages and weights (up to head_dim 64 within 99 KB); the other groups'
//! partial sums pass to group 0 through their stage tiles.
template <int D, int kSplit>
struct FmaSmem
{
    static constexpr int kStages = 2;
    static constexpr int kTileStride = D + 4;
    static_assert((kTileStride - D) * sizeof(float) >= sizeof(uint32_t) && D * sizeof(float) % sizeof(uint32_t) == 0,
        "a row's pad holds a key mask's aligned word");
    static constexpr int kWeightStride = 40; // float [32][40]: each row's 32 weights, for its 8 threads
    static constexpr size_t kTile = sizeof(float) * kBlock * kTileStride;
    static constexpr size_t kWeights = sizeof(float) * kBlock * kWeightStride;
    static constexpr size_t kGroupTiles = 2 * kStages * kTile;
    static constexpr size_t kWeightsAt = kTile + kSplit * kGroupTiles; // kSplit weight tiles
    static constexpr size_t kTotal = kWeightsAt + kSplit * kWeights;
    static_assert(kHighResThreads * kPartialFloats<D / 4> * sizeof(float) <= kGroupTiles,
        "a group's partial sums fit its stages");
};

//! Whether n is a power of 4 (so that sqrt(n) is a power of 2).
__host__ __device__ constexpr bool isPowerOfFour(int n)
{
    return n == 1 || (n > 1 && n % 4 == 0 && isPowerOfFour(n / 4));
}

//! The scores of keys lane + 8t (t < 4) of query rows r and r + 16, by FMA from shared memory
//! in d order: each float4 of K read serves two rows (the 8 lanes' K rows fall in distinct
//! banks; the query rows are one address per quarter warp).
template <int D>
__device__ inline void scoresByFma(Problem const& p, float const* queryTile, float const* keyTile, int32_t r,
    int32_t lane, float (&scores)[2][4])
{
    using Smem = FmaSmem<D, 1>; // the tiles' stride, whatever the split
    float dot[2][4] = {};
    auto accumulate = [&](int32_t d) { // dims d to d + 3
        float4 const q[2] = {*reinterpret_cast<float4 const*>(queryTile + r * Smem::kTileStride + d),
            *reinterpret_cast<float4 const*>(queryTile + (r + 16) * Smem::kTileStride + d)};
        MRA_UNROLL
        for (int32_t t = 0; t < 4; ++t)
        {
            float4 const k = *reinterpret_cast<float4 const*>(keyTile + (lane + 8 * t) * Smem::kTileStride + d);
            MRA_UNROLL
            for (int32_t h = 0; h < 2; ++h)
            {
                dot[h][t] += q[h].x * k.x;
                dot[h][t] += q[h].y * k.y;
                dot[h][t] += q[h].z * k.z;
                dot[h][t] += q[h].w * k.w;
            }
        }
    };
    if constexpr (D >= 64)
    {
        // Whole, so that ptxas can issue K's loads ahead of their products (and takes fewer
        // registers). At head_dim 32 nvcc's own choice: whole, the unsplit kernel took 72
        // registers on sm_90, a CTA an SM fewer (tools/occupancy.py).
        MRA_UNROLL
        for (int32_t d = 0; d < D; d += 4)
        {
            accumulate(d);
        }
    }
    else
    {
        for (int32_t d = 0; d < D; d += 4)
        {
            accumulate(d);
        }
    }
    // PyTorch divides by sqrt(head_dim), p.scaleDivisor. Where that is a power of 2 (head_dim 16, 64,
    // 256), x * (1 / sqrt) is the same quotient rounded once, the same bits, without each division's
    // range check and slow-path branch (which cut the unrolled loop into blocks ptxas schedules apart).
    float const inverseScale = 1.0f / p.scaleDivisor; // exact where it is used
    MRA_UNROLL
    for (int32_t h = 0; h < 2; ++h)
    {
        MRA_UNROLL
        for (int32_t t = 0; t < 4; ++t)
        {
            scores[h][t] = isPowerOfFour(D) ? dot[h][t] * inverseScale : dot[h][t] / p.scaleDivisor;
        }
    }
}

//! One CTA per (row, query block i), kSplit groups of 128 threads: thread x of a group takes query
//! rows r = x / 8 and r + 16, keys lane + 8t of each block (lane = x % 8) and the output dims in
//! 16-byte groups lane, lane + 8, ...: every K and V float4 it reads from shared memory serves
//! two rows. Group g takes the query block's key blocks g, g + kSplit, ...; group 0 merges the
//! others' sums and writes. The CTAs of a row are adjacent (L2 reuse).
template <int D, int kSplit>
__global__ void __launch_bounds__(kHighResThreads * kSplit) highResolutionFma(
    Problem p, float const* query, float const* key, float const* value, int32_t const* mask, Scratch s, float* output)
{
    static_assert(kHighResThreads == 8 * kBlock / 2, "8 threads per pair of query rows");
    using Smem = FmaSmem<D, kSplit>;
    constexpr int kGroups = D / 32; // the thread's 16-byte groups of output dims
    extern __shared__ __align__(128) unsigned char smem[];
    int32_t const group = threadIdx.x / kHighResThreads;
    int32_t const groupThread = threadIdx.x % kHighResThreads;
    float* queryTile = reinterpret_cast<float*>(smem);
    float* stageTiles = reinterpret_cast<float*>(smem + Smem::kTile);
    float* weightTile = reinterpret_cast<float*>(smem + Smem::kWeightsAt + group * Smem::kWeights);

    int32_t const i = blockIdx.x % p.nb;
    int32_t const row = blockIdx.x / p.nb;
    int32_t const r = groupThread / 8;
    int32_t const lane = groupThread % 8;
    int32_t const rows[2] = {r, r + 16};

    copyTiles<float, D, 1, kHighResThreads * kSplit>(p, {query}, realTokenBits(p, mask, row / p.heads, i), row,
        i * kBlock, {queryTile}, Smem::kTileStride, threadIdx.x);
    waitForPreviousKernel(); // the selected blocks, the low-resolution terms; Q is the caller's
    SoftmaxStats stats[2];
    float4 out[2][kGroups] = {}; // sum exp(P - baseMax) V at dims 4 (lane + 8 group) .. + 3
    forEachKeyBlock<float, D, kHighResThreads, Smem::kStages, kSplit>(p, key, value, mask, s, row, i, stageTiles,
        Smem::kTileStride, [&](float const* keyTile, float const* valueTile, uint32_t blockRealKeys) {
        float scores[2][4];
        scoresByFma<D>(p, queryTile, keyTile, r, lane, scores);
        bool real[4];
        for (int32_t t = 0; t < 4; ++t)
        {
            real[t] = (blockRealKeys >> (lane + 8 * t)) & 1u;
        }
        float rescale[2];
        for (int32_t h = 0; h < 2; ++h)
        {
            float weights[4];
            rescale[h] = stats[h].absorb<SoftmaxArithmetic::kExact, 8, false>(scores[h], real, weights);
            for (int32_t t = 0; t < 4; ++t)
            {
                weightTile[rows[h] * Smem::kWeightStride + lane + 8 * t] = weights[t];
            }
        }
        __syncwarp(); // a row's 8 threads are one quarter of a warp
        MRA_UNROLL
        for (int32_t h = 0; h < 2; ++h)
        {
            MRA_UNROLL
            for (int32_t group = 0; group < kGroups; ++group)
            {
                out[h][group].x *= rescale[h];
                out[h][group].y *= rescale[h];
                out[h][group].z *= rescale[h];
                out[h][group].w *= rescale[h];
            }
        }
        MRA_UNROLL // whole at every head_dim (the scores' loop from 64): no loop test, 16-byte weight loads
        for (int32_t k = 0; k < kBlock; ++k)
        {
            float const weight[2] = {weightTile[rows[0] * Smem::kWeightStride + k],
                weightTile[rows[1] * Smem::kWeightStride + k]};
            MRA_UNROLL
            for (int32_t group = 0; group < kGroups; ++group)
            {
                float4 const v
                    = *reinterpret_cast<float4 const*>(valueTile + k * Smem::kTileStride + 4 * (lane + 8 * group));
                MRA_UNROLL
                for (int32_t h = 0; h < 2; ++h)
                {
                    out[h][group].x += weight[h] * v.x;
                    out[h][group].y += weight[h] * v.y;
                    out[h][group].z += weight[h] * v.z;
                    out[h][group].w += weight[h] * v.w;
                }
            }
        }
    });

    mergeGroups<Smem, kSplit, kHighResThreads, 8 * kGroups>(smem, group, groupThread, stats, [&](auto&& visit) {
        MRA_UNROLL
        for (int32_t h = 0; h < 2; ++h)
        {
            MRA_UNROLL
            for (int32_t d = 0; d < kGroups; ++d)
            {
                visit(out[h][d].x, h);
                visit(out[h][d].y, h);
                visit(out[h][d].z, h);
                visit(out[h][d].w, h);
            }
        }
    });
    LowResolution const low(p, s, row, i);
    float const blockRowMax = s.rowMax[row * p.nb + i];
    __syncthreads(); // the query tile becomes the output staging tile
    for (int32_t h = 0; h < 2 && group == 0; ++h)
    {
        RowEpilogue<false> const combine(p, stats[h], blockRowMax, low.norm);
        bool const queryReal = isReal(p, mask, row / p.heads, i * kBlock + rows[h]);
        for (int32_t group = 0; group < kGroups; ++group)
        {
            int32_t const d = 4 * (lane + 8 * group);
            float4 const hi = out[h][group];
            float4 const lowOut = low.out4(d);
            *reinterpret_cast<float4*>(queryTile + rows[h] * Smem::kTileStride + d) = queryReal
                ? make_float4(combine(hi.x, lowOut.x), combine(hi.y, lowOut.y), combine(hi.z, lowOut.z),
                    combine(hi.w, lowOut.w))
                : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
    }
    __syncthreads();
    storeOutputTile<float, D>(p, queryTile, Smem::kTileStride, row, i, output);
}

// ---- (c) fp16/bf16: tensor cores -----------------------------------------------------------
//
// FlashAttention-2's layout on mma.sync.m16n8k16 (sm_80 and later): warp w of 2 holds query rows
// 16w..16w+15; S = Q K^T, the softmax and O += P V stay in registers, as the accumulator
// fragment of S is, pair for pair, the A fragment of P. In a fragment, lane = 4 g + t holds rows
// g and g + 8 and, of an 8-wide n tile, columns 2t and 2t + 1 (PTX ISA, "Matrix Fragments for
// mma.m16n8k16").

constexpr int kMmaGroupThreads = 64; // a group of 2 warps holds a query block

//! d += a b for one warp: A 16x16 row-major, B 16x8 column-major (T: __half or __nv_bfloat16),
//! D fp32, in the PTX ISA's fragments; a register holds two adjacent elements, the lower column
//! (A) or row (B) in its low half.
template <typename T>
__device__ inline void warpMma(float (&d)[4], uint32_t const (&a)[4], uint32_t const (&b)[2])
{
#ifdef MRA_CUDA_EMULATION_H // the CPU emulation (plugins/tests/cuda_emulation), same fragments
    ::emu::mmaM16N8K16<T>(__FILE__, __LINE__, d, a, b);
#else
    if constexpr (std::is_same<T, __half>::value)
    {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                     "{%8, %9}, {%0, %1, %2, %3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
    else
    {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                     "{%8, %9}, {%0, %1, %2, %3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
#endif
}

//! ldmatrix.m8n8.x4: lane l gives the address of row l % 8 of 8x8 matrix l / 8 (8 16-bit
//! elements, 16 bytes, aligned) in shared memory; register i receives matrix i's fragment,
//! row l / 4 and columns 2 (l % 4) + {0, 1} (an A or a row-major B fragment of mma.m16n8k16),
//! or with `kTransposed` rows 2 (l % 4) + {0, 1} of column l / 4 (a B fragment from a tile
//! stored k-major, as V is).
template <bool kTransposed>
__device__ __forceinline__ void loadMatrices(uint32_t (&r)[4], void const* rowAddress)
{
#ifdef MRA_CUDA_EMULATION_H
    ::emu::ldmatrixX4(__FILE__, __LINE__, r, rowAddress, kTransposed);
#else
    uint32_t const address = static_cast<uint32_t>(__cvta_generic_to_shared(rowAddress));
    if constexpr (kTransposed)
    {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(address));
    }
    else
    {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(address));
    }
#endif
}

//! Two floats rounded to T, the first in the low half.
template <typename T>
__device__ inline uint32_t packPair(float low, float high)
{
    union
    {
        uint32_t word;
        T values[2];
    } packed;
    packed.values[0] = Storage<T>::fromFloat(low);
    packed.values[1] = Storage<T>::fromFloat(high);
    return packed.word;
}

//! Shared memory of the tensor-core kernel (bytes): the query tile and kStages (K, V) tile pairs
//! (each K tile's first pad holds its stage's key mask). Tiles row-major, rows padded by 8
//! elements (16 bytes), so that the 8 rows of an ldmatrix matrix fall in distinct banks. V is not
//! stored transposed: a warp's 2-byte transposing stores fall in 2 banks (8-way conflicts);
//! ldmatrix.trans transposes it on the way to the registers instead. kStages - 1 key blocks in
//! flight while one is computed: the kernel waits on memory (2-3% of the tensor peak under ncu,
//! 2026-12-04), and its CTAs compute little.
//! With kSplit groups of 2 warps, each group has stages of its own; after the loop the other
//! groups' partial sums pass to group 0 through their (then idle) stage tiles.
template <typename T, int D, int kSplit>
struct MmaSmem
{
    static constexpr int kStages = kSplit > 1 ? MRA_MMA_SPLIT_STAGES : MRA_MMA_STAGES;
    static constexpr int kTileStride = D + 8;
    static_assert((kTileStride - D) * sizeof(T) >= sizeof(uint32_t) && D * sizeof(T) % sizeof(uint32_t) == 0,
        "a row's pad holds a key mask's aligned word");
    static constexpr size_t kTile = sizeof(T) * kBlock * kTileStride;
    static constexpr size_t kGroupTiles = 2 * kStages * kTile; // a group's stages
    static constexpr size_t kTotal = kTile + kSplit * kGroupTiles;
    static_assert(kMmaGroupThreads * kPartialFloats<D / 2> * sizeof(float) <= kGroupTiles,
        "a group's partial sums fit its stages");
};

//! The launch bounds' minimum CTAs an SM of highResolutionMma<T, D, kSplit> on sm_90 and later
//! (MRA_MMA_SPLIT_MIN_CTAS); 0: ptxas' own choice (an explicit 1 would let it take up to 255
//! registers).
template <int D, int kSplit>
constexpr int kMmaMinCtasPerSm =
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    D == 64 && kSplit > 1 ? MRA_MMA_SPLIT_MIN_CTAS : 0;
#else
    0;
#endif
static_assert(MRA_MMA_SPLIT_MIN_CTAS >= 0, "a launch bound's minimum CTAs an SM, or 0");

//! One CTA per (row, query block i), kSplit groups of 2 warps; the CTAs of a row are adjacent
//! (L2 reuse). Each group takes every kSplit-th of the query block's key blocks (a query block
//! may hold several times the mean, and alone it would keep the GPU waiting at batch 1); group 0
//! then merges the others' partial sums, as the blocks' softmax statistics merge, and writes.
template <typename T, int D, int kSplit>
__global__ void __launch_bounds__(kMmaGroupThreads * kSplit, (kMmaMinCtasPerSm<D, kSplit>)) highResolutionMma(
    Problem p, T const* query, T const* key, T const* value, int32_t const* mask, Scratch s, T* output)
{
    using Smem = MmaSmem<T, D, kSplit>;
    constexpr int kThreads = kMmaGroupThreads * kSplit;
    constexpr int kDimTiles = D / 8;
    extern __shared__ __align__(128) unsigned char smem[];
    T* queryTile = reinterpret_cast<T*>(smem);
    T* stageTiles = reinterpret_cast<T*>(smem + Smem::kTile);

    int32_t const i = blockIdx.x % p.nb;
    int32_t const row = blockIdx.x / p.nb;
    int32_t const lane = threadIdx.x % 32;
    int32_t const g = lane / 4;
    int32_t const t = lane % 4;
    int32_t const group = threadIdx.x / kMmaGroupThreads;
    int32_t const groupThread = threadIdx.x % kMmaGroupThreads;
    int32_t const warpRow = 16 * (groupThread / 32); // the warp's first query row
    int32_t const rows[2] = {warpRow + g, warpRow + g + 8};
    int32_t const matrixRow = lane % 8 + 8 * (lane / 8 % 2); // the row lane l addresses for ldmatrix
    // Scaled by the reciprocal (1 ulp from dividing, far inside fp16/bf16 tolerances).
    float const inverseScale = 1.0f / p.scaleDivisor;

    copyTiles<T, D, 1, kThreads>(p, {query}, realTokenBits(p, mask, row / p.heads, i), row, i * kBlock, {queryTile},
        Smem::kTileStride, threadIdx.x);
    waitForPreviousKernel(); // the selected blocks, the low-resolution terms; Q is the caller's
    SoftmaxStats stats[2];             // rows[0], rows[1]
    float out[kDimTiles][4] = {};      // O's accumulator fragments: dims 8n + 2t (+1) of rows[0], rows[1]
    // The normalisers' fragments: P times a tile of ones, whose every column is the row's sum of
    // its weights as P V multiplies them (rounded to T): registers 0, 1 rows[0], 2, 3 rows[1].
    float normTile[4] = {};
    uint32_t const ones = packPair<T>(1.0f, 1.0f);
    // Q's A fragments, loaded once the first block's copies have landed and kept for every key
    // block (as FlashAttention-2 keeps them): dims 16k..16k+15 of the warp's 16 rows.
    uint32_t queryFragments[D / 16][4];
    bool queryLoaded = false;
    forEachKeyBlock<T, D, kMmaGroupThreads, Smem::kStages, kSplit>(p, key, value, mask, s, row, i, stageTiles,
        Smem::kTileStride, [&](T const* keyTile, T const* valueTile, uint32_t blockRealKeys) {
        // Lane l addresses row l % 8 of matrix l / 8: for Q, rows + 8 (l / 8 % 2) at dims
        // 16k + 8 (l / 16) (A's four registers); for K, keys 8 (n + l / 16) + l % 8 at dims
        // 16k + 8 (l / 8 % 2) (the two registers of n tiles n and n + 1).
        if (!queryLoaded) // the query tile landed with the first block's group
        {
            MRA_UNROLL
            for (int32_t k = 0; k < D / 16; ++k)
            {
                loadMatrices<false>(queryFragments[k],
                    queryTile + (warpRow + matrixRow) * Smem::kTileStride + 16 * k + 8 * (lane / 16));
            }
            queryLoaded = true;
        }
        // S = Q K^T: n tile n holds keys 8n..8n+7; K's rows are B's columns.
        float scoreTiles[4][4] = {};
        MRA_UNROLL
        for (int32_t k = 0; k < D / 16; ++k)
        {
            MRA_UNROLL
            for (int32_t n = 0; n < 4; n += 2)
            {
                uint32_t b[4];
                loadMatrices<false>(b, keyTile + (8 * n + lane % 8 + 8 * (lane / 16)) * Smem::kTileStride + 16 * k
                        + 8 * (lane / 8 % 2));
                warpMma<T>(scoreTiles[n], queryFragments[k], {b[0], b[1]});
                warpMma<T>(scoreTiles[n + 1], queryFragments[k], {b[2], b[3]});
            }
        }

        // The softmax of each of the thread's two rows: its keys 8n + 2t + c (n < 4, c < 2).
        float weights[2][8];
        float rescale[2];
        byKeyPadding(blockRealKeys, [&](auto everyKeyReal) {
            MRA_UNROLL
            for (int32_t h = 0; h < 2; ++h)
            {
                float scores[8];
                bool real[8];
                MRA_UNROLL
                for (int32_t n = 0; n < 4; ++n)
                {
                    MRA_UNROLL
                    for (int32_t c = 0; c < 2; ++c)
                    {
                        scores[2 * n + c] = scoreTiles[n][2 * h + c] * inverseScale;
                        real[2 * n + c] = (blockRealKeys >> (8 * n + 2 * t + c)) & 1u;
                    }
                }
                rescale[h] = stats[h].absorb<SoftmaxArithmetic::kTensorCore, 4, decltype(everyKeyReal)::value>(
                    scores, real, weights[h]);
            }
        });
        // The bases are lazy: mostly no row of the warp's 16 moved its own, and O stays as it is.
        if (__any_sync(0xffffffffu, rescale[0] != 1.0f || rescale[1] != 1.0f))
        {
            MRA_UNROLL
            for (int32_t c = 0; c < 4; ++c) // registers 0, 1: rows[0]; 2, 3: rows[1]
            {
                MRA_UNROLL
                for (int32_t n = 0; n < kDimTiles; ++n)
                {
                    out[n][c] *= rescale[c / 2];
                }
                normTile[c] *= rescale[c / 2];
            }
        }

        // O += P V: P's A fragment for keys 16u..16u+15 is S's n tiles 2u and 2u + 1, rounded to T.
        // V's B fragments by ldmatrix.trans: lane l addresses key 16u + matrixRow at dims
        // 8 (n + l / 16) (the two registers of dim tiles n and n + 1).
        MRA_UNROLL
        for (int32_t u = 0; u < 2; ++u)
        {
            uint32_t const a[4] = {packPair<T>(weights[0][4 * u], weights[0][4 * u + 1]),
                packPair<T>(weights[1][4 * u], weights[1][4 * u + 1]),
                packPair<T>(weights[0][4 * u + 2], weights[0][4 * u + 3]),
                packPair<T>(weights[1][4 * u + 2], weights[1][4 * u + 3])};
            MRA_UNROLL
            for (int32_t n = 0; n < kDimTiles; n += 2)
            {
                uint32_t b[4];
                loadMatrices<true>(b, valueTile + (16 * u + matrixRow) * Smem::kTileStride + 8 * (n + lane / 16));
                warpMma<T>(out[n], a, {b[0], b[1]});
                warpMma<T>(out[n + 1], a, {b[2], b[3]});
            }
            warpMma<T>(normTile, a, {ones, ones});
        }
    });
    stats[0].norm = normTile[0];
    stats[1].norm = normTile[2];

    mergeGroups<Smem, kSplit, kMmaGroupThreads, 4 * kDimTiles>(smem, group, groupThread, stats, [&](auto&& visit) {
        MRA_UNROLL
        for (int32_t n = 0; n < kDimTiles; ++n)
        {
            MRA_UNROLL
            for (int32_t c = 0; c < 4; ++c)
            {
                visit(out[n][c], c / 2); // registers 0, 1: row g; 2, 3: row g + 8
            }
        }
    });
    LowResolution const low(p, s, row, i);
    float const blockRowMax = s.rowMax[row * p.nb + i];
    __syncthreads(); // the query tile becomes the output staging tile
    MRA_UNROLL
    for (int32_t h = 0; h < 2 && group == 0; ++h)
    {
        RowEpilogue<true> const combine(p, stats[h], blockRowMax, low.norm);
        bool const queryReal = isReal(p, mask, row / p.heads, i * kBlock + rows[h]);
        MRA_UNROLL
        for (int32_t n = 0; n < kDimTiles; ++n)
        {
            int32_t const d = 8 * n + 2 * t;
            float const first = queryReal ? combine(out[n][2 * h], low.out(d)) : 0.0f;
            float const second = queryReal ? combine(out[n][2 * h + 1], low.out(d + 1)) : 0.0f;
            *reinterpret_cast<uint32_t*>(queryTile + rows[h] * Smem::kTileStride + d) = packPair<T>(first, second);
        }
    }
    __syncthreads();
    storeOutputTile<T, D>(p, queryTile, Smem::kTileStride, row, i, output);
}

// ---- launching -----------------------------------------------------------------------------

MraStatus cudaFailure(cudaError_t error, char const* where)
{
    std::snprintf(gLastCudaError, sizeof(gLastCudaError), "%s: %s", where, cudaGetErrorString(error));
    return MRA_CUDA_ERROR;
}

#define MRA_RETURN_IF_FAILED(call)                                                                                     \
    do                                                                                                                 \
    {                                                                                                                  \
        MraStatus const status_ = (call);                                                                              \
        if (status_ != MRA_OK)                                                                                         \
        {                                                                                                              \
            return status_;                                                                                            \
        }                                                                                                              \
    } while (0)

//! `value` for the current device: `compute(device, value)` the first time a device is asked
//! for, what it gave since (`known`, guarded by `mutex`, is the caller's cache).
template <typename Value, typename Compute>
MraStatus forCurrentDevice(std::mutex& mutex, std::map<int, Value>& known, Value& value, Compute&& compute)
{
    int device = 0;
    cudaError_t const status = cudaGetDevice(&device);
    if (status != cudaSuccess)
    {
        return cudaFailure(status, "cudaGetDevice");
    }
    std::lock_guard<std::mutex> const lock(mutex);
    auto const found = known.find(device);
    if (found != known.end())
    {
        value = found->second;
        return MRA_OK;
    }
    MRA_RETURN_IF_FAILED(compute(device, value));
    known[device] = value;
    return MRA_OK;
}

static_assert(MRA_SPLIT == 1 || MRA_SPLIT == 2, "MRA_SPLIT: 1 or 2 thread groups a query block");
static_assert(MRA_SELECT_CLUSTER >= 1 && MRA_SELECT_CLUSTER <= 8 && (MRA_SELECT_CLUSTER & (MRA_SELECT_CLUSTER - 1)) == 0,
    "MRA_SELECT_CLUSTER: 1, 2, 4 or 8 CTAs");
static_assert(MRA_SELECT_CLUSTER_BY_CELLS == 0 || MRA_SELECT_CLUSTER_BY_CELLS == 1, "MRA_SELECT_CLUSTER_BY_CELLS: 0 or 1");

//! What the launches need to know of the code the current device runs.
struct DeviceCode
{
    //! Compiled for sm_90 or later, so it has griddepcontrol.wait and clusters (an sm_80
    //! build's PTX compiled for an H100 at load time has not: launched as dependents its kernels
    //! would race, and its selection ignores clusters).
    bool sm90 = false;
    //! How many clusters of 2, 4 and 8 selectBlocks CTAs (index 1, 2, 3) the GPU runs at once: its
    //! SMs are grouped (GPCs), and a partition of a GPU may hold fewer of them; 0 without clusters
    //! and beyond MRA_SELECT_CLUSTER.
    int32_t concurrentClusters[4] = {};
};

//! The launch attribute of 1-D clusters of `size` CTAs.
cudaLaunchAttribute clusterDimension(uint32_t size)
{
    cudaLaunchAttribute cluster{};
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = size;
    cluster.val.clusterDim.y = 1;
    cluster.val.clusterDim.z = 1;
    return cluster;
}

//! How many clusters of `size` selectBlocks CTAs the GPU runs at once (0: none, or refused).
int32_t concurrentSelectionClusters(uint32_t size)
{
    cudaLaunchAttribute cluster = clusterDimension(size);
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(size);
    config.blockDim = dim3(kSelectThreads);
    config.dynamicSmemBytes = sizeof(SelectionShared);
    config.attrs = &cluster;
    config.numAttrs = 1;
    int clusters = 0;
    cudaError_t const status = cudaOccupancyMaxActiveClusters(&clusters, selectBlocks, &config);
    if (status != cudaSuccess)
    {
        cudaGetLastError(); // a refusal answers the question; it is not the next launch's error
        return 0;
    }
    return clusters;
}

MraStatus currentDeviceCode(DeviceCode& code)
{
    static std::mutex mutex;
    static std::map<int, DeviceCode> byDevice;
    return forCurrentDevice(mutex, byDevice, code, [](int, DeviceCode& value) {
        cudaFuncAttributes attributes{};
        cudaError_t const status = cudaFuncGetAttributes(&attributes, lowResolutionLogits);
        if (status != cudaSuccess)
        {
            return cudaFailure(status, "cudaFuncGetAttributes(lowResolutionLogits)");
        }
        value = DeviceCode{};
        value.sm90 = attributes.ptxVersion >= 90;
        for (int log2 = 1; value.sm90 && (1 << log2) <= MRA_SELECT_CLUSTER; ++log2)
        {
            value.concurrentClusters[log2] = concurrentSelectionClusters(1u << log2);
        }
        return MRA_OK;
    });
}

//! The current device's SMs.
MraStatus multiprocessorCount(int32_t& multiprocessors)
{
    int device = 0;
    cudaError_t status = cudaGetDevice(&device);
    if (status != cudaSuccess)
    {
        return cudaFailure(status, "cudaGetDevice");
    }
    int count = 0;
    status = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
    if (status != cudaSuccess)
    {
        return cudaFailure(status, "cudaDeviceGetAttribute(cudaDevAttrMultiProcessorCount)");
    }
    multiprocessors = count;
    return MRA_OK;
}

//! selectBlocks' CTAs per row: the largest power of two (up to 8) for which every row's cluster
//! runs at once and the rows' CTAs still fit the SMs one each (a CTA's 512 threads take an SM's
//! registers); 1 without clusters. By the SMs alone, on 132: 8 at batch 1 of 12 heads, 4 at
//! batch 2, 2 at batches 3 to 5, 1 from batch 6 (where the GPU runs that many clusters at once).
//! Then no more CTAs than shorten the threads' runs of the row's `cells` (ThreadKeys): past that,
//! a CTA adds only its waits at the cluster's barriers. A run of ceil(cells / threads) cells is as
//! short on half the CTAs exactly where those hold a thread a cell, cells <= size * 512 / 2: a row
//! of up to 512 cells (704 tokens) takes one CTA, one of 1024 cells (1024 tokens) at most two;
//! 2048 tokens and more keep every CTA the SMs allow.
MraStatus selectionClusterSize(int32_t rows, int32_t cells, DeviceCode const& code, uint32_t& size)
{
    size = 1;
    if (code.concurrentClusters[1] == 0)
    {
        return MRA_OK;
    }
    int32_t multiprocessors = 0;
    MRA_RETURN_IF_FAILED(multiprocessorCount(multiprocessors));
    for (int log2 = 1; log2 < 4; ++log2)
    {
        bool const fits = rows <= code.concurrentClusters[log2] && static_cast<int64_t>(rows) << log2 <= multiprocessors;
        size = fits ? 1u << log2 : size;
    }
    while (MRA_SELECT_CLUSTER_BY_CELLS && size > 1 && cells <= static_cast<int64_t>(size / 2) * kSelectThreads)
    {
        size /= 2;
    }
    return MRA_OK;
}

//! How launchKernel starts a kernel: after the stream's previous work (the first kernel), or as
//! a programmatic dependent of the kernel before it (the others, on a GPU that takes it).
struct LaunchOrder
{
    cudaStream_t stream;
    bool dependent;
};

//! A kernel's grid: `grid` CTAs of `threads`, with `sharedBytes` of dynamic shared memory, in
//! clusters of `cluster` CTAs (1: none).
struct LaunchShape
{
    int32_t grid;
    int32_t threads;
    size_t sharedBytes = 0;
    uint32_t cluster = 1;
};

//! Launches `kernel(args...)` in `shape` on `order.stream`, as a programmatic dependent where
//! `order` says so; `name` names it in an error.
template <typename... Params, typename... Args>
MraStatus launchKernel(char const* name, void (*kernel)(Params...), LaunchShape const& shape, LaunchOrder const& order,
    Args const&... args)
{
    cudaLaunchAttribute attributes[2]{};
    unsigned count = 0;
    if (order.dependent)
    {
        attributes[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attributes[count++].val.programmaticStreamSerializationAllowed = 1;
    }
    if (shape.cluster > 1)
    {
        attributes[count++] = clusterDimension(shape.cluster);
    }
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(static_cast<unsigned>(shape.grid));
    config.blockDim = dim3(static_cast<unsigned>(shape.threads));
    config.dynamicSmemBytes = shape.sharedBytes;
    config.stream = order.stream;
    config.attrs = attributes;
    config.numAttrs = count;
    cudaError_t const launched = cudaLaunchKernelEx(&config, kernel, args...);
    // Read (and so cleared) either way: a failed launch is also the thread's last error, which
    // the next call would otherwise report as its own; the emulation reports only there.
    cudaError_t const last = cudaGetLastError();
    cudaError_t const error = launched != cudaSuccess ? launched : last;
    return error == cudaSuccess ? MRA_OK : cudaFailure(error, name);
}

// The most dynamic shared memory a CTA may have on every default architecture: sm_86's and
// sm_89's 99 KB (sm_80: 163 KB, sm_90: 227 KB).
constexpr size_t kMaxSharedPerCta = 99 * 1024;

//! The high-resolution kernel's dynamic shared memory (only the chosen kernel's layout is made).
template <typename T, int D, int kSplit>
constexpr size_t highResolutionSmem()
{
    if constexpr (sizeof(T) == 2)
    {
        return MmaSmem<T, D, kSplit>::kTotal;
    }
    else
    {
        return FmaSmem<D, kSplit>::kTotal;
    }
}

//! The high-resolution kernel of a storage type and head dim, with its shared memory and CTA:
//! kSplit thread groups per query block (2 warps each on tensor cores, 4 in fp32).
template <typename T, int D, int kSplit>
struct HighResolutionKernel
{
    using Kernel = void (*)(Problem, T const*, T const*, T const*, int32_t const*, Scratch, T*);
    static constexpr bool kTensorCores = sizeof(T) == 2;
    static constexpr size_t kSmem = highResolutionSmem<T, D, kSplit>();
    static_assert(kSmem <= kMaxSharedPerCta, "within the shared memory a CTA may have on sm_86 and sm_89");
    static constexpr int kThreads = (kTensorCores ? kMmaGroupThreads : kHighResThreads) * kSplit;

    static Kernel kernel()
    {
        if constexpr (kTensorCores)
        {
            return highResolutionMma<T, D, kSplit>;
        }
        else
        {
            return highResolutionFma<D, kSplit>;
        }
    }
};

//! Opts the kernel in to more than 48 KB of shared memory and gives how many of its CTAs an SM
//! holds. The attribute belongs to the current device's context, so it is set once per
//! (instantiation, device), not once per process.
template <typename T, int D, int kSplit>
MraStatus prepareHighResolution(int32_t& ctasPerMultiprocessor)
{
    static std::mutex mutex;
    static std::map<int, int32_t> byDevice;
    return forCurrentDevice(mutex, byDevice, ctasPerMultiprocessor, [](int, int32_t& ctas) {
        using Chosen = HighResolutionKernel<T, D, kSplit>;
        cudaError_t status = cudaFuncSetAttribute(
            Chosen::kernel(), cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(Chosen::kSmem));
        if (status != cudaSuccess)
        {
            return cudaFailure(status, "cudaFuncSetAttribute(highResolution)");
        }
        int active = 0;
        status = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&active, Chosen::kernel(), Chosen::kThreads, Chosen::kSmem);
        if (status != cudaSuccess)
        {
            return cudaFailure(status, "cudaOccupancyMaxActiveBlocksPerMultiprocessor(highResolution)");
        }
        ctas = active;
        return MRA_OK;
    });
}

//! The high-resolution kernel with kSplit thread groups a query block (prepareHighResolution'd).
template <typename T, int D, int kSplit>
MraStatus launchHighResolutionGroups(Problem const& p, void const* q, void const* k, void const* v, int32_t const* mask,
    Scratch const& s, void* output, LaunchOrder const& order)
{
    using Chosen = HighResolutionKernel<T, D, kSplit>;
    return launchKernel("highResolution", Chosen::kernel(), {p.nb * p.rows, Chosen::kThreads, Chosen::kSmem}, order, p,
        static_cast<T const*>(q), static_cast<T const*>(k), static_cast<T const*>(v), mask, s, static_cast<T*>(output));
}

//! A high-resolution CTA splits its query block's key blocks over MRA_SPLIT thread groups where
//! unsplit CTAs would fill the GPU's CTA slots fewer than this many times over. A query block's
//! selected blocks vary (in mode "full" the top k are the row's, not the query block's: at 4096
//! tokens and 8 a query block on random inputs, from 1 to 32), and a CTA takes its blocks one
//! after another: at batch 1 the heaviest query blocks then set the time. With many waves of
//! CTAs the GPU stays busy anyway, and unsplit CTAs fit more to an SM.
constexpr int64_t kSplitBelowWaves = MRA_SPLIT_BELOW_WAVES;

//! Where a kernel of this type and head dim can split: its split layout fits every architecture's
//! shared memory (in fp32 up to head_dim 64).
template <typename T, int D>
constexpr bool kCanSplit = MRA_SPLIT > 1 && highResolutionSmem<T, D, MRA_SPLIT>() <= kMaxSharedPerCta;

//! highResolution for these shapes: split (above) or not.
template <typename T, int D>
MraStatus launchHighResolution(Problem const& p, void const* q, void const* k, void const* v, int32_t const* mask,
    Scratch const& s, void* output, LaunchOrder const& order)
{
    int32_t ctasPerMultiprocessor = 0;
    MRA_RETURN_IF_FAILED((prepareHighResolution<T, D, 1>(ctasPerMultiprocessor))); // parenthesised: commas
    if constexpr (kCanSplit<T, D>)
    {
        int32_t multiprocessors = 0;
        MRA_RETURN_IF_FAILED(multiprocessorCount(multiprocessors));
        int64_t const slots = static_cast<int64_t>(multiprocessors) * ctasPerMultiprocessor;
        if (static_cast<int64_t>(p.nb) * p.rows < kSplitBelowWaves * slots)
        {
            MRA_RETURN_IF_FAILED((prepareHighResolution<T, D, MRA_SPLIT>(ctasPerMultiprocessor)));
            return launchHighResolutionGroups<T, D, MRA_SPLIT>(p, q, k, v, mask, s, output, order);
        }
    }
    return launchHighResolutionGroups<T, D, 1>(p, q, k, v, mask, s, output, order);
}

template <typename T>
MraStatus launchAll(Problem const& p, void const* q, void const* k, void const* v, int32_t const* mask, Scratch const& s,
    void* output, cudaStream_t stream)
{
    DeviceCode code;
    MRA_RETURN_IF_FAILED(currentDeviceCode(code));
    uint32_t selectionCluster = 1;
    MRA_RETURN_IF_FAILED(selectionClusterSize(p.rows, p.nb * p.nb, code, selectionCluster));
    LaunchOrder const first{stream, false};
    LaunchOrder const next{stream, MRA_DEPENDENT_LAUNCH != 0 && code.sm90};
    MRA_RETURN_IF_FAILED(launchKernel("blockMeans", blockMeans<T>, {p.nb * p.rows, meanThreads<T>(p.headDim)}, first,
        p, static_cast<T const*>(q), static_cast<T const*>(k), static_cast<T const*>(v), mask, s.counts, s.queryMean,
        s.keyMean, s.valueMean));
    LaunchShape const logitShape{logitQueryGroups(p.nb) * p.rows, kLogitThreads};
    MRA_RETURN_IF_FAILED(launchKernel("lowResolutionLogits", lowResolutionLogits, logitShape, next, p, s));
    LaunchShape const selectShape{
        p.rows * static_cast<int32_t>(selectionCluster), kSelectThreads, sizeof(SelectionShared), selectionCluster};
    MRA_RETURN_IF_FAILED(launchKernel("selectBlocks", selectBlocks, selectShape, next, p, s));
    if (p.full)
    {
        MRA_RETURN_IF_FAILED(launchKernel("lowResolutionTerms", lowResolutionTerms, logitShape, next, p, s));
    }
    switch (p.headDim)
    {
    case 32: return launchHighResolution<T, 32>(p, q, k, v, mask, s, output, next);
    case 64: return launchHighResolution<T, 64>(p, q, k, v, mask, s, output, next);
    case 128: return launchHighResolution<T, 128>(p, q, k, v, mask, s, output, next);
    default: return MRA_UNSUPPORTED;
    }
}

} // namespace
} // namespace mra

extern "C" MraStatus mraAttentionCuda(MraAttentionParams const* params, void const* query, void const* key,
    void const* value, int32_t const* mask, void* output, void* workspace, size_t workspaceSize, void* stream)
{
    using namespace mra;
    MraStatus const status = mraCheckParams(params);
    if (status != MRA_OK)
    {
        return status;
    }
    if (query == nullptr || key == nullptr || value == nullptr || mask == nullptr || output == nullptr
        || workspace == nullptr)
    {
        return MRA_INVALID_ARGUMENT;
    }
    if (!isVectorAligned(query) || !isVectorAligned(key) || !isVectorAligned(value) || !isVectorAligned(output))
    {
        return MRA_INVALID_ARGUMENT; // the tiles move in 16-byte vectors
    }
    bool const supported = params->block_size == kBlock
        && (params->head_dim == 32 || params->head_dim == 64 || params->head_dim == 128);
    if (!supported)
    {
        return MRA_UNSUPPORTED;
    }
    Problem const problem = makeProblem(*params);
    WorkspaceLayout const layout = makeLayout(problem);
    if (workspaceSize < layout.total)
    {
        return MRA_WORKSPACE_TOO_SMALL;
    }
    Scratch const scratch(layout, workspace);
    cudaStream_t const cudaStream = static_cast<cudaStream_t>(stream);
    switch (params->dtype)
    {
    case MRA_FLOAT32: return launchAll<float>(problem, query, key, value, mask, scratch, output, cudaStream);
    case MRA_FLOAT16: return launchAll<__half>(problem, query, key, value, mask, scratch, output, cudaStream);
    case MRA_BFLOAT16: return launchAll<__nv_bfloat16>(problem, query, key, value, mask, scratch, output, cudaStream);
    }
    return MRA_INVALID_ARGUMENT;
}

extern "C" char const* mraLastCudaError(void)
{
    return mra::gLastCudaError;
}
