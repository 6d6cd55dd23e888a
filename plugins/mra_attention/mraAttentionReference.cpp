/*
 * The C++ twin of the CUDA kernels: the same algorithm on the CPU, multi-threaded over the
 * (batch, head) rows. CI checks it against PyTorch; the PyTorch op and the onnxruntime op run it
 * on the CPU.
 *
 * Stages, as in the kernels, each row on one thread:
 *   0. the row's Q, K, V as float32, masked (0 for padding and past the sequence), in whole blocks;
 *   1. block token counts and block means of the masked Q, K, V;
 *   2. low-resolution logits, their row max (before masking), masking;
 *   3. selection of the top-k cells per (batch, head), ties to the lower flat index;
 *   4. per query block: its selected key blocks with an online (FlashAttention-style) running
 *      max, the 1e-3-quantised row max, then the low-resolution term and correction (epilogue).
 * Stages 1-3 sum in the same order as before (and as mra_export.attention's float32 sums
 * compare to them), so the selection does not move; stage 4 computes 32x32 tiles that the
 * compiler vectorises, with fused multiply-adds where the CPU has them (an x86-64 build carries
 * AVX2 and AVX-512 clones of those loops and picks one at run time).
 */
#include "mraAttention.h"
#include "mraAttentionCommon.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <thread>
#include <vector>

namespace mra
{
namespace
{

// ---- storage types ---------------------------------------------------------------------------

float halfToFloat(uint16_t h)
{
    uint32_t const sign = (h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = h & 0x3ffu;
    uint32_t bits;
    if (exponent == 0x1f)
    {
        bits = sign | 0x7f800000u | (mantissa << 13); // inf or nan
    }
    else if (exponent != 0)
    {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    }
    else if (mantissa == 0)
    {
        bits = sign;
    }
    else
    {
        float const value = std::ldexp(static_cast<float>(mantissa), -24); // subnormal, exact
        std::memcpy(&bits, &value, sizeof(bits));
        bits |= sign;
    }
    float result;
    std::memcpy(&result, &bits, sizeof(result));
    return result;
}

uint16_t floatToHalf(float value) // round to nearest even, as PyTorch's .half()
{
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    uint32_t const sign = (bits >> 16) & 0x8000u;
    uint32_t const magnitude = bits & 0x7fffffffu;
    if (magnitude >= 0x7f800000u)
    {
        return static_cast<uint16_t>(sign | 0x7c00u | (magnitude > 0x7f800000u ? 0x200u : 0u));
    }
    if (magnitude >= 0x477ff000u) // rounds to >= 65520: infinity
    {
        return static_cast<uint16_t>(sign | 0x7c00u);
    }
    if (magnitude < 0x38800000u) // below 2^-14: a subnormal half (or zero)
    {
        float absolute;
        std::memcpy(&absolute, &magnitude, sizeof(absolute));
        return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(absolute * 16777216.0f)));
    }
    uint32_t half = ((magnitude >> 23) - 112) << 10 | ((magnitude >> 13) & 0x3ffu);
    uint32_t const rest = magnitude & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (half & 1u)))
    {
        ++half; // may carry into the exponent, which is right
    }
    return static_cast<uint16_t>(sign | half);
}

float bfloat16ToFloat(uint16_t h)
{
    uint32_t const bits = uint32_t{h} << 16;
    float result;
    std::memcpy(&result, &bits, sizeof(result));
    return result;
}

uint16_t floatToBfloat16(float value)
{
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    if ((bits & 0x7fffffffu) > 0x7f800000u)
    {
        return static_cast<uint16_t>((bits >> 16) | 0x40u); // quiet nan
    }
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return static_cast<uint16_t>(bits >> 16);
}

//! A tensor of any MraDataType, read and written as float.
class Tensor
{
public:
    Tensor(void const* data, MraDataType type) : mData(static_cast<char const*>(data)), mType(type) {}

    float operator[](size_t i) const
    {
        switch (mType)
        {
        case MRA_FLOAT16: return halfToFloat(reinterpret_cast<uint16_t const*>(mData)[i]);
        case MRA_BFLOAT16: return bfloat16ToFloat(reinterpret_cast<uint16_t const*>(mData)[i]);
        default: return reinterpret_cast<float const*>(mData)[i];
        }
    }

