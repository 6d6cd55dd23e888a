/*
 * What the CPU reference and the CUDA kernels share: the problem's sizes, the workspace layout,
 * the constants of the reference implementation, and the selection score, computed with the
 * same float32 operations in the same order as mra_export.attention (so ties tie alike), and the
 * keys top-k ranks it by.
 */
#ifndef MRA_ATTENTION_COMMON_H
#define MRA_ATTENTION_COMMON_H

#include "mraAttention.h"

#include <array>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define MRA_HOST_DEVICE __host__ __device__
#else
#define MRA_HOST_DEVICE
#endif

namespace mra
{

constexpr float kMaskedLogitPenalty = 1e4f; // masked blocks and keys
constexpr float kPriorBonus = 5e3f;         // prior blocks' selection score
constexpr float kRowMaxScale = 1000.0f;     // the row max is quantised to 1e-3 steps ...
constexpr float kEmptyRowMax = -1e8f;       // ... from this integer: an empty row has M = -1e5
constexpr float kNormaliserEps = 1e-6f;

//! Sizes derived from MraAttentionParams.
struct Problem
{
    int32_t batch, heads, seqLen, headDim, blockSize;
    int32_t nb;       //!< blocks per sequence, ceil(seqLen / blockSize)
    int32_t topK;     //!< selected blocks per (batch, head), min(num_blocks, nb * nb)
    int32_t rows;     //!< batch * heads
    bool full;        //!< approx_mode "full" (else "sparse")
    int32_t priorFirst, priorDiagonal;
    float scaleDivisor; //!< float(sqrt(head_dim)); logits are divided by it, as in PyTorch
    //! Elements between consecutive batches, heads and tokens of query/key/value/output: the
    //! layout (MRA_BHSD or MRA_BSHD) as strides.
    size_t batchStride, headStride, tokenStride;
};

//! Where token `position` of row `row` (= batch * heads + head) starts, in elements.
MRA_HOST_DEVICE inline size_t tokenOffset(Problem const& p, int32_t row, int32_t position)
{
    int32_t const batch = row / p.heads;
    return batch * p.batchStride + (row - batch * p.heads) * p.headStride + position * p.tokenStride;
}

Problem makeProblem(MraAttentionParams const& params);

//! Byte offsets of the workspace sections (each 256-byte aligned; in the CUDA emulation's builds,
//! 16-byte aligned, each against an unmapped page: MRA_FENCED_WORKSPACE).
struct WorkspaceLayout
{
    size_t counts;    //!< float [batch, nb]        real tokens per block
    size_t queryMean; //!< float [rows, nb, D]      block means of masked Q, K, V
    size_t keyMean;
    size_t valueMean;
    size_t lowLogits; //!< float [rows, nb, nb]     masked low-resolution logits L
    size_t rowMax;    //!< float [rows, nb]         r = max_j L, taken before masking
    size_t threshold; //!< float [rows]             the k-th largest selection score
    size_t selected;  //!< int32 [rows, topK]       selected flat cells, ascending
    size_t rowStart;  //!< int32 [rows, nb + 1]     where each query block's cells start
    size_t lowOut;    //!< float [rows, nb, D]      mode "full": sum_j lo_ij Vh_j (the CUDA kernels)
    size_t lowNorm;   //!< float [rows, nb]         mode "full": sum_j lo_ij
    size_t total;
};

//! One workspace section: its name, its offset's field in WorkspaceLayout, and its exact size.
struct WorkspaceSection
{
    char const* name;
    size_t WorkspaceLayout::*offset;
    size_t bytes;
};

constexpr int kWorkspaceSections = 11;
constexpr size_t kWorkspaceAlignment = 256; //!< where each section may start

//! The sections in layout order, unaligned sizes: makeLayout places them, the CUDA emulation
//! fences the gaps between them (plugins/tests/cuda_emulation/fencedWorkspace.cpp).
std::array<WorkspaceSection, kWorkspaceSections> workspaceSections(Problem const& problem);

WorkspaceLayout makeLayout(Problem const& problem);

#ifdef MRA_FENCED_WORKSPACE
//! Builds under the CUDA emulation only: where a section of `bytes` goes, at or after `offset`,
//! with an unmapped page after it; moves `offset` past that page (fencedWorkspace.cpp).
size_t placeFencedSection(size_t& offset, size_t bytes);
#endif

//! The workspace sections as typed pointers (host memory for the CPU, device memory for CUDA).
struct Scratch
{
    float* counts;
    float* queryMean;
    float* keyMean;
    float* valueMean;
    float* lowLogits;
    float* rowMax;
    float* threshold;
    int32_t* selected;
    int32_t* rowStart;
    float* lowOut;
    float* lowNorm;

    Scratch(WorkspaceLayout const& layout, void* workspace)
        : counts(at<float>(workspace, layout.counts))
        , queryMean(at<float>(workspace, layout.queryMean))
        , keyMean(at<float>(workspace, layout.keyMean))
        , valueMean(at<float>(workspace, layout.valueMean))
        , lowLogits(at<float>(workspace, layout.lowLogits))
        , rowMax(at<float>(workspace, layout.rowMax))
        , threshold(at<float>(workspace, layout.threshold))
        , selected(at<int32_t>(workspace, layout.selected))
        , rowStart(at<int32_t>(workspace, layout.rowStart))
        , lowOut(at<float>(workspace, layout.lowOut))
        , lowNorm(at<float>(workspace, layout.lowNorm))
    {
    }

private:
    template <typename T>
    static T* at(void* workspace, size_t offset)
    {
        return reinterpret_cast<T*>(static_cast<char*>(workspace) + offset);
    }
};

//! The original's quantised row maximum M: an integer max of trunc(x * 1000) that starts at
//! -1e8, divided by 1000. A row with no selected block (runningMax = -inf or -FLT_MAX, whose
//! product overflows to -inf) gets -1e5, as does one whose logits are all below -1e5.
MRA_HOST_DEVICE inline float quantisedRowMax(float runningMax)
{
    return fmaxf(truncf(runningMax * kRowMaxScale), kEmptyRowMax) / kRowMaxScale;
}

//! Selection score of cell (i, j): (L - r) plus the priors, added one at a time like PyTorch.
MRA_HOST_DEVICE inline float selectionScore(
    float lowLogit, float rowMax, int32_t i, int32_t j, int32_t priorFirst, int32_t priorDiagonal)
{
    float score = lowLogit - rowMax;
    if (priorDiagonal > 0)
    {
        int32_t const distance = i > j ? i - j : j - i;
        score = score + (distance <= priorDiagonal / 2 ? kPriorBonus : 0.0f);
    }
    if (priorFirst > 0)
    {
        score = score + (i < priorFirst ? kPriorBonus : 0.0f);
        score = score + (j < priorFirst ? kPriorBonus : 0.0f);
    }
    return score;
}

//! The score as an unsigned key in the same order (-0 and +0 are one key), for top-k: a total
//! order even for NaN, which the kernels' radix select and the reference's nth_element both need.
MRA_HOST_DEVICE inline uint32_t orderedKey(float value)
{
    value = value == 0.0f ? 0.0f : value;
    uint32_t bits;
    memcpy(&bits, &value, sizeof(bits));
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

//! The score whose key is ``key`` (the inverse of orderedKey).
MRA_HOST_DEVICE inline float keyValue(uint32_t key)
{
    uint32_t const bits = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
    float value;
    memcpy(&value, &bits, sizeof(value));
    return value;
}

} // namespace mra

#endif // MRA_ATTENTION_COMMON_H
