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

namespace mra
{
namespace
{

constexpr int kBlock = 32;           // tokens per block: the kernels are written for 32
constexpr int kHighResThreads = 128; // 4 warps; 4 threads per query row
constexpr int kSelectThreads = 1024;
constexpr int kLogitThreads = 128;

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
    bool const real = isReal(p, mask, batch, block * kBlock + threadIdx.x);
    int32_t const count = __popc(__ballot_sync(0xffffffffu, real));
    if (threadIdx.x == 0)
    {
        counts[batch * p.nb + block] = static_cast<float>(count);
    }
}

//! Sum of the masked tokens of one block, in token order, at dimension d.
template <typename T>
__device__ inline float blockSum(Problem const& p, T const* source, int32_t const* mask, int32_t row, int32_t block,
    int32_t d)
{
    int32_t const batch = row / p.heads;
    float sum = 0.0f;
    for (int32_t t = 0; t < kBlock; ++t)
    {
        int32_t const position = block * kBlock + t;
        if (isReal(p, mask, batch, position))
        {
            sum += Storage<T>::toFloat(source[(static_cast<size_t>(row) * p.seqLen + position) * p.headDim + d]);
        }
    }
    return sum;
}

//! One CTA per (row, block): block means of the masked Q, K, V: sums over c + 1e-6.
template <typename T>
__global__ void blockMeans(Problem p, T const* query, T const* key, T const* value, int32_t const* mask,
    float const* counts, float* queryMean, float* keyMean, float* valueMean)
{
    int32_t const block = blockIdx.x % p.nb;
    int32_t const row = blockIdx.x / p.nb;
    float const denominator = counts[(row / p.heads) * p.nb + block] + kNormaliserEps;
    size_t const base = (static_cast<size_t>(row) * p.nb + block) * p.headDim;
    for (int32_t d = threadIdx.x; d < p.headDim; d += blockDim.x)
    {
        queryMean[base + d] = blockSum(p, query, mask, row, block, d) / denominator;
        keyMean[base + d] = blockSum(p, key, mask, row, block, d) / denominator;
        valueMean[base + d] = blockSum(p, value, mask, row, block, d) / denominator;
    }
}

//! One CTA per (row, query block i): L[i, :] = Qh_i Kh^T / sqrt(D), r_i = max_j L (before
//! masking), then the masking.
__global__ void lowResolutionLogits(Problem p, Scratch s)
{
    using Reduce = cub::BlockReduce<float, kLogitThreads>;
    __shared__ typename Reduce::TempStorage reduceStorage;
    int32_t const i = blockIdx.x % p.nb;
    int32_t const row = blockIdx.x / p.nb;
    float const* counts = s.counts + (row / p.heads) * p.nb;
    float const* q = s.queryMean + (static_cast<size_t>(row) * p.nb + i) * p.headDim;
    float* logits = s.lowLogits + (static_cast<size_t>(row) * p.nb + i) * p.nb;

    float localMax = -FLT_MAX;
    for (int32_t j = threadIdx.x; j < p.nb; j += blockDim.x)
    {
        float const* k = s.keyMean + (static_cast<size_t>(row) * p.nb + j) * p.headDim;
        float dot = 0.0f;
        for (int32_t d = 0; d < p.headDim; ++d)
        {
            dot += q[d] * k[d];
        }
        logits[j] = dot / p.scaleDivisor;
        localMax = fmaxf(localMax, logits[j]);
    }
    float const rowMax = Reduce(reduceStorage).Reduce(localMax, Maximum());
    if (threadIdx.x == 0)
    {
        s.rowMax[row * p.nb + i] = rowMax;
    }
    for (int32_t j = threadIdx.x; j < p.nb; j += blockDim.x) // the thread's own entries
    {
        logits[j] = logits[j] - (counts[i] * counts[j] < 0.5f ? kMaskedLogitPenalty : 0.0f);
    }
}

// ---- (b) selection -----------------------------------------------------------------------

__device__ inline uint32_t scoreKey(Problem const& p, Scratch const& s, int32_t row, int32_t cell)
{
    int32_t const i = cell / p.nb;
    int32_t const j = cell - i * p.nb;
    float const score = selectionScore(s.lowLogits[static_cast<size_t>(row) * p.nb * p.nb + cell],
        s.rowMax[row * p.nb + i], i, j, p.priorFirst, p.priorDiagonal);
    return orderedKey(score);
}

//! One CTA per row (batch * head): the k best cells, ties in flat order; writes them ascending, with row starts.
__global__ void __launch_bounds__(kSelectThreads) selectBlocks(Problem p, Scratch s)
{
    using Scan = cub::BlockScan<int32_t, kSelectThreads>;
    __shared__ typename Scan::TempStorage scanStorage;
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
        if (threadIdx.x == 0)
        {
            int32_t above = 0;
            for (int32_t digit = 255; digit >= 0; --digit)
            {
                if (above + static_cast<int32_t>(histogram[digit]) >= remaining)
                {
                    prefix |= static_cast<uint32_t>(digit) << shift;
                    remaining -= above;
                    break;
                }
                above += histogram[digit];
            }
        }
        prefixMask |= 0xffu << shift;
        __syncthreads();
    }
    uint32_t const thresholdKey = prefix;
    int32_t const tiesToTake = remaining; // how many cells equal to the k-th score are selected