    static void store(void* data, MraDataType type, size_t i, float value)
    {
        switch (type)
        {
        case MRA_FLOAT16: static_cast<uint16_t*>(data)[i] = floatToHalf(value); break;
        case MRA_BFLOAT16: static_cast<uint16_t*>(data)[i] = floatToBfloat16(value); break;
        default: static_cast<float*>(data)[i] = value;
        }
    }

private:
    char const* mData;
    MraDataType mType;
};

// ---- the algorithm ---------------------------------------------------------------------------

// The stage-4 loops of one row, cloned for AVX2+FMA and AVX-512 on x86-64 (GCC picks a clone at
// load time from the CPU); elsewhere one portable build.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MRA_VECTOR_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define MRA_VECTOR_CLONES
#endif
#define MRA_INLINE inline __attribute__((always_inline))

struct Inputs
{
    Tensor query, key, value;
    int32_t const* mask;
};

bool isReal(Problem const& p, int32_t const* mask, int32_t batch, int32_t position)
{
    return position < p.seqLen && mask[static_cast<size_t>(batch) * p.seqLen + position] != 0;
}

//! One (batch, head) row's Q, K and V as float32 [nb * blockSize, D]: 0 for padding and past the
//! sequence (the masked tensors of the spec). K is kept a second time, each block transposed to
//! [D][blockSize], so that the score tiles' inner loops run over contiguous keys.
struct RowInputs
{
    std::vector<float> query, key, value, keyByBlock;
    std::vector<float> real; //!< [nb * blockSize] 1 for the real tokens of this row's sample, else 0
};

//! What one thread reuses from row to row (nothing here is shared between threads).
struct ThreadScratch
{
    RowInputs in;
    std::vector<uint32_t> keys, order;  //!< selection keys of one row's cells
    std::vector<float> scores, weights; //!< [blockSize, blockSize] one tile
    std::vector<float> out;             //!< [blockSize, D] sums of exp(P - baseMax) * V
    std::vector<float> runningMax, baseMax, norm; //!< [blockSize] online softmax state per query
    std::vector<float> lowOut;          //!< [D] the block row's low-resolution term
};

void loadMasked(Problem const& p, Tensor const& source, int32_t row, float const* real, std::vector<float>& into)
{
    into.assign(static_cast<size_t>(p.nb) * p.blockSize * p.headDim, 0.0f);
    for (int32_t t = 0; t < p.seqLen; ++t)
    {
        if (real[t] != 0.0f)
        {
            size_t const at = tokenOffset(p, row, t);
            for (int32_t d = 0; d < p.headDim; ++d)
            {
                into[static_cast<size_t>(t) * p.headDim + d] = source[at + d];
            }
        }
    }
}

// 0. The row's masked inputs.
void loadRow(Problem const& p, Inputs const& in, int32_t row, RowInputs& r)
{
    int32_t const padded = p.nb * p.blockSize;
    r.real.assign(padded, 0.0f);
    for (int32_t t = 0; t < padded; ++t)
    {
        r.real[t] = isReal(p, in.mask, row / p.heads, t) ? 1.0f : 0.0f;
    }
    loadMasked(p, in.query, row, r.real.data(), r.query);
    loadMasked(p, in.key, row, r.real.data(), r.key);
    loadMasked(p, in.value, row, r.real.data(), r.value);
    r.keyByBlock.resize(r.key.size());
    for (int32_t j = 0; j < p.nb; ++j)
    {
        float* transposed = r.keyByBlock.data() + static_cast<size_t>(j) * p.headDim * p.blockSize;
        for (int32_t u = 0; u < p.blockSize; ++u)
        {
            for (int32_t d = 0; d < p.headDim; ++d)
            {
                transposed[d * p.blockSize + u] = r.key[(static_cast<size_t>(j) * p.blockSize + u) * p.headDim + d];
            }
        }
    }
}

