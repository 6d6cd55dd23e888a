/*
 * CUDA kernels of the MRA attention plugin (mraAttention.h), stage by stage like the CPU twin
 * (mraAttentionReference.cpp):
 *   (a) countTokens, blockMeans, lowResolutionLogits: block means and low-resolution logits;
 *   (b) selectBlocks: row max, masking and priors (selectionScore), then a radix select of the
 *       k-th largest score and a block-wide scan that takes ties in flat order;
 *   (c) highResolution: per (batch * head, query block), a loop over that row's selected key
 *       blocks with an online (FlashAttention-style) running max, 32x32 scores, exp and P.V
 *       accumulation in registers; no S x S or nb x nb x 32 x 32 tensor in global memory;
 *   (d) its epilogue: the 1e-3-quantised row max, the low-resolution term and the correction.
 * fp32 uses FMA; fp16 and bf16 use tensor cores (WMMA, fp32 accumulation). Everything runs on
 * the caller's stream, uses only the workspace, and reports launch errors.
 */
#include "mraAttention.h"
#include "mraAttentionCommon.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <cfloat>
#include <cstdint>
#include <cstdio>
#include <mutex>
#include <set>
#include <type_traits>

namespace mra
{
namespace
{

constexpr int kBlock = 32;           // tokens per block: the kernels are written for 32
// highResolution: 4 warps hold one query block, warp w its rows 8w..8w+7 (4 threads per row).
constexpr int kHighResThreads = 128;
constexpr int kSelectThreads = 1024;
constexpr int kLogitThreads = 128;
constexpr int kLogitQueryBlocks = 8; // query blocks per lowResolutionLogits CTA
constexpr int kMaxHeadDim = 128;

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

struct Maximum // cub::Max is gone from CUDA 13's CUB; this works with every version
{
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// ---- (a) block means and low-resolution logits -----------------------------------------------

//! One CTA per (batch, block) (a 1-D grid, block fastest), one warp: real tokens per block.
__global__ void countTokens(Problem p, int32_t const* mask, float* counts)
{
    int32_t const block = blockIdx.x % p.nb;
    int32_t const batch = blockIdx.x / p.nb;
    int32_t const count = __popc(realTokenBits(p, mask, batch, block));
    if (threadIdx.x == 0)
    {
        counts[batch * p.nb + block] = static_cast<float>(count);
    }
}

//! Sum of the masked tokens of one block, in token order, at dimension d. `real` has bit t set
//! when token t of the block is real (the same in every thread, so the branch does not diverge).
template <typename T>
__device__ inline float blockSum(Problem const& p, T const* source, uint32_t real, int32_t row, int32_t block, int32_t d)
{
    T const* column = source + (static_cast<size_t>(row) * p.seqLen + block * kBlock) * p.headDim + d;
    float sum = 0.0f;
    for (int32_t t = 0; t < kBlock; ++t)
    {
        if ((real >> t) & 1u)
        {
            sum += Storage<T>::toFloat(column[static_cast<size_t>(t) * p.headDim]);
        }
    }
    return sum;
}

//! One CTA per (row, block), a thread per dimension d (D threads, a multiple of 32): block means
//! of the masked Q, K, V: sums over c + 1e-6.
template <typename T>
__global__ void blockMeans(Problem p, T const* query, T const* key, T const* value, int32_t const* mask,
    float const* counts, float* queryMean, float* keyMean, float* valueMean)
{
    int32_t const block = blockIdx.x % p.nb;
    int32_t const row = blockIdx.x / p.nb;
    int32_t const d = threadIdx.x;
    // Each warp reads the block's 32 mask entries once, instead of every thread reading each.
    uint32_t const real = realTokenBits(p, mask, row / p.heads, block);
    float const denominator = counts[(row / p.heads) * p.nb + block] + kNormaliserEps;
    size_t const at = (static_cast<size_t>(row) * p.nb + block) * p.headDim + d;
    queryMean[at] = blockSum(p, query, real, row, block, d) / denominator;
    keyMean[at] = blockSum(p, key, real, row, block, d) / denominator;
    valueMean[at] = blockSum(p, value, real, row, block, d) / denominator;
}

//! One CTA per (row, group of kLogitQueryBlocks query blocks i), a thread per key block j:
//! L[i, j] = Qh_i . Kh_j / sqrt(D) (summed in d order), r_i = max_j L before masking, then the
//! masking. The group shares each Kh_j a thread loads (16-byte loads, Qh from shared memory).
__global__ void __launch_bounds__(kLogitThreads) lowResolutionLogits(Problem p, Scratch s)
{
    using Reduce = cub::BlockReduce<float, kLogitThreads>;
    __shared__ typename Reduce::TempStorage reduceStorage;
    __shared__ float4 queries[kLogitQueryBlocks][kMaxHeadDim / 4];
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
    for (int32_t u = 0; u < kLogitQueryBlocks && first + u < p.nb; ++u)
    {
        float const rowMax = Reduce(reduceStorage).Reduce(localMax[u], Maximum());
        if (threadIdx.x == 0)
        {
            s.rowMax[row * p.nb + first + u] = rowMax;
        }
        __syncthreads(); // before reduceStorage is used again
    }
}

// ---- (b) selection -----------------------------------------------------------------------

using SelectScan = cub::BlockScan<int32_t, kSelectThreads>;

__device__ inline uint32_t scoreKey(Problem const& p, Scratch const& s, int32_t row, int32_t cell)
{
    int32_t const i = cell / p.nb;
    int32_t const j = cell - i * p.nb;
    float const score = selectionScore(s.lowLogits[static_cast<size_t>(row) * p.nb * p.nb + cell],
        s.rowMax[row * p.nb + i], i, j, p.priorFirst, p.priorDiagonal);
    return orderedKey(score);
}

//! Digit `shift` of the k-th largest key: thread t < 256 holds the count of digit 255 - t, so an
//! exclusive scan gives the number of keys above each digit, and the one thread whose digit
//! reaches `remaining` extends the prefix. Every thread calls it; it ends with a barrier.
__device__ inline void chooseDigit(SelectScan::TempStorage& scanStorage, uint32_t const* histogram, int32_t shift,
    uint32_t& prefix, int32_t& remaining)
{
    int32_t const digit = 255 - static_cast<int32_t>(threadIdx.x);
    int32_t const count = digit >= 0 ? static_cast<int32_t>(histogram[digit]) : 0;
    int32_t const wanted = remaining; // read by every thread before the one below writes it
    int32_t above;
    int32_t total;
    SelectScan(scanStorage).ExclusiveSum(count, above, total);
    if (count > 0 && above < wanted && above + count >= wanted)
    {
        prefix |= static_cast<uint32_t>(digit) << shift;
        remaining = wanted - above;
    }
    __syncthreads();
}

//! One CTA per row (batch * head): the k best cells, ties in flat order; writes them ascending, with row starts.
__global__ void __launch_bounds__(kSelectThreads) selectBlocks(Problem p, Scratch s)
{
    __shared__ typename SelectScan::TempStorage scanStorage;
    __shared__ uint32_t histogram[256];
    __shared__ uint32_t prefix;
    __shared__ int32_t remaining;
    int32_t const row = blockIdx.x;
    int32_t const cells = p.nb * p.nb;

    // Radix select, most significant digit first: the exact key of the k-th largest score.
    if (threadIdx.x == 0)
    {
        prefix = 0;
        remaining = p.topK;
    }
    uint32_t prefixMask = 0;
    for (int32_t shift = 24; shift >= 0; shift -= 8)
    {
        for (int32_t b = threadIdx.x; b < 256; b += blockDim.x)
        {
            histogram[b] = 0;
        }
        __syncthreads();
        uint32_t const wanted = prefix;
        for (int32_t cell = threadIdx.x; cell < cells; cell += blockDim.x)
        {
            uint32_t const key = scoreKey(p, s, row, cell);
            if ((key & prefixMask) == wanted)
            {
                atomicAdd(&histogram[(key >> shift) & 0xffu], 1u);
            }
        }
        __syncthreads();
        chooseDigit(scanStorage, histogram, shift, prefix, remaining);
        prefixMask |= 0xffu << shift;
    }
    uint32_t const thresholdKey = prefix;
    int32_t const tiesToTake = remaining; // how many cells equal to the k-th score are selected

    // Each thread takes a contiguous run of cells, so two block scans order the whole row: the
    // ties before the run (the first tiesToTake ties in flat order are taken), then the cells
    // taken before it (where the run's cells go in `selected`).
    int32_t const perThread = (cells + blockDim.x - 1) / blockDim.x;
    int32_t const begin = min(static_cast<int32_t>(threadIdx.x) * perThread, cells);
    int32_t const end = min(begin + perThread, cells);
    int32_t above = 0;
    int32_t ties = 0;
    for (int32_t cell = begin; cell < end; ++cell)
    {
        uint32_t const key = scoreKey(p, s, row, cell);
        above += key > thresholdKey ? 1 : 0;
        ties += key == thresholdKey ? 1 : 0;
    }
    int32_t tieRank;
    int32_t total;
    SelectScan(scanStorage).ExclusiveSum(ties, tieRank, total);
    __syncthreads(); // before scanStorage is used again
    int32_t const tiesTaken = min(ties, max(tiesToTake - tieRank, 0));
    int32_t position;
    SelectScan(scanStorage).ExclusiveSum(above + tiesTaken, position, total);

    int32_t* selected = s.selected + static_cast<size_t>(row) * p.topK;
    int32_t* rowStart = s.rowStart + static_cast<size_t>(row) * (p.nb + 1);
    for (int32_t cell = begin; cell < end; ++cell)
    {
        uint32_t const key = scoreKey(p, s, row, cell);
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
    }
    if (threadIdx.x == 0)
    {
        rowStart[p.nb] = p.topK;
        s.threshold[row] = keyValue(thresholdKey);
    }
}

// ---- (c) + (d) high resolution with the epilogue -------------------------------------------

//! [32, D] tiles of rows first + 0..31 of kTensors tensors (Q; or K and V), in registers between
//! the loads that `start` them and the shared-memory stores that end them, so that the next key
//! block's loads are in flight while the current one is computed. Thread x holds 16-byte vectors
//! x, x + 128, ... of each; masked tokens and rows past the sequence are zero (the data and the
//! mask are loaded independently, the data of padded tokens being in memory too).
template <typename T, int D, int kTensors>
struct TileFetch
{
    static constexpr int kVector = 16 / sizeof(T);
    static constexpr int kVectorsPerRow = D / kVector;
    static constexpr int kPerThread = kBlock * kVectorsPerRow / kHighResThreads;
    uint4 vectors[kTensors][kPerThread];