    int32_t* selected = s.selected + static_cast<size_t>(row) * p.topK;
    int32_t* rowStart = s.rowStart + static_cast<size_t>(row) * (p.nb + 1);
    int32_t tiesBefore = 0;
    int32_t takenBefore = 0;
    for (int32_t base = 0; base < cells; base += blockDim.x)
    {
        int32_t const cell = base + threadIdx.x;
        bool const valid = cell < cells;
        uint32_t const key = valid ? scoreKey(p, s, row, cell) : 0u;
        int32_t tieRank;
        int32_t tiesHere;
        Scan(scanStorage).ExclusiveSum(valid && key == thresholdKey ? 1 : 0, tieRank, tiesHere);
        __syncthreads();
        bool const take = valid
            && (key > thresholdKey || (key == thresholdKey && tiesBefore + tieRank < tiesToTake));
        int32_t position;
        int32_t takenHere;
        Scan(scanStorage).ExclusiveSum(take ? 1 : 0, position, takenHere);
        __syncthreads();
        if (take)
        {
            selected[takenBefore + position] = cell;
        }
        if (valid && cell % p.nb == 0)
        {
            rowStart[cell / p.nb] = takenBefore + position;
        }
        tiesBefore += tiesHere;
        takenBefore += takenHere;
    }
    if (threadIdx.x == 0)
    {
        rowStart[p.nb] = p.topK;
        s.threshold[row] = keyValue(thresholdKey);
    }
}

// ---- (c) + (d) high resolution with the epilogue -------------------------------------------

//! 16-byte loads of a [32, D] tile of rows (first + 0..31) into shared memory; masked rows and
//! rows past the sequence are zero. Element (r, d) lands at tile[r * stride + d].
template <typename T, int D, typename S>
__device__ inline void loadTile(Problem const& p, T const* source, int32_t const* mask, int32_t row, int32_t first,
    S* tile, int32_t stride)
{
    constexpr int kVector = 16 / sizeof(T);
    constexpr int kVectorsPerRow = D / kVector;
    int32_t const batch = row / p.heads;
    for (int32_t index = threadIdx.x; index < kBlock * kVectorsPerRow; index += blockDim.x)
    {
        int32_t const r = index / kVectorsPerRow;
        int32_t const d = (index % kVectorsPerRow) * kVector;
        int32_t const position = first + r;
        union
        {
            uint4 raw;
            T values[kVector];
        } chunk;
        chunk.raw = make_uint4(0, 0, 0, 0);
        if (isReal(p, mask, batch, position))
        {
            chunk.raw = *reinterpret_cast<uint4 const*>(source + (static_cast<size_t>(row) * p.seqLen + position) * D + d);
        }
        for (int32_t e = 0; e < kVector; ++e)
        {
            if constexpr (sizeof(S) == sizeof(T))
            {
                tile[r * stride + d + e] = chunk.values[e];
            }
            else
            {
                tile[r * stride + d + e] = Storage<T>::toFloat(chunk.values[e]);
            }
        }
    }
}

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