// 1. Real tokens per block (all rows of a sample share them).
void blockCounts(Problem const& p, int32_t const* mask, Scratch& s)
{
    for (int32_t b = 0; b < p.batch; ++b)
    {
        for (int32_t j = 0; j < p.nb; ++j)
        {
            float count = 0.0f;
            for (int32_t t = 0; t < p.blockSize; ++t)
            {
                count += isReal(p, mask, b, j * p.blockSize + t) ? 1.0f : 0.0f;
            }
            s.counts[b * p.nb + j] = count;
        }
    }
}

// 1. Block means of the masked Q, K, V: each sum in token order.
void blockMeans(Problem const& p, RowInputs const& in, int32_t row, Scratch& s)
{
    std::vector<float> const* sources[3] = {&in.query, &in.key, &in.value};
    float* means[3] = {s.queryMean, s.keyMean, s.valueMean};
    for (int32_t which = 0; which < 3; ++which)
    {
        for (int32_t j = 0; j < p.nb; ++j)
        {
            float const denominator = s.counts[(row / p.heads) * p.nb + j] + kNormaliserEps;
            float* mean = means[which] + (static_cast<size_t>(row) * p.nb + j) * p.headDim;
            std::fill(mean, mean + p.headDim, 0.0f);
            for (int32_t t = 0; t < p.blockSize; ++t)
            {
                float const* x = sources[which]->data() + (static_cast<size_t>(j) * p.blockSize + t) * p.headDim;
                for (int32_t d = 0; d < p.headDim; ++d)
                {
                    mean[d] += x[d];
                }
            }
            for (int32_t d = 0; d < p.headDim; ++d)
            {
                mean[d] = mean[d] / denominator;
            }
        }
    }
}

// 2. L = Qh Kh^T / sqrt(D); r = max_j L (before masking); L -= 1e4 where c_i * c_j < 0.5.
void lowResolutionLogits(Problem const& p, int32_t row, Scratch& s)
{
    float const* counts = s.counts + (row / p.heads) * p.nb;
    for (int32_t i = 0; i < p.nb; ++i)
    {
        float* logits = s.lowLogits + (static_cast<size_t>(row) * p.nb + i) * p.nb;
        float const* q = s.queryMean + (static_cast<size_t>(row) * p.nb + i) * p.headDim;
        float rowMax = -std::numeric_limits<float>::infinity();
        for (int32_t j = 0; j < p.nb; ++j)
        {
            float const* k = s.keyMean + (static_cast<size_t>(row) * p.nb + j) * p.headDim;
            float dot = 0.0f;
            for (int32_t d = 0; d < p.headDim; ++d)
            {
                dot += q[d] * k[d];
            }
            logits[j] = dot / p.scaleDivisor;
            rowMax = std::max(rowMax, logits[j]);
        }
        s.rowMax[row * p.nb + i] = rowMax;
        for (int32_t j = 0; j < p.nb; ++j)
        {
            logits[j] = logits[j] - (counts[i] * counts[j] < 0.5f ? kMaskedLogitPenalty : 0.0f);
        }
    }
}

float scoreAt(Problem const& p, Scratch const& s, int32_t row, int32_t cell)
{
    int32_t const i = cell / p.nb;
    int32_t const j = cell % p.nb;
    return selectionScore(s.lowLogits[static_cast<size_t>(row) * p.nb * p.nb + cell], s.rowMax[row * p.nb + i], i, j,
        p.priorFirst, p.priorDiagonal);
}