    __device__ void start(Problem const& p, T const* const (&sources)[kTensors], int32_t const* mask, int32_t row,
        int32_t first)
    {
        int32_t const batch = row / p.heads;
        for (int32_t v = 0; v < kPerThread; ++v)
        {
            int32_t const index = threadIdx.x + v * kHighResThreads;
            int32_t const position = first + index / kVectorsPerRow;
            size_t const offset = (static_cast<size_t>(row) * p.seqLen + position) * D + (index % kVectorsPerRow) * kVector;
            bool const inside = position < p.seqLen;
            for (int32_t t = 0; t < kTensors; ++t)
            {
                vectors[t][v] = inside ? *reinterpret_cast<uint4 const*>(sources[t] + offset) : make_uint4(0, 0, 0, 0);
            }
            if (inside && mask[static_cast<size_t>(batch) * p.seqLen + position] == 0)
            {
                for (int32_t t = 0; t < kTensors; ++t)
                {
                    vectors[t][v] = make_uint4(0, 0, 0, 0);
                }
            }
        }
    }

    //! Element (r, d) of tensor t lands at tiles[t][r * stride + d] (`stride` keeps rows 16-byte
    //! aligned).
    __device__ void store(T* const (&tiles)[kTensors], int32_t stride) const
    {
        for (int32_t v = 0; v < kPerThread; ++v)
        {
            int32_t const index = threadIdx.x + v * kHighResThreads;
            int32_t const at = (index / kVectorsPerRow) * stride + (index % kVectorsPerRow) * kVector;
            for (int32_t t = 0; t < kTensors; ++t)
            {
                *reinterpret_cast<uint4*>(tiles[t] + at) = vectors[t][v];
            }
        }
    }
};

//! Key block j's K and V tiles and its key mask (bit t: token t is real), fetched one block ahead.
template <typename T, int D>
struct KeyBlockFetch
{
    TileFetch<T, D, 2> tiles;
    uint32_t realKeys = 0; //!< held by warp 0