//! Per-query online softmax state, kept by the 4 threads of the query's row.
template <int D>
struct RowState
{
    static constexpr int kDims = D / 4; // output dims per thread: d = lane + 4 * u
    float runningMax = -FLT_MAX; //!< over every key of the selected blocks: the quantised M
    float baseMax = -FLT_MAX;    //!< over real keys only: the base of the exponentials below
    float norm = 0.0f;           //!< sum of exp(P - baseMax) over real keys
    float out[kDims] = {};       //!< sum of exp(P - baseMax) * V

    //! Fold in one block's 8 scores per thread (keys lane + 4t): update the maxima, rescale, and
    //! write this block's weights to `weights` (row of 32). Returns after the weights are
    //! visible to the row's 4 threads. Padded keys count for M (they do in the original) but
    //! not for the base: with M pinned at 0 by them, exp(P - M) of real keys far below 0 would
    //! underflow in the fp16 weight tile; exp(P - baseMax) <= 1 with one weight exactly 1.
    __device__ void absorbScores(float const (&scores)[8], bool const* keyReal, float* weights, int32_t lane)
    {
        float blockMax = -FLT_MAX;
        float blockRealMax = -FLT_MAX;
        for (int32_t t = 0; t < 8; ++t)
        {
            blockMax = fmaxf(blockMax, scores[t]);
            blockRealMax = fmaxf(blockRealMax, keyReal[lane + 4 * t] ? scores[t] : -FLT_MAX);
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
            int32_t const key = lane + 4 * t;
            float const weight = keyReal[key] ? expf(scores[t] - newBase) : 0.0f; // exp(.. - 1e4) is 0
            weights[key] = weight;
            partial += weight;
        }
        partial += __shfl_xor_sync(0xffffffffu, partial, 1);
        partial += __shfl_xor_sync(0xffffffffu, partial, 2);
        norm += partial;
        __syncwarp();
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
    // fp32: float tiles padded by 1 (no bank conflicts); fp16/bf16: 16-element pad keeps the
    // 32-byte row alignment WMMA needs.
    static constexpr int kTileStride = kTensorCores ? D + 16 : D + 1;
    static constexpr int kScoreStride = 36;    // float [32][36], WMMA store target
    static constexpr int kWeightStride = 48;   // T [32][48], WMMA operand (fp16/bf16)
    static constexpr int kProductStride = D + 4; // float [32][D + 4], P.V of one block
    using Element = typename std::conditional<kTensorCores, T, float>::type;
    static constexpr size_t kTile = sizeof(Element) * kBlock * kTileStride;
    static constexpr size_t kScores = sizeof(float) * kBlock * kScoreStride;
    static constexpr size_t kWeights = kTensorCores ? sizeof(T) * kBlock * kWeightStride : 0;
    static constexpr size_t kProduct = kTensorCores ? sizeof(float) * kBlock * kProductStride : 0;
    static constexpr size_t kTotal = 3 * kTile + kScores + kWeights + kProduct + kHighResThreads * sizeof(float)
        + D * sizeof(float) + 2 * sizeof(float) + kBlock * sizeof(bool) + 64;
};

//! Scores of one selected block: thread (row r, lane) gets keys lane + 4t. fp32: FMA from
//! shared memory, in d order; fp16/bf16: WMMA into the `scores` tile first.
template <typename T, int D>
__device__ inline void blockScores(Problem const& p, typename HighResolutionSmem<T, D>::Element const* queryTile,
    typename HighResolutionSmem<T, D>::Element const* keyTile, float* scoreTile, int32_t r, int32_t lane,
    float (&scores)[8])
{
    using Smem = HighResolutionSmem<T, D>;
    if constexpr (Smem::kTensorCores)
    {
        using namespace nvcuda;
        int32_t const warp = threadIdx.x / 32;
        int32_t const tileRow = (warp / 2) * 16;
        int32_t const tileCol = (warp % 2) * 16;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> accumulator;
        wmma::fill_fragment(accumulator, 0.0f);
        for (int32_t k = 0; k < D; k += 16)
        {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
            wmma::load_matrix_sync(a, queryTile + tileRow * Smem::kTileStride + k, Smem::kTileStride);
            wmma::load_matrix_sync(b, keyTile + tileCol * Smem::kTileStride + k, Smem::kTileStride);
            wmma::mma_sync(accumulator, a, b, accumulator);
        }
        wmma::store_matrix_sync(scoreTile + tileRow * Smem::kScoreStride + tileCol, accumulator, Smem::kScoreStride,
            wmma::mem_row_major);
        __syncthreads();
        for (int32_t t = 0; t < 8; ++t)
        {
            scores[t] = scoreTile[r * Smem::kScoreStride + lane + 4 * t] / p.scaleDivisor;
        }
    }
    else
    {
        for (int32_t t = 0; t < 8; ++t)
        {
            float const* q = queryTile + r * Smem::kTileStride;
            float const* k = keyTile + (lane + 4 * t) * Smem::kTileStride;
            float dot = 0.0f;
            for (int32_t d = 0; d < D; ++d)
            {
                dot += q[d] * k[d];
            }
            scores[t] = dot / p.scaleDivisor;
        }
    }
}

//! One CTA per (row, query block i), 128 threads; the CTAs of a row are adjacent (L2 reuse).
template <typename T, int D>
__global__ void __launch_bounds__(kHighResThreads) highResolution(
    Problem p, T const* query, T const* key, T const* value, int32_t const* mask, Scratch s, T* output)
{
    using Smem = HighResolutionSmem<T, D>;
    using Element = typename Smem::Element;
    extern __shared__ __align__(128) unsigned char smem[];
    Element* queryTile = reinterpret_cast<Element*>(smem);
    Element* keyTile = reinterpret_cast<Element*>(smem + Smem::kTile);
    Element* valueTile = reinterpret_cast<Element*>(smem + 2 * Smem::kTile);
    float* scoreTile = reinterpret_cast<float*>(smem + 3 * Smem::kTile);
    T* weightTile = reinterpret_cast<T*>(smem + 3 * Smem::kTile + Smem::kScores);
    float* productTile = reinterpret_cast<float*>(smem + 3 * Smem::kTile + Smem::kScores + Smem::kWeights);
    float* chunkWeights = reinterpret_cast<float*>(
        smem + 3 * Smem::kTile + Smem::kScores + Smem::kWeights + Smem::kProduct);
    float* lowOut = chunkWeights + kHighResThreads;
    float* lowNorm = lowOut + D;
    bool* keyReal = reinterpret_cast<bool*>(lowNorm + 2);

    int32_t const i = blockIdx.x % p.nb;
    int32_t const row = blockIdx.x / p.nb;
    int32_t const batch = row / p.heads;
    int32_t const r = threadIdx.x / 4; // the query row of this thread
    int32_t const lane = threadIdx.x % 4;
    int32_t const position = i * kBlock + r;
    bool const queryReal = isReal(p, mask, batch, position);
    int32_t const* rowStart = s.rowStart + static_cast<size_t>(row) * (p.nb + 1);
    int32_t const* selected = s.selected + static_cast<size_t>(row) * p.topK;
    int32_t const begin = rowStart[i];
    int32_t const end = rowStart[i + 1];

    loadTile<T, D>(p, query, mask, row, i * kBlock, queryTile, Smem::kTileStride);
    RowState<D> state;
    for (int32_t index = begin; index < end; ++index)
    {
        int32_t const j = selected[index] - i * p.nb; // the key block of cell (i, j)
        __syncthreads();                             // the previous tiles are consumed
        loadTile<T, D>(p, key, mask, row, j * kBlock, keyTile, Smem::kTileStride);
        loadTile<T, D>(p, value, mask, row, j * kBlock, valueTile, Smem::kTileStride);
        if (threadIdx.x < kBlock)
        {
            keyReal[threadIdx.x] = isReal(p, mask, batch, j * kBlock + threadIdx.x);
        }
        __syncthreads();
        float scores[8];
        blockScores<T, D>(p, queryTile, keyTile, scoreTile, r, lane, scores);
        if constexpr (Smem::kTensorCores)
        {
            state.absorbScores(scores, keyReal, scoreTile + r * Smem::kScoreStride, lane);
            for (int32_t key = lane; key < kBlock; key += 4) // weights as WMMA operands
            {
                weightTile[r * Smem::kWeightStride + key] = Storage<T>::fromFloat(scoreTile[r * Smem::kScoreStride + key]);
            }
            __syncthreads();
            using namespace nvcuda;
            int32_t const warp = threadIdx.x / 32;
            for (int32_t tile = warp; tile < 2 * (D / 16); tile += kHighResThreads / 32)
            {
                int32_t const tileRow = (tile % 2) * 16;
                int32_t const tileCol = (tile / 2) * 16;
                wmma::fragment<wmma::accumulator, 16, 16, 16, float> product;
                wmma::fill_fragment(product, 0.0f);
                for (int32_t k = 0; k < kBlock; k += 16)
                {
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
                    wmma::load_matrix_sync(a, weightTile + tileRow * Smem::kWeightStride + k, Smem::kWeightStride);
                    wmma::load_matrix_sync(b, valueTile + k * Smem::kTileStride + tileCol, Smem::kTileStride);
                    wmma::mma_sync(product, a, b, product);
                }
                wmma::store_matrix_sync(productTile + tileRow * Smem::kProductStride + tileCol, product,
                    Smem::kProductStride, wmma::mem_row_major);
            }
            __syncthreads();
            for (int32_t u = 0; u < RowState<D>::kDims; ++u)
            {
                state.out[u] += productTile[r * Smem::kProductStride + lane + 4 * u];
            }
        }
        else
        {
            float* weights = scoreTile + r * Smem::kScoreStride;
            state.absorbScores(scores, keyReal, weights, lane);
            for (int32_t key = 0; key < kBlock; ++key)
            {
                float const weight = weights[key];
                Element const* v = valueTile + key * Smem::kTileStride + lane;
                for (int32_t u = 0; u < RowState<D>::kDims; ++u)
                {
                    state.out[u] += weight * v[4 * u];
                }
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
        int32_t const d = lane + 4 * u;
        float const hiOut = state.out[u] * toQuantised;
        float value = p.full ? (hiOut * hiScale + lowOut[d] * loScale) / (hiNorm * hiScale + *lowNorm * loScale + kNormaliserEps)
                             : hiOut / (hiNorm + kNormaliserEps);
        value = queryReal ? value : 0.0f;
        if constexpr (Smem::kTensorCores)
        {
            queryTile[r * Smem::kTileStride + d] = Storage<T>::fromFloat(value);
        }
        else
        {
            queryTile[r * Smem::kTileStride + d] = value;
        }
    }
    __syncthreads();
    constexpr int kVector = 16 / sizeof(T);
    for (int32_t index = threadIdx.x; index < kBlock * (D / kVector); index += blockDim.x)
    {
        int32_t const rr = index / (D / kVector);
        int32_t const d = (index % (D / kVector)) * kVector;
        int32_t const outPosition = i * kBlock + rr;
        if (outPosition >= p.seqLen)
        {
            continue;
        }
        union
        {
            uint4 raw;
            T values[kVector];
        } chunk;
        for (int32_t e = 0; e < kVector; ++e)
        {
            if constexpr (Smem::kTensorCores)
            {
                chunk.values[e] = queryTile[rr * Smem::kTileStride + d + e];
            }
            else
            {
                chunk.values[e] = Storage<T>::fromFloat(queryTile[rr * Smem::kTileStride + d + e]);
            }
        }
        *reinterpret_cast<uint4*>(output + (static_cast<size_t>(row) * p.seqLen + outPosition) * D + d) = chunk.raw;
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
    blockMeans<T><<<p.nb * p.rows, min(p.headDim, 128), 0, stream>>>(p, static_cast<T const*>(q),
        static_cast<T const*>(k), static_cast<T const*>(v), mask, s.counts, s.queryMean, s.keyMean, s.valueMean);
    MRA_CHECK_LAUNCH("blockMeans");
    lowResolutionLogits<<<p.nb * p.rows, kLogitThreads, 0, stream>>>(p, s);
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