// 3. The k best cells; at the k-th value, the lower flat indices first (ranked by orderedKey, as
// the kernels do). Cells come out sorted.
void selectBlocks(Problem const& p, int32_t row, Scratch& s, ThreadScratch& ts)
{
    int32_t const cells = p.nb * p.nb;
    std::vector<uint32_t>& keys = ts.keys;
    keys.resize(cells);
    for (int32_t cell = 0; cell < cells; ++cell)
    {
        keys[cell] = orderedKey(scoreAt(p, s, row, cell));
    }
    ts.order.assign(keys.begin(), keys.end());
    std::nth_element(ts.order.begin(), ts.order.begin() + (p.topK - 1), ts.order.end(), std::greater<uint32_t>());
    uint32_t const threshold = ts.order[p.topK - 1];
    int32_t tiesToTake = p.topK;
    for (uint32_t key : keys)
    {
        tiesToTake -= key > threshold ? 1 : 0;
    }
    int32_t* selected = s.selected + static_cast<size_t>(row) * p.topK;
    int32_t* rowStart = s.rowStart + static_cast<size_t>(row) * (p.nb + 1);
    int32_t taken = 0;
    for (int32_t cell = 0; cell < cells; ++cell)
    {
        if (cell % p.nb == 0)
        {
            rowStart[cell / p.nb] = taken;
        }
        bool const tie = keys[cell] == threshold && tiesToTake > 0;
        if (keys[cell] > threshold || tie)
        {
            tiesToTake -= tie ? 1 : 0;
            selected[taken++] = cell;
        }
    }
    rowStart[p.nb] = taken;
    s.threshold[row] = keyValue(threshold);
}

// 4a. The low-resolution term of block row i (mode "full"), shared by its queries.
float lowResolutionTerm(Problem const& p, Scratch const& s, int32_t row, int32_t i, float* lowOut)
{
    std::fill(lowOut, lowOut + p.headDim, 0.0f);
    float lowNorm = 0.0f;
    float const rowMax = s.rowMax[row * p.nb + i];
    for (int32_t j = 0; j < p.nb; ++j)
    {
        int32_t const cell = i * p.nb + j;
        float const exact = scoreAt(p, s, row, cell) >= s.threshold[row] ? 1.0f : 0.0f;
        float const logit = s.lowLogits[static_cast<size_t>(row) * p.nb * p.nb + cell];
        float const weight
            = std::exp((logit - rowMax) - kMaskedLogitPenalty * exact) * s.counts[(row / p.heads) * p.nb + j];
        float const* v = s.valueMean + (static_cast<size_t>(row) * p.nb + j) * p.headDim;
        for (int32_t d = 0; d < p.headDim; ++d)
        {
            lowOut[d] += weight * v[d];
        }
        lowNorm += weight;
    }
    return lowNorm;
}

// Stage 4's tiles may fuse multiply-adds (the build is -ffp-contract=off elsewhere): only the
// outputs move, by float32 rounding, never the selection, which stages 1-3 fixed.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
#endif

// 8 floats, in whatever registers the clone has (one AVX register, two SSE ones).
typedef float Float8 __attribute__((vector_size(32)));
typedef int32_t Int8 __attribute__((vector_size(32)));
typedef float Float8Unaligned __attribute__((vector_size(32), aligned(4)));
constexpr int kLanes = 8;

MRA_INLINE Float8 load8(float const* p)
{
    return *reinterpret_cast<Float8Unaligned const*>(p);
}

MRA_INLINE void store8(float* p, Float8 value)
{
    *reinterpret_cast<Float8Unaligned*>(p) = value;
}

MRA_INLINE Float8 splat8(float value)
{
    return Float8{} + value;
}

MRA_INLINE float maxOf(Float8 v)
{
    float m = v[0];
    for (int l = 1; l < kLanes; ++l)
    {
        m = std::max(m, v[l]);
    }
    return m;
}

//! exp(x) for x <= 0, 8 at a time (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r,
//! times 2^n): within 2 ulp of std::exp down to -87; below that ~1e-38, against weights of
//! which the largest is 1.
MRA_INLINE Float8 expNonPositive(Float8 x)
{
    Float8 const floor = splat8(-87.0f);
    x = x > floor ? x : floor;
    Float8 const magic = splat8(12582912.0f); // 1.5 * 2^23: adding it rounds to an integer
    Float8 const shifted = x * 1.44269504088896341f + magic;
    Float8 const n = shifted - magic;
    Int8 const exponent = ((Int8)shifted - (Int8)magic + 127) << 23; // vector casts keep the bits
    Float8 r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    Float8 poly = splat8(1.9875691500e-4f);
    poly = poly * r + 1.3981999507e-3f;
    poly = poly * r + 8.3334519073e-3f;
    poly = poly * r + 4.1665795894e-2f;
    poly = poly * r + 1.6666665459e-1f;
    poly = poly * r + 5.0000001201e-1f;
    Float8 const expR = poly * r * r + r + 1.0f;
    return expR * (Float8)exponent;
}

