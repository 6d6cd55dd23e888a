// Parameter checks, sizes and the workspace layout shared by the CPU reference and the kernels.
#include "mraAttentionCommon.h"

#include <cmath>
#include <initializer_list>
#include <limits>

namespace mra
{
namespace
{

#ifndef MRA_FENCED_WORKSPACE
size_t alignUp(size_t bytes)
{
    return (bytes + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment;
}
#endif

// Multiplies step by step so that no intermediate product can overflow int64: every factor is
// a positive int32, and each partial product is checked before the next multiplication.
bool productFitsInInt32(std::initializer_list<int64_t> factors)
{
    int64_t product = 1;
    for (int64_t const factor : factors)
    {
        product *= factor;
        if (product > std::numeric_limits<int32_t>::max())
        {
            return false;
        }
    }
    return true;
}

} // namespace

Problem makeProblem(MraAttentionParams const& params)
{
    Problem p{};
    p.batch = params.batch;
    p.heads = params.heads;
    p.seqLen = params.seq_len;
    p.headDim = params.head_dim;
    p.blockSize = params.block_size;
    p.nb = (params.seq_len + params.block_size - 1) / params.block_size;
    int64_t const cells = int64_t{p.nb} * p.nb;
    p.topK = static_cast<int32_t>(cells < params.num_blocks ? cells : params.num_blocks);
    p.rows = params.batch * params.heads;
    p.full = params.approx_mode == MRA_FULL;
    p.priorFirst = params.initial_prior_first_n_blocks;
    p.priorDiagonal = params.initial_prior_diagonal_n_blocks;
    p.scaleDivisor = static_cast<float>(std::sqrt(static_cast<double>(params.head_dim)));
    size_t const headDim = static_cast<size_t>(params.head_dim);
    size_t const heads = static_cast<size_t>(params.heads), seqLen = static_cast<size_t>(params.seq_len);
    bool const tokenMajor = params.layout == MRA_BSHD; // [batch, seq, heads, head_dim]
    p.batchStride = heads * seqLen * headDim;
    p.headStride = tokenMajor ? headDim : seqLen * headDim;
    p.tokenStride = tokenMajor ? heads * headDim : headDim;
    return p;
}

std::array<WorkspaceSection, kWorkspaceSections> workspaceSections(Problem const& p)
{
    size_t const rows = static_cast<size_t>(p.rows);
    size_t const nb = static_cast<size_t>(p.nb);
    size_t const means = rows * nb * p.headDim * sizeof(float);
    size_t const perBlock = rows * nb * sizeof(float);
    return {{
        {"counts", &WorkspaceLayout::counts, static_cast<size_t>(p.batch) * nb * sizeof(float)},
        {"queryMean", &WorkspaceLayout::queryMean, means},
        {"keyMean", &WorkspaceLayout::keyMean, means},
        {"valueMean", &WorkspaceLayout::valueMean, means},
        {"lowLogits", &WorkspaceLayout::lowLogits, rows * nb * nb * sizeof(float)},
        {"rowMax", &WorkspaceLayout::rowMax, perBlock},
        {"threshold", &WorkspaceLayout::threshold, rows * sizeof(float)},
        {"selected", &WorkspaceLayout::selected, rows * static_cast<size_t>(p.topK) * sizeof(int32_t)},
        {"rowStart", &WorkspaceLayout::rowStart, rows * (nb + 1) * sizeof(int32_t)},
        {"lowOut", &WorkspaceLayout::lowOut, means},
        {"lowNorm", &WorkspaceLayout::lowNorm, perBlock},
    }};
}

WorkspaceLayout makeLayout(Problem const& p)
{
    WorkspaceLayout layout{};
    size_t offset = 0;
    for (WorkspaceSection const& section : workspaceSections(p))
    {
#ifdef MRA_FENCED_WORKSPACE
        layout.*section.offset = placeFencedSection(offset, section.bytes);
#else
        layout.*section.offset = offset;
        offset += alignUp(section.bytes);
#endif
    }
    layout.total = offset;
    return layout;
}

} // namespace mra

extern "C" {

MraStatus mraCheckParams(MraAttentionParams const* params)
{
    if (params == nullptr)
    {
        return MRA_INVALID_ARGUMENT;
    }
    MraAttentionParams const& p = *params;
    bool const sizes = p.batch >= 1 && p.heads >= 1 && p.seq_len >= 1 && p.head_dim >= 1
        && p.block_size >= 1 && p.num_blocks >= 1;
    bool const settings = (p.approx_mode == MRA_FULL || p.approx_mode == MRA_SPARSE)
        && p.initial_prior_first_n_blocks >= 0 && p.initial_prior_diagonal_n_blocks >= 0
        && (p.dtype == MRA_FLOAT32 || p.dtype == MRA_FLOAT16 || p.dtype == MRA_BFLOAT16)
        && (p.layout == MRA_BHSD || p.layout == MRA_BSHD);
    if (!sizes || !settings)
    {
        return MRA_INVALID_ARGUMENT;
    }
    // Indices are int32 in the kernels: every tensor and the block grid must fit.
    int64_t const nb = (int64_t{p.seq_len} + p.block_size - 1) / p.block_size;
    bool const fits = mra::productFitsInInt32({p.batch, p.heads, p.seq_len, p.head_dim})
        && mra::productFitsInInt32({p.batch, p.heads, nb, nb})
        && mra::productFitsInInt32({nb, p.block_size});
    return fits ? MRA_OK : MRA_UNSUPPORTED;
}

int32_t mraInterfaceVersion(void)
{
    return MRA_ATTENTION_INTERFACE_VERSION;
}

int32_t mraNumBlocksPerRow(MraAttentionParams const* params)
{
    return mra::makeProblem(*params).nb;
}

int32_t mraSelectedBlocksPerHead(MraAttentionParams const* params)
{
    return mra::makeProblem(*params).topK;
}

size_t mraWorkspaceSize(MraAttentionParams const* params)
{
    if (mraCheckParams(params) != MRA_OK)
    {
        return 0;
    }
    return mra::makeLayout(mra::makeProblem(*params)).total;
}

int32_t const* mraSelectedBlocks(MraAttentionParams const* params, void const* workspace)
{
    mra::WorkspaceLayout const layout = mra::makeLayout(mra::makeProblem(*params));
    return reinterpret_cast<int32_t const*>(static_cast<char const*>(workspace) + layout.selected);
}

char const* mraStatusString(MraStatus status)
{
    switch (status)
    {
    case MRA_OK: return "ok";
    case MRA_INVALID_ARGUMENT: return "invalid argument (a shape, setting or pointer)";
    case MRA_UNSUPPORTED: return "unsupported by this implementation";
    case MRA_WORKSPACE_TOO_SMALL: return "workspace too small (see mraWorkspaceSize)";
    case MRA_CUDA_ERROR: return "CUDA error (see mraLastCudaError)";
    case MRA_OUT_OF_MEMORY: return "out of host memory, or no thread could be started";
    }
    return "unknown status";
}

} // extern "C"