    __device__ void start(Problem const& p, T const* keys, T const* values, int32_t const* mask, int32_t row, int32_t j)
    {
        tiles.start(p, {keys, values}, mask, row, j * kBlock);
        if (threadIdx.x < kBlock)
        {
            realKeys = realTokenBits(p, mask, row / p.heads, j);
        }
    }

    __device__ void store(T* keyTile, T* valueTile, int32_t stride, uint32_t* realKeysOut) const
    {
        tiles.store({keyTile, valueTile}, stride);
        if (threadIdx.x == 0)
        {
            *realKeysOut = realKeys;
        }
    }
};

//! The low-resolution term of block row i (mode "full"): sum_j lo_j * Vh_j and sum_j lo_j, with
//! lo_j = exp((L_ij - r_i) - 1e4 * [score_ij >= threshold]) * c_j, accumulated in j order.
template <int D>
__device__ void lowResolutionTerm(Problem const& p, Scratch const& s, int32_t row, int32_t i, float* weights,
    float* lowOut, float* lowNorm)
{
    int32_t const batch = row / p.heads;
    float const rowMax = s.rowMax[row * p.nb + i];
    float const threshold = s.threshold[row];
    float sum = 0.0f; // the value dimension threadIdx.x (when < D)
    float norm = 0.0f;
    for (int32_t chunk = 0; chunk < p.nb; chunk += blockDim.x)
    {
        int32_t const j = chunk + threadIdx.x;
        if (j < p.nb)
        {
            int32_t const cell = i * p.nb + j;
            float const logit = s.lowLogits[static_cast<size_t>(row) * p.nb * p.nb + cell];
            float const score = selectionScore(logit, rowMax, i, j, p.priorFirst, p.priorDiagonal);
            float const exact = score >= threshold ? 1.0f : 0.0f;
            weights[threadIdx.x] = expf((logit - rowMax) - kMaskedLogitPenalty * exact) * s.counts[batch * p.nb + j];
        }
        __syncthreads();
        int32_t const count = min(static_cast<int32_t>(blockDim.x), p.nb - chunk);
        if (threadIdx.x < D)
        {
            float const* values = s.valueMean + (static_cast<size_t>(row) * p.nb + chunk) * D + threadIdx.x;
            for (int32_t u = 0; u < count; ++u)
            {
                sum += weights[u] * values[static_cast<size_t>(u) * D];
            }
        }
        if (threadIdx.x == 0)
        {
            for (int32_t u = 0; u < count; ++u)
            {
                norm += weights[u];
            }
        }
        __syncthreads();
    }
    if (threadIdx.x < D)
    {
        lowOut[threadIdx.x] = sum;
    }
    if (threadIdx.x == 0)
    {
        *lowNorm = norm;
    }
    __syncthreads();
}

//! Per-query online softmax state, kept by the 4 threads of the query's row. Thread `lane` holds
//! the output dims in 16-byte groups lane, lane + 4, ... (dimOf), so that the 4 lanes' float4
//! reads of one shared-memory row fall in distinct banks.
template <int D>
struct RowState
{
    static constexpr int kDims = D / 4;
    float runningMax = -FLT_MAX; //!< over every key of the selected blocks: the quantised M
    float baseMax = -FLT_MAX;    //!< over real keys only: the base of the exponentials below
    float norm = 0.0f;           //!< sum of exp(P - baseMax) over real keys
    float out[kDims] = {};       //!< sum of exp(P - baseMax) * V, at dims dimOf(lane, u)