//! scores[t][u] = (q_t . k_u) / divisor for one query block and one key block (keyT: [D][bs]).
//! BS and HD are the block size and head dim when known at compile time (0: the runtime sizes,
//! plain loops).
template <int BS, int HD>
MRA_INLINE void scoreTile(int32_t bs, int32_t headDim, float const* __restrict query, float const* __restrict keyT,
    float divisor, float* __restrict scores)
{
    if constexpr (BS > 0)
    {
        constexpr int kQueries = 2;    // 2 x 4 vector sums in flight keep the FMA units busy
        constexpr int kVectors = BS / kLanes;
        static_assert(BS % (kLanes * 1) == 0 && BS % kQueries == 0, "whole vectors and query pairs");
        for (int t = 0; t < BS; t += kQueries)
        {
            Float8 sums[kQueries][kVectors] = {};
            for (int d = 0; d < HD; ++d)
            {
                Float8 keys[kVectors];
#pragma GCC unroll 16
                for (int v = 0; v < kVectors; ++v)
                {
                    keys[v] = load8(keyT + d * BS + v * kLanes);
                }
#pragma GCC unroll 4
                for (int r = 0; r < kQueries; ++r)
                {
                    Float8 const q = splat8(query[(t + r) * HD + d]);
#pragma GCC unroll 16
                    for (int v = 0; v < kVectors; ++v)
                    {
                        sums[r][v] += q * keys[v];
                    }
                }
            }
            for (int r = 0; r < kQueries; ++r)
            {
                for (int v = 0; v < kVectors; ++v)
                {
                    store8(scores + (t + r) * BS + v * kLanes, sums[r][v] / divisor);
                }
            }
        }
    }
    else
    {
        for (int32_t t = 0; t < bs; ++t)
        {
            float* row = scores + t * bs;
            std::fill(row, row + bs, 0.0f);
            for (int32_t d = 0; d < headDim; ++d)
            {
                float const q = query[t * headDim + d];
                for (int32_t u = 0; u < bs; ++u)
                {
                    row[u] += q * keyT[d * bs + u];
                }
            }
            for (int32_t u = 0; u < bs; ++u)
            {
                row[u] = row[u] / divisor;
            }
        }
    }
}

//! out[t] += sum_u weights[t][u] * value[u] for one query block and one key block.
template <int BS, int HD>
MRA_INLINE void accumulateTile(int32_t bs, int32_t headDim, float const* __restrict weights,
    float const* __restrict value, float* __restrict out)
{
    if constexpr (BS > 0)
    {
        constexpr int kChunk = HD < 64 ? HD : 64; // dims summed at once: 8 vectors in registers
        constexpr int kVectors = kChunk / kLanes;
        static_assert(HD % kChunk == 0 && kChunk % kLanes == 0, "whole vectors");
        for (int t = 0; t < BS; ++t)
        {
            for (int c = 0; c < HD; c += kChunk)
            {
                Float8 sums[kVectors];
#pragma GCC unroll 8
                for (int v = 0; v < kVectors; ++v)
                {
                    sums[v] = load8(out + t * HD + c + v * kLanes);
                }
                for (int u = 0; u < BS; ++u)
                {
                    Float8 const w = splat8(weights[t * BS + u]);
#pragma GCC unroll 8
                    for (int v = 0; v < kVectors; ++v)
                    {
                        sums[v] += w * load8(value + u * HD + c + v * kLanes);
                    }
                }
#pragma GCC unroll 8
                for (int v = 0; v < kVectors; ++v)
                {
                    store8(out + t * HD + c + v * kLanes, sums[v]);
                }
            }
        }
    }
    else
    {
        for (int32_t t = 0; t < bs; ++t)
        {
            for (int32_t u = 0; u < bs; ++u)
            {
                float const w = weights[t * bs + u];
                for (int32_t d = 0; d < headDim; ++d)
                {
                    out[t * headDim + d] += w * value[u * headDim + d];
                }
            }
        }
    }
}

