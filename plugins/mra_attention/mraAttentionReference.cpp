/*
 * The CPU reference of the MRA attention plugin: the same algorithm as the CUDA kernels, in
 * plain C++, so that CI (no GPU, no TensorRT) checks the plugin's design against PyTorch.
 *
 * Stages, as in the kernels:
 *   1. block token counts and block means of the masked Q, K, V;
 *   2. low-resolution logits, their row max (before masking), masking;
 *   3. selection of the top-k cells per (batch, head), ties to the lower flat index;
 *   4. per query block: its selected key blocks with an online (FlashAttention-style) running
 *      max, the 1e-3-quantised row max, then the low-resolution term and correction (epilogue).
 */
#include "mraAttention.h"
#include "mraAttentionCommon.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
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

struct Inputs
{
    Tensor query, key, value;
    int32_t const* mask;
};

bool isReal(Problem const& p, int32_t const* mask, int32_t batch, int32_t position)
{
    return position < p.seqLen && mask[static_cast<size_t>(batch) * p.seqLen + position] != 0;
}

//! Element (row, position, d) of a [rows, seq, D] tensor, masked (0 for padding and past seq).
float maskedAt(Problem const& p, Inputs const& in, Tensor const& tensor, int32_t row, int32_t position, int32_t d)
{
    if (!isReal(p, in.mask, row / p.heads, position))
    {
        return 0.0f;
    }
    return tensor[(static_cast<size_t>(row) * p.seqLen + position) * p.headDim + d];
}

// 1. Real tokens per block, and block means of the masked Q, K, V.
void blockMeans(Problem const& p, Inputs const& in, Scratch& s)
{
    for (int32_t b = 0; b < p.batch; ++b)
    {
        for (int32_t j = 0; j < p.nb; ++j)
        {
            float count = 0.0f;
            for (int32_t t = 0; t < p.blockSize; ++t)
            {
                count += isReal(p, in.mask, b, j * p.blockSize + t) ? 1.0f : 0.0f;
            }
            s.counts[b * p.nb + j] = count;
        }
    }
    Tensor const* sources[3] = {&in.query, &in.key, &in.value};
    float* means[3] = {s.queryMean, s.keyMean, s.valueMean};
    for (int32_t row = 0; row < p.rows; ++row)
    {
        for (int32_t j = 0; j < p.nb; ++j)
        {
            float const denominator = s.counts[(row / p.heads) * p.nb + j] + kNormaliserEps;
            for (int32_t which = 0; which < 3; ++which)
            {
                for (int32_t d = 0; d < p.headDim; ++d)
                {
                    float sum = 0.0f;
                    for (int32_t t = 0; t < p.blockSize; ++t)
                    {
                        sum += maskedAt(p, in, *sources[which], row, j * p.blockSize + t, d);
                    }
                    means[which][(static_cast<size_t>(row) * p.nb + j) * p.headDim + d] = sum / denominator;
                }
            }
        }
    }
}