    __device__ static int32_t dimOf(int32_t lane, int32_t u) { return 16 * (u / 4) + 4 * lane + u % 4; }

    //! The key of a thread's score t: fp16/bf16 threads take 8 adjacent keys (two 16-byte reads of
    //! the score tile, one 16-byte store of weights); fp32 threads keys lane + 4t (their K rows
    //! fall in distinct banks).
    template <bool kTensorCores>
    __device__ static int32_t keyOf(int32_t lane, int32_t t) { return kTensorCores ? 8 * lane + t : lane + 4 * t; }

    //! Fold in one block's 8 scores per thread (keys keyOf(lane, t)): update the maxima,
    //! rescale, and return the block's weights of those keys in `weights`. fp16/bf16 take the
    //! fast exponential (a few ulp of fp32), as their weight tile rounds to 8 or 11 bits anyway.
    //! Padded keys count for M (they do in the original) but not for the base: with M pinned at 0
    //! by them, exp(P - M) of real keys far below 0 would underflow in the fp16 weight tile;
    //! exp(P - baseMax) <= 1 with one weight exactly 1.
    template <bool kTensorCores>
    __device__ void absorbScores(float const (&scores)[8], uint32_t realKeys, int32_t lane, float (&weights)[8])
    {
        bool real[8];
        float blockMax = -FLT_MAX;
        float blockRealMax = -FLT_MAX;
        for (int32_t t = 0; t < 8; ++t)
        {
            real[t] = (realKeys >> keyOf<kTensorCores>(lane, t)) & 1u;
            blockMax = fmaxf(blockMax, scores[t]);
            blockRealMax = fmaxf(blockRealMax, real[t] ? scores[t] : -FLT_MAX);
        }
        blockMax = rowMaxOf4(blockMax);
        blockRealMax = rowMaxOf4(blockRealMax);
        runningMax = fmaxf(runningMax, blockMax);
        float const newBase = fmaxf(baseMax, blockRealMax);
        float const rescale = expf(baseMax - newBase); // 1 while no real key has been seen
        baseMax = newBase;
        norm *= rescale;
        for (int32_t u = 0; u < kDims; ++u)
        {
            out[u] *= rescale;
        }
        float partial = 0.0f;
        for (int32_t t = 0; t < 8; ++t)
        {
            float const exponent = scores[t] - newBase;
            weights[t] = !real[t] ? 0.0f : kTensorCores ? __expf(exponent) : expf(exponent); // exp(.. - 1e4) is 0
            partial += weights[t];
        }
        partial += __shfl_xor_sync(0xffffffffu, partial, 1);
        partial += __shfl_xor_sync(0xffffffffu, partial, 2);
        norm += partial;
    }