//! The tile's maximum over every key (padded keys score 0 and count in M) and over real keys.
template <int BS>
MRA_INLINE void tileMaxima(int32_t bs, float const* __restrict row, float const* __restrict realKey, float& blockMax,
    float& blockRealMax)
{
    if constexpr (BS > 0)
    {
        Float8 all = splat8(-std::numeric_limits<float>::infinity());
        Float8 real = splat8(std::numeric_limits<float>::lowest());
        for (int u = 0; u < BS; u += kLanes)
        {
            Float8 const s = load8(row + u);
            all = s > all ? s : all;
            real = (load8(realKey + u) != 0.0f) & (s > real) ? s : real;
        }
        blockMax = maxOf(all);
        blockRealMax = maxOf(real);
    }
    else
    {
        blockMax = -std::numeric_limits<float>::infinity();
        blockRealMax = std::numeric_limits<float>::lowest();
        for (int32_t u = 0; u < bs; ++u)
        {
            blockMax = std::max(blockMax, row[u]);
            blockRealMax = realKey[u] != 0.0f ? std::max(blockRealMax, row[u]) : blockRealMax;
        }
    }
}

//! weights[u] = exp(P - base) for real keys, 0 for masked ones; returns their sum.
template <int BS>
MRA_INLINE float tileWeights(int32_t bs, float const* __restrict row, float const* __restrict realKey, float base,
    float* __restrict weights)
{
    if constexpr (BS > 0)
    {
        Float8 sum{};
        for (int u = 0; u < BS; u += kLanes)
        {
            Float8 x = load8(row + u) - base;
            x = x < 0.0f ? x : Float8{}; // masked keys may lie above base: their weight is 0 anyway
            Float8 const w = expNonPositive(x) * load8(realKey + u);
            store8(weights + u, w);
            sum += w;
        }
        float total = 0.0f;
        for (int l = 0; l < kLanes; ++l)
        {
            total += sum[l];
        }
        return total;
    }
    else
    {
        float total = 0.0f;
        for (int32_t u = 0; u < bs; ++u)
        {
            weights[u] = realKey[u] != 0.0f ? std::exp(row[u] - base) : 0.0f;
            total += weights[u];
        }
        return total;
    }
}

//! One step of the online softmax for every query of the block: the tile's maxima, the rescale
//! of what was summed so far, and the tile's weights exp(P - baseMax).
template <int BS>
MRA_INLINE void softmaxStep(int32_t bs, int32_t headDim, float const* __restrict scores,
    float const* __restrict realKey, ThreadScratch& ts)
{
    for (int32_t t = 0; t < bs; ++t)
    {
        float const* row = scores + static_cast<size_t>(t) * bs;
        float blockMax, blockRealMax;
        tileMaxima<BS>(bs, row, realKey, blockMax, blockRealMax);
        ts.runningMax[t] = std::max(ts.runningMax[t], blockMax);
        float const newBase = std::max(ts.baseMax[t], blockRealMax);
        float const rescale = std::exp(ts.baseMax[t] - newBase); // 1 until a real key is seen
        if (rescale != 1.0f)
        {
            ts.norm[t] *= rescale;
            float* out = ts.out.data() + static_cast<size_t>(t) * headDim;
            for (int32_t d = 0; d < headDim; ++d)
            {
                out[d] *= rescale;
            }
        }
        ts.baseMax[t] = newBase;
        ts.norm[t] += tileWeights<BS>(bs, row, realKey, newBase, ts.weights.data() + static_cast<size_t>(t) * bs);
    }
}