// 2. L = Qh Kh^T / sqrt(D); r = max_j L (before masking); L -= 1e4 where c_i * c_j < 0.5.
void lowResolutionLogits(Problem const& p, Scratch& s)
{
    for (int32_t row = 0; row < p.rows; ++row)
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
void selectBlocks(Problem const& p, Scratch& s)
{
    int32_t const cells = p.nb * p.nb;
    std::vector<uint32_t> keys(cells);
    for (int32_t row = 0; row < p.rows; ++row)
    {
        for (int32_t cell = 0; cell < cells; ++cell)
        {
            keys[cell] = orderedKey(scoreAt(p, s, row, cell));
        }
        std::vector<uint32_t> order(keys);
        std::nth_element(order.begin(), order.begin() + (p.topK - 1), order.end(), std::greater<uint32_t>());
        uint32_t const threshold = order[p.topK - 1];
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
}

//! Per-query state of the high-resolution pass: an online softmax over the selected blocks.
//! As in the CUDA kernel, the exponentials are taken against the maximum over real keys (so fp16
//! weights cannot all underflow there) and moved to the quantised M in the epilogue.
struct QueryState
{
    float runningMax = -std::numeric_limits<float>::infinity(); //!< every key: gives M
    float baseMax = std::numeric_limits<float>::lowest();       //!< real keys only
    float norm = 0.0f;            //!< sum of exp(P - baseMax)
    std::vector<float> out;       //!< sum of exp(P - baseMax) * V
};

// 4. One query block i of one (batch, head): its selected key blocks, then the epilogue.
void queryBlock(Problem const& p, Inputs const& in, Scratch const& s, int32_t row, int32_t i, void* output,
    MraDataType dtype)
{
    int32_t const batch = row / p.heads;
    int32_t const* rowStart = s.rowStart + static_cast<size_t>(row) * (p.nb + 1);
    int32_t const* selected = s.selected + static_cast<size_t>(row) * p.topK;

    // The low-resolution term of this block row (mode "full"), shared by its queries.
    std::vector<float> lowOut(p.headDim, 0.0f);
    float lowNorm = 0.0f;
    float const rowMax = s.rowMax[row * p.nb + i];
    if (p.full)
    {
        for (int32_t j = 0; j < p.nb; ++j)
        {
            int32_t const cell = i * p.nb + j;
            float const exact = scoreAt(p, s, row, cell) >= s.threshold[row] ? 1.0f : 0.0f;
            float const logit = s.lowLogits[static_cast<size_t>(row) * p.nb * p.nb + cell];
            float const weight = std::exp((logit - rowMax) - kMaskedLogitPenalty * exact) * s.counts[batch * p.nb + j];
            float const* v = s.valueMean + (static_cast<size_t>(row) * p.nb + j) * p.headDim;
            for (int32_t d = 0; d < p.headDim; ++d)
            {
                lowOut[d] += weight * v[d];
            }
            lowNorm += weight;
        }
    }

    std::vector<float> q(p.headDim);
    std::vector<float> scores(p.blockSize);
    for (int32_t t = 0; t < p.blockSize; ++t)
    {
        int32_t const position = i * p.blockSize + t;
        if (position >= p.seqLen)
        {
            break;
        }
        size_t const outBase = (static_cast<size_t>(row) * p.seqLen + position) * p.headDim;
        if (!isReal(p, in.mask, batch, position))
        {
            for (int32_t d = 0; d < p.headDim; ++d)
            {
                Tensor::store(output, dtype, outBase + d, 0.0f);
            }
            continue;
        }
        for (int32_t d = 0; d < p.headDim; ++d)
        {
            q[d] = maskedAt(p, in, in.query, row, position, d);
        }
        QueryState state;
        state.out.assign(p.headDim, 0.0f);
        for (int32_t index = rowStart[i]; index < rowStart[i + 1]; ++index)
        {
            int32_t const j = selected[index] % p.nb;
            float blockMax = -std::numeric_limits<float>::infinity();
            float blockRealMax = std::numeric_limits<float>::lowest();
            for (int32_t u = 0; u < p.blockSize; ++u)
            {
                float dot = 0.0f;
                for (int32_t d = 0; d < p.headDim; ++d)
                {
                    dot += q[d] * maskedAt(p, in, in.key, row, j * p.blockSize + u, d);
                }
                scores[u] = dot / p.scaleDivisor; // masked keys: 0, and they count in M
                blockMax = std::max(blockMax, scores[u]);
                if (isReal(p, in.mask, batch, j * p.blockSize + u))
                {
                    blockRealMax = std::max(blockRealMax, scores[u]);
                }
            }
            state.runningMax = std::max(state.runningMax, blockMax);
            float const newBase = std::max(state.baseMax, blockRealMax);
            float const rescale = std::exp(state.baseMax - newBase); // 1 until a real key is seen
            state.norm *= rescale;
            for (float& value : state.out)
            {
                value *= rescale;
            }
            state.baseMax = newBase;
            for (int32_t u = 0; u < p.blockSize; ++u)
            {
                int32_t const key = j * p.blockSize + u;
                if (!isReal(p, in.mask, batch, key))
                {
                    continue; // exp(P - M - 1e4) is exactly 0 in float32
                }
                float const weight = std::exp(scores[u] - newBase);
                state.norm += weight;
                for (int32_t d = 0; d < p.headDim; ++d)
                {
                    state.out[d] += weight * maskedAt(p, in, in.value, row, key, d);
                }
            }
        }
        float const quantisedMax = quantisedRowMax(state.runningMax);
        // exp(P - M) = exp(P - baseMax) * exp(baseMax - M), and baseMax <= M + 1e-3; a row
        // without real keys (baseMax = lowest) gets 0.
        float const toQuantised = std::exp(state.baseMax - quantisedMax);
        float const hiNorm = state.norm * toQuantised;
        float const maxGap = rowMax - quantisedMax;
        float const loScale = std::exp(std::min(maxGap, 0.0f));
        float const hiScale = std::exp(-std::max(maxGap, 0.0f));
        for (int32_t d = 0; d < p.headDim; ++d)
        {
            float const hiOut = state.out[d] * toQuantised;
            float const value = p.full
                ? (hiOut * hiScale + lowOut[d] * loScale) / (hiNorm * hiScale + lowNorm * loScale + kNormaliserEps)
                : hiOut / (hiNorm + kNormaliserEps);
            Tensor::store(output, dtype, outBase + d, value);
        }
    }
}

} // namespace
} // namespace mra

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
    blockMeans(problem, inputs, scratch);
    lowResolutionLogits(problem, scratch);
    selectBlocks(problem, scratch);
    for (int32_t row = 0; row < problem.rows; ++row)
    {
        for (int32_t i = 0; i < problem.nb; ++i)
        {
            queryBlock(problem, inputs, scratch, row, i, output, params->dtype);
        }
    }
    return MRA_OK;
}
