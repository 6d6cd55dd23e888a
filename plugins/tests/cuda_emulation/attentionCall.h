/*
 * One call of the kernels' entry point (mraAttentionCuda) on random inputs, as the emulation's
 * drivers make it (racecheckDriver.cpp, bankcheckDriver.cpp): the workspace on its own pages, as
 * the emulated kernels want it (fencedWorkspace.cpp).
 */
#ifndef MRA_ATTENTION_CALL_H
#define MRA_ATTENTION_CALL_H

#include "fencedGaps.h" // pageSize
#include "guardedBuffer.h"
#include "mraAttention.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <new>
#include <optional>
#include <random>
#include <vector>

namespace checks
{

//! `count` elements of `dtype` in [-2, 2), as raw bytes.
inline std::vector<unsigned char> randomTensor(size_t count, MraDataType dtype, std::mt19937& random)
{
    std::uniform_real_distribution<float> uniform(-2.0f, 2.0f);
    size_t const element = dtype == MRA_FLOAT32 ? 4 : 2;
    std::vector<unsigned char> bytes(count * element);
    for (size_t i = 0; i < count; ++i)
    {
        float const value = uniform(random);
        if (dtype == MRA_FLOAT32)
        {
            std::memcpy(&bytes[4 * i], &value, 4);
        }
        else
        {
            // The emulation's own conversions (cuda_fp16.h, cuda_bf16.h stand-ins).
            uint16_t const bits = dtype == MRA_FLOAT16 ? __float2half_rn(value).bits : __float2bfloat16_rn(value).bits;
            std::memcpy(&bytes[2 * i], &bits, 2);
        }
    }
    return bytes;
}

//! One call on random inputs, the last batch's sequence cut to `realTokens`; false on failure.
inline bool runAttention(MraAttentionParams const& params, int32_t realTokens, uint32_t seed)
{
    std::mt19937 random(seed);
    size_t const elements = static_cast<size_t>(params.batch) * params.heads * params.seq_len * params.head_dim;
    std::vector<unsigned char> const query = randomTensor(elements, params.dtype, random);
    std::vector<unsigned char> const key = randomTensor(elements, params.dtype, random);
    std::vector<unsigned char> const value = randomTensor(elements, params.dtype, random);
    std::vector<unsigned char> output(query.size());
    std::vector<int32_t> mask(static_cast<size_t>(params.batch) * params.seq_len, 1);
    for (int32_t t = realTokens; t < params.seq_len; ++t)
    {
        mask[static_cast<size_t>(params.batch - 1) * params.seq_len + t] = 0;
    }
    // On a page, as the emulated kernels want it (fencedWorkspace.cpp), as the plugin runner's.
    size_t const workspaceBytes = mraWorkspaceSize(&params);
    std::optional<checks::GuardedBuffer> workspace;
    try
    {
        workspace.emplace(workspaceBytes, ::emu::pageSize());
    }
    catch (std::bad_alloc const&)
    {
        std::fprintf(stderr, "no memory for a workspace of %zu bytes\n", workspaceBytes);
        return false;
    }
    MraStatus const status = mraAttentionCuda(&params, query.data(), key.data(), value.data(), mask.data(),
        output.data(), workspace->start(), workspace->size(), nullptr);
    if (status != MRA_OK)
    {
        std::fprintf(stderr, "mraAttentionCuda: %s (%s)\n", mraStatusString(status), mraLastCudaError());
        return false;
    }
    return true;
}

} // namespace checks

#endif // MRA_ATTENTION_CALL_H