//! The epilogue of one query: 1e-3-quantised M, the low-resolution term and the correction.
void storeQuery(Problem const& p, ThreadScratch const& ts, int32_t t, float lowNorm, float rowMax, void* output,
    size_t outBase, MraDataType dtype)
{
    float const quantisedMax = quantisedRowMax(ts.runningMax[t]);
    // exp(P - M) = exp(P - baseMax) * exp(baseMax - M), and baseMax <= M + 1e-3; a row
    // without real keys (baseMax = lowest) gets 0.
    float const toQuantised = std::exp(ts.baseMax[t] - quantisedMax);
    float const hiNorm = ts.norm[t] * toQuantised;
    float const maxGap = rowMax - quantisedMax;
    float const loScale = std::exp(std::min(maxGap, 0.0f));
    float const hiScale = std::exp(-std::max(maxGap, 0.0f));
    float const* out = ts.out.data() + static_cast<size_t>(t) * p.headDim;
    for (int32_t d = 0; d < p.headDim; ++d)
    {
        float const hiOut = out[d] * toQuantised;
        float const value = p.full
            ? (hiOut * hiScale + ts.lowOut[d] * loScale) / (hiNorm * hiScale + lowNorm * loScale + kNormaliserEps)
            : hiOut / (hiNorm + kNormaliserEps);
        Tensor::store(output, dtype, outBase + d, value);
    }
}

// 4. Query block i of one (batch, head): its selected key blocks, then the epilogue.
template <int BS, int HD>
MRA_INLINE void queryBlock(Problem const& p, Scratch const& s, int32_t row, int32_t i, ThreadScratch& ts,
    void* output, MraDataType dtype)
{
    int32_t const bs = p.blockSize;
    int32_t const headDim = p.headDim;
    RowInputs const& in = ts.in;
    float const lowNorm = p.full ? lowResolutionTerm(p, s, row, i, ts.lowOut.data()) : 0.0f;
    std::fill(ts.runningMax.begin(), ts.runningMax.end(), -std::numeric_limits<float>::infinity());
    std::fill(ts.baseMax.begin(), ts.baseMax.end(), std::numeric_limits<float>::lowest());
    std::fill(ts.norm.begin(), ts.norm.end(), 0.0f);
    std::fill(ts.out.begin(), ts.out.end(), 0.0f);

    float const* query = in.query.data() + static_cast<size_t>(i) * bs * headDim;
    int32_t const* rowStart = s.rowStart + static_cast<size_t>(row) * (p.nb + 1);
    int32_t const* selected = s.selected + static_cast<size_t>(row) * p.topK;
    for (int32_t index = rowStart[i]; index < rowStart[i + 1]; ++index)
    {
        int32_t const j = selected[index] % p.nb;
        size_t const block = static_cast<size_t>(j) * bs * headDim;
        scoreTile<BS, HD>(bs, headDim, query, in.keyByBlock.data() + block, p.scaleDivisor, ts.scores.data());
        softmaxStep<BS>(bs, headDim, ts.scores.data(), in.real.data() + static_cast<size_t>(j) * bs, ts);
        accumulateTile<BS, HD>(bs, headDim, ts.weights.data(), in.value.data() + block, ts.out.data());
    }

    float const rowMax = s.rowMax[row * p.nb + i];
    for (int32_t t = 0; t < bs && i * bs + t < p.seqLen; ++t)
    {
        size_t const outBase = tokenOffset(p, row, i * bs + t);
        if (in.real[i * bs + t] == 0.0f)
        {
            for (int32_t d = 0; d < headDim; ++d)
            {
                Tensor::store(output, dtype, outBase + d, 0.0f);
            }
            continue;
        }
        storeQuery(p, ts, t, lowNorm, rowMax, output, outBase, dtype);
    }
}

template <int BS, int HD>
MRA_INLINE void queryBlocksOf(Problem const& p, Scratch const& s, int32_t row, ThreadScratch& ts, void* output,
    MraDataType dtype)
{
    for (int32_t i = 0; i < p.nb; ++i)
    {
        queryBlock<BS, HD>(p, s, row, i, ts, output, dtype);
    }
}