    //! out += row[dimOf(lane, u)] for a float row of D (16-byte aligned), times `weight`.
    __device__ void accumulate(float const* row, int32_t lane, float weight)
    {
        for (int32_t group = 0; group < D / 16; ++group)
        {
            float4 const v = *reinterpret_cast<float4 const*>(row + 16 * group + 4 * lane);
            out[4 * group] += weight * v.x;
            out[4 * group + 1] += weight * v.y;
            out[4 * group + 2] += weight * v.z;
            out[4 * group + 3] += weight * v.w;
        }
    }

    //! Maximum over the 4 threads of one query row.
    __device__ static float rowMaxOf4(float value)
    {
        value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, 1));
        return fmaxf(value, __shfl_xor_sync(0xffffffffu, value, 2));
    }
};

//! Shared memory of the high-resolution kernel (bytes), per storage type and head dim.
template <typename T, int D>
struct HighResolutionSmem
{
    static constexpr bool kTensorCores = sizeof(T) == 2;
    // fp16/bf16: a 16-element pad keeps the 32-byte row alignment WMMA needs; fp32: a 4-element
    // pad keeps rows 16-byte aligned, and float4 reads of 8 rows (a quarter warp) in distinct banks.
    static constexpr int kTileStride = kTensorCores ? D + 16 : D + 4;
    static constexpr int kScoreStride = 36;    // float [32][36], WMMA store target
    static constexpr int kWeightStride = 40;   // T [32][40], WMMA operand (fp16/bf16): its 8-row reads in distinct banks
    static constexpr int kProductStride = D + 16; // float [32][D + 16], P.V of one block (distinct banks)
    static constexpr size_t kTile = sizeof(T) * kBlock * kTileStride;
    static constexpr size_t kScores = sizeof(float) * kBlock * kScoreStride;
    static constexpr size_t kWeights = kTensorCores ? sizeof(T) * kBlock * kWeightStride : 0;
    static constexpr size_t kProduct = kTensorCores ? sizeof(float) * kBlock * kProductStride : 0;
    static constexpr size_t kTotal = 3 * kTile + kScores + kWeights + kProduct + kHighResThreads * sizeof(float)
        + D * sizeof(float) + 2 * sizeof(float) + sizeof(uint32_t) + 64;
};

// fp16/bf16: each warp multiplies its own 8 query rows (WMMA's 8x32x16 shape), so the scores,
// weights and products a warp writes are read by that warp alone: a __syncwarp between the
// steps, not a CTA barrier.
constexpr int kWarpRows = 8;

//! One warp's 8x32 product C = A B: A row-major, 8 x depth (a multiple of 16), B depth x 32 in
//! `BLayout`; C stored row-major. Pointers and leading dimensions as WMMA takes them.
template <typename T, typename BLayout>
__device__ inline void warpMultiply(T const* a, int32_t lda, T const* b, int32_t ldb, int32_t depth, float* c, int32_t ldc)
{
    using namespace nvcuda;
    constexpr bool kColumnMajor = std::is_same<BLayout, wmma::col_major>::value;
    wmma::fragment<wmma::accumulator, kWarpRows, 32, 16, float> accumulator;
    wmma::fill_fragment(accumulator, 0.0f);
    for (int32_t k = 0; k < depth; k += 16)
    {
        wmma::fragment<wmma::matrix_a, kWarpRows, 32, 16, T, wmma::row_major> left;
        wmma::fragment<wmma::matrix_b, kWarpRows, 32, 16, T, BLayout> right;
        wmma::load_matrix_sync(left, a + k, lda);
        wmma::load_matrix_sync(right, b + (kColumnMajor ? k : k * ldb), ldb);
        wmma::mma_sync(accumulator, left, right, accumulator);
    }
    wmma::store_matrix_sync(c, accumulator, ldc, wmma::mem_row_major);
}

//! fp32: the scores of keys lane + 4t of query row r, by FMA from shared memory in d order.
template <typename T, int D>
__device__ inline void scoresByFma(
    Problem const& p, T const* queryTile, T const* keyTile, int32_t r, int32_t lane, float (&scores)[8])
{
    using Smem = HighResolutionSmem<T, D>;
    float dot[8] = {};
    for (int32_t d = 0; d < D; d += 4)
    {
        float4 const q = *reinterpret_cast<float4 const*>(queryTile + r * Smem::kTileStride + d);
        for (int32_t t = 0; t < 8; ++t)
        {
            float4 const k = *reinterpret_cast<float4 const*>(keyTile + (lane + 4 * t) * Smem::kTileStride + d);
            dot[t] += q.x * k.x;
            dot[t] += q.y * k.y;
            dot[t] += q.z * k.z;
            dot[t] += q.w * k.w;
        }
    }
    for (int32_t t = 0; t < 8; ++t)
    {
        scores[t] = dot[t] / p.scaleDivisor;
    }
}

//! One CTA per (row, query block i), 128 threads; the CTAs of a row are adjacent (L2 reuse).
template <typename T, int D>
__global__ void __launch_bounds__(kHighResThreads) highResolution(
    Problem p, T const* query, T const* key, T const* value, int32_t const* mask, Scratch s, T* output)
{
    using Smem = HighResolutionSmem<T, D>;
    extern __shared__ __align__(128) unsigned char smem[];
    T* queryTile = reinterpret_cast<T*>(smem);
    T* keyTile = reinterpret_cast<T*>(smem + Smem::kTile);
    T* valueTile = reinterpret_cast<T*>(smem + 2 * Smem::kTile);
    float* scoreTile = reinterpret_cast<float*>(smem + 3 * Smem::kTile);
    T* weightTile = reinterpret_cast<T*>(smem + 3 * Smem::kTile + Smem::kScores);
    float* productTile = reinterpret_cast<float*>(smem + 3 * Smem::kTile + Smem::kScores + Smem::kWeights);
    float* chunkWeights = reinterpret_cast<float*>(
        smem + 3 * Smem::kTile + Smem::kScores + Smem::kWeights + Smem::kProduct);
    float* lowOut = chunkWeights + kHighResThreads;
    float* lowNorm = lowOut + D;
    uint32_t* realKeys = reinterpret_cast<uint32_t*>(lowNorm + 2);

    int32_t const i = blockIdx.x % p.nb;
    int32_t const row = blockIdx.x / p.nb;
    int32_t const batch = row / p.heads;
    int32_t const r = threadIdx.x / 4; // the query row of this thread
    int32_t const lane = threadIdx.x % 4;
    int32_t const warp = threadIdx.x / 32;
    int32_t const position = i * kBlock + r;
    bool const queryReal = isReal(p, mask, batch, position);
    int32_t const* rowStart = s.rowStart + static_cast<size_t>(row) * (p.nb + 1);
    int32_t const* selected = s.selected + static_cast<size_t>(row) * p.topK; // cell (i, j) is i * nb + j
    int32_t const begin = rowStart[i];
    int32_t const end = rowStart[i + 1];
    // fp16/bf16 scale by the reciprocal (1 ulp from dividing, far inside their tolerance); fp32
    // divides, as PyTorch does.
    float const inverseScale = 1.0f / p.scaleDivisor;

    TileFetch<T, D, 1> queries;
    queries.start(p, {query}, mask, row, i * kBlock);
    queries.store({queryTile}, Smem::kTileStride);
    RowState<D> state;
    KeyBlockFetch<T, D> fetch;
    if (begin < end)
    {
        fetch.start(p, key, value, mask, row, selected[begin] - i * p.nb);
    }
    for (int32_t index = begin; index < end; ++index)
    {
        __syncthreads(); // the previous tiles are consumed
        fetch.store(keyTile, valueTile, Smem::kTileStride, realKeys);
        if (index + 1 < end)
        {
            fetch.start(p, key, value, mask, row, selected[index + 1] - i * p.nb);
        }
        __syncthreads();
        uint32_t const blockRealKeys = *realKeys;
        float scores[8];
        float weights[8];
        if constexpr (Smem::kTensorCores)
        {
            // Q K^T of the warp's 8 queries (K^T is K read column-major), then P V below.
            warpMultiply<T, nvcuda::wmma::col_major>(queryTile + warp * kWarpRows * Smem::kTileStride,
                Smem::kTileStride, keyTile, Smem::kTileStride, D, scoreTile + warp * kWarpRows * Smem::kScoreStride,
                Smem::kScoreStride);
            __syncwarp();
            float const* rowScores = scoreTile + r * Smem::kScoreStride + 8 * lane;
            float4 const low = *reinterpret_cast<float4 const*>(rowScores);
            float4 const high = *reinterpret_cast<float4 const*>(rowScores + 4);
            float const raw[8] = {low.x, low.y, low.z, low.w, high.x, high.y, high.z, high.w};
            for (int32_t t = 0; t < 8; ++t)
            {
                scores[t] = raw[t] * inverseScale;
            }
            state.template absorbScores<true>(scores, blockRealKeys, lane, weights);
            union
            {
                uint4 raw;
                T values[8];
            } packed;
            for (int32_t t = 0; t < 8; ++t)
            {
                packed.values[t] = Storage<T>::fromFloat(weights[t]);
            }
            *reinterpret_cast<uint4*>(weightTile + r * Smem::kWeightStride + 8 * lane) = packed.raw;
            __syncwarp();
            for (int32_t column = 0; column < D; column += 32)
            {
                warpMultiply<T, nvcuda::wmma::row_major>(weightTile + warp * kWarpRows * Smem::kWeightStride,
                    Smem::kWeightStride, valueTile + column, Smem::kTileStride, kBlock,
                    productTile + warp * kWarpRows * Smem::kProductStride + column, Smem::kProductStride);
            }
            __syncwarp();
            state.accumulate(productTile + r * Smem::kProductStride, lane, 1.0f);
        }
        else
        {
            scoresByFma<T, D>(p, queryTile, keyTile, r, lane, scores);
            state.template absorbScores<false>(scores, blockRealKeys, lane, weights);
            float* rowWeights = scoreTile + r * Smem::kScoreStride; // the row's 32, for its 4 threads
            for (int32_t t = 0; t < 8; ++t)
            {
                rowWeights[lane + 4 * t] = weights[t];
            }
            __syncwarp();
            for (int32_t k = 0; k < kBlock; ++k)
            {
                state.accumulate(valueTile + k * Smem::kTileStride, lane, rowWeights[k]);
            }
        }
    }

    // (d) The epilogue: quantised row max, low-resolution term, correction, masked queries.
    if (p.full)
    {
        lowResolutionTerm<D>(p, s, row, i, chunkWeights, lowOut, lowNorm);
    }
    float const quantisedMax = quantisedRowMax(state.runningMax);
    // exp(P - M) = exp(P - baseMax) * exp(baseMax - M); baseMax <= M + 1e-3, so no overflow, and
    // baseMax = -FLT_MAX (no real key) gives 0.
    float const toQuantised = expf(state.baseMax - quantisedMax);
    float const hiNorm = state.norm * toQuantised;
    float const maxGap = s.rowMax[row * p.nb + i] - quantisedMax;
    float const loScale = expf(fminf(maxGap, 0.0f));
    float const hiScale = expf(-fmaxf(maxGap, 0.0f));
    __syncthreads(); // the query tile becomes the output staging tile
    for (int32_t u = 0; u < RowState<D>::kDims; ++u)
    {
        int32_t const d = RowState<D>::dimOf(lane, u);
        float const hiOut = state.out[u] * toQuantised;
        float value = p.full ? (hiOut * hiScale + lowOut[d] * loScale) / (hiNorm * hiScale + *lowNorm * loScale + kNormaliserEps)
                             : hiOut / (hiNorm + kNormaliserEps);
        value = queryReal ? value : 0.0f;
        queryTile[r * Smem::kTileStride + d] = Storage<T>::fromFloat(value);
    }
    __syncthreads();
    constexpr int kVector = 16 / sizeof(T);
    for (int32_t index = threadIdx.x; index < kBlock * (D / kVector); index += blockDim.x)
    {
        int32_t const rr = index / (D / kVector);
        int32_t const d = (index % (D / kVector)) * kVector;
        int32_t const outPosition = i * kBlock + rr;
        if (outPosition < p.seqLen)
        {
            *reinterpret_cast<uint4*>(output + (static_cast<size_t>(row) * p.seqLen + outPosition) * D + d)
                = *reinterpret_cast<uint4 const*>(queryTile + rr * Smem::kTileStride + d);
        }
    }
}

// ---- launching -----------------------------------------------------------------------------

MraStatus cudaFailure(cudaError_t error, char const* where)
{
    std::snprintf(gLastCudaError, sizeof(gLastCudaError), "%s: %s", where, cudaGetErrorString(error));
    return MRA_CUDA_ERROR;
}

#define MRA_CHECK_LAUNCH(where)                                                                                        \
    do                                                                                                                 \
    {                                                                                                                  \
        cudaError_t const error = cudaGetLastError();                                                                  \
        if (error != cudaSuccess)                                                                                      \
        {                                                                                                              \
            return cudaFailure(error, where);                                                                          \
        }                                                                                                              \
    } while (0)

//! Opt the kernel in to more than 48 KB of shared memory. The attribute belongs to the current
//! device's context, so it is set once per (instantiation, device), not once per process.
template <typename T, int D>
MraStatus prepareHighResolution()
{
    static std::mutex mutex;
    static std::set<int> preparedDevices;
    int device = 0;
    cudaError_t status = cudaGetDevice(&device);
    if (status != cudaSuccess)
    {
        return cudaFailure(status, "cudaGetDevice");
    }
    std::lock_guard<std::mutex> const lock(mutex);
    if (preparedDevices.count(device) != 0)
    {
        return MRA_OK;
    }
    status = cudaFuncSetAttribute(highResolution<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
        static_cast<int>(HighResolutionSmem<T, D>::kTotal));
    if (status != cudaSuccess)
    {
        return cudaFailure(status, "cudaFuncSetAttribute(highResolution)");
    }
    preparedDevices.insert(device);
    return MRA_OK;
}

template <typename T, int D>
MraStatus launchHighResolution(Problem const& p, void const* q, void const* k, void const* v, int32_t const* mask,
    Scratch const& s, void* output, cudaStream_t stream)
{
    MraStatus const status = prepareHighResolution<T, D>();
    if (status != MRA_OK)
    {
        return status;
    }
    highResolution<T, D><<<p.nb * p.rows, kHighResThreads, HighResolutionSmem<T, D>::kTotal, stream>>>(p,
        static_cast<T const*>(q), static_cast<T const*>(k), static_cast<T const*>(v), mask, s, static_cast<T*>(output));
    MRA_CHECK_LAUNCH("highResolution");
    return MRA_OK;
}

template <typename T>
MraStatus launchAll(Problem const& p, void const* q, void const* k, void const* v, int32_t const* mask, Scratch const& s,
    void* output, cudaStream_t stream)
{
    countTokens<<<p.nb * p.batch, kBlock, 0, stream>>>(p, mask, s.counts);
    MRA_CHECK_LAUNCH("countTokens");
    blockMeans<T><<<p.nb * p.rows, p.headDim, 0, stream>>>(p, static_cast<T const*>(q),
        static_cast<T const*>(k), static_cast<T const*>(v), mask, s.counts, s.queryMean, s.keyMean, s.valueMean);
    MRA_CHECK_LAUNCH("blockMeans");
    lowResolutionLogits<<<logitQueryGroups(p.nb) * p.rows, kLogitThreads, 0, stream>>>(p, s);
    MRA_CHECK_LAUNCH("lowResolutionLogits");
    selectBlocks<<<p.rows, kSelectThreads, 0, stream>>>(p, s);
    MRA_CHECK_LAUNCH("selectBlocks");
    switch (p.headDim)
    {
    case 32: return launchHighResolution<T, 32>(p, q, k, v, mask, s, output, stream);
    case 64: return launchHighResolution<T, 64>(p, q, k, v, mask, s, output, stream);
    case 128: return launchHighResolution<T, 128>(p, q, k, v, mask, s, output, stream);
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