// 4. Every query block of a row, with the tile loops unrolled for the usual sizes.
MRA_VECTOR_CLONES void highResolution(Problem const& p, Scratch const& s, int32_t row, ThreadScratch& ts,
    void* output, MraDataType dtype)
{
    if (p.blockSize == 32 && p.headDim == 64)
    {
        queryBlocksOf<32, 64>(p, s, row, ts, output, dtype);
    }
    else if (p.blockSize == 32 && p.headDim == 32)
    {
        queryBlocksOf<32, 32>(p, s, row, ts, output, dtype);
    }
    else if (p.blockSize == 32 && p.headDim == 128)
    {
        queryBlocksOf<32, 128>(p, s, row, ts, output, dtype);
    }
    else
    {
        queryBlocksOf<0, 0>(p, s, row, ts, output, dtype);
    }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

//! Stages 0-4 of one (batch, head) row.
void attendRow(Problem const& p, Inputs const& inputs, Scratch& s, int32_t row, ThreadScratch& ts, void* output,
    MraDataType dtype)
{
    loadRow(p, inputs, row, ts.in);
    blockMeans(p, ts.in, row, s);
    lowResolutionLogits(p, row, s);
    selectBlocks(p, row, s, ts);
    highResolution(p, s, row, ts, output, dtype);
}

std::atomic<int32_t> gThreads{0}; // mraSetCpuThreads; 0: one per hardware thread

int32_t threadsFor(Problem const& p)
{
    int32_t wanted = gThreads.load();
    if (wanted <= 0)
    {
        wanted = static_cast<int32_t>(std::max(1u, std::thread::hardware_concurrency()));
    }
    // A thread costs tens of microseconds to start: not worth it for rows of a few blocks.
    int64_t const work = int64_t{p.rows} * p.nb * p.nb;
    return work < 4096 ? 1 : std::min(wanted, p.rows);
}

ThreadScratch makeThreadScratch(Problem const& p)
{
    ThreadScratch ts;
    size_t const tile = static_cast<size_t>(p.blockSize) * p.blockSize;
    ts.scores.resize(tile);
    ts.weights.resize(tile);
    ts.out.resize(static_cast<size_t>(p.blockSize) * p.headDim);
    ts.runningMax.resize(p.blockSize);
    ts.baseMax.resize(p.blockSize);
    ts.norm.resize(p.blockSize);
    ts.lowOut.resize(p.headDim);
    return ts;
}

//! Every row, on `threads` threads taking rows in turn (the calling thread is one of them).
void attendRows(Problem const& p, Inputs const& inputs, Scratch& s, void* output, MraDataType dtype, int32_t threads)
{
    std::atomic<int32_t> next{0};
    auto work = [&]() {
        ThreadScratch ts = makeThreadScratch(p);
        for (int32_t row = next++; row < p.rows; row = next++)
        {
            attendRow(p, inputs, s, row, ts, output, dtype);
        }
    };
    std::vector<std::thread> helpers;
    for (int32_t t = 1; t < threads; ++t)
    {
        helpers.emplace_back(work);
    }
    work();
    for (std::thread& helper : helpers)
    {
        helper.join();
    }
}

} // namespace
} // namespace mra

extern "C" void mraSetCpuThreads(int32_t threads)
{
    mra::gThreads.store(threads);
}

extern "C" MraStatus mraAttentionCpu(MraAttentionParams const* params, void const* query, void const* key,
    void const* value, int32_t const* mask, void* output, void* workspace, size_t workspaceSize)
{
    using namespace mra;
    MraStatus const status = mraCheckParams(params);
    if (status != MRA_OK)
    {
        return status;
    }
    if (query == nullptr || key == nullptr || value == nullptr || mask == nullptr || output == nullptr)
    {
        return MRA_INVALID_ARGUMENT;
    }
    Problem const problem = makeProblem(*params);
    WorkspaceLayout const layout = makeLayout(problem);
    std::vector<unsigned char> ownWorkspace;
    if (workspace == nullptr)
    {
        ownWorkspace.resize(layout.total);
        workspace = ownWorkspace.data();
    }
    else if (workspaceSize < layout.total)
    {
        return MRA_WORKSPACE_TOO_SMALL;
    }
    Inputs const inputs{Tensor(query, params->dtype), Tensor(key, params->dtype), Tensor(value, params->dtype), mask};
    Scratch scratch(layout, workspace);
    blockCounts(problem, mask, scratch);
    try
    {
        attendRows(problem, inputs, scratch, output, params->dtype, threadsFor(problem));
    }
    catch (std::exception const&) // std::bad_alloc, std::system_error (no thread could start)
    {
        return MRA_OUT_OF_MEMORY;
    }
    return MRA_OK;
}
