/*
 * One call of the kernels' entry point (mraAttentionCuda) on random inputs, as the emulation's
 * drivers make it (racecheckDriver.cpp, memoryCountsDriver.cpp): each tensor 256-byte aligned
 * against an unmapped page (guardedBuffer.h), the workspace on its own pages, as the emulated
 * kernels want it (fencedWorkspace.cpp).
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
#include <functional>
#include <new>
#include <optional>
#include <random>
#include <utility>
#include <vector>

namespace checks
{

//! Where cudaMalloc and PyTorch's allocator start a buffer: where a buffer starts decides how
//! many 32-byte sectors a warp's access to it takes (memoryCountsDriver.cpp counts them).
constexpr size_t kDeviceAlignment = 256;

//! `tensor` filled with elements of `dtype` in [-2, 2), as raw bytes.
inline void fillRandom(GuardedBuffer& tensor, MraDataType dtype, std::mt19937& random)
{
    std::uniform_real_distribution<float> uniform(-2.0f, 2.0f);
    size_t const element = dtype == MRA_FLOAT32 ? 4 : 2;
    for (size_t i = 0; i < tensor.size() / element; ++i)
    {
        float const value = uniform(random);
        if (dtype == MRA_FLOAT32)
        {
            std::memcpy(tensor.start() + 4 * i, &value, 4);
        }
        else
        {
            // The emulation's own conversions (cuda_fp16.h, cuda_bf16.h stand-ins).
            uint16_t const bits = dtype == MRA_FLOAT16 ? __float2half_rn(value).bits : __float2bfloat16_rn(value).bits;
            std::memcpy(tensor.start() + 2 * i, &bits, 2);
        }
    }
}

//! Memory spans (start, bytes), as runAttention hands its buffers to `beforeCall`.
using Spans = std::vector<std::pair<void const*, size_t>>;

//! One call on random inputs, the last batch's sequence cut to `realTokens`; false on failure.
//! `beforeCall`, if given, sees the call's buffers (Q, K, V, the mask, the output, the workspace).
inline bool runAttention(MraAttentionParams const& params, int32_t realTokens, uint32_t seed,
    std::function<void(Spans const&)> const& beforeCall = {})
{
    std::mt19937 random(seed);
    size_t const tensorBytes = static_cast<size_t>(params.batch) * params.heads * params.seq_len * params.head_dim
        * (params.dtype == MRA_FLOAT32 ? 4 : 2);
    GuardedBuffer query(tensorBytes, kDeviceAlignment);
    GuardedBuffer key(tensorBytes, kDeviceAlignment);
    GuardedBuffer value(tensorBytes, kDeviceAlignment);
    GuardedBuffer const output(tensorBytes, kDeviceAlignment);
    for (GuardedBuffer* tensor : {&query, &key, &value})
    {
        fillRandom(*tensor, params.dtype, random);
    }
    size_t const tokens = static_cast<size_t>(params.batch) * params.seq_len;
    GuardedBuffer const maskBytes(tokens * sizeof(int32_t), kDeviceAlignment);
    auto* const mask = reinterpret_cast<int32_t*>(maskBytes.start());
    for (size_t t = 0; t < tokens; ++t)
    {
        bool const padded = t >= static_cast<size_t>(params.batch - 1) * params.seq_len + realTokens;
        mask[t] = padded ? 0 : 1; // the last sample's tokens from realTokens on
    }
    // On a page, as the emulated kernels want it (fencedWorkspace.cpp), as the plugin runner's.
    size_t const workspaceBytes = mraWorkspaceSize(&params);
    std::optional<GuardedBuffer> workspace;
    try
    {
        workspace.emplace(workspaceBytes, ::emu::pageSize());
    }
    catch (std::bad_alloc const&)
    {
        std::fprintf(stderr, "no memory for a workspace of %zu bytes\n", workspaceBytes);
        return false;
    }
    if (beforeCall)
    {
        beforeCall({{query.start(), query.size()}, {key.start(), key.size()}, {value.start(), value.size()},
            {maskBytes.start(), maskBytes.size()}, {output.start(), output.size()},
            {workspace->start(), workspace->size()}});
    }
    MraStatus const status = mraAttentionCuda(&params, query.start(), key.start(), value.start(), mask,
        output.start(), workspace->start(), workspace->size(), nullptr);
    if (status != MRA_OK)
    {
        std::fprintf(stderr, "mraAttentionCuda: %s (%s)\n", mraStatusString(status), mraLastCudaError());
        return false;
    }
    return true;
}

} // namespace checks

#endif // MRA_ATTENTION_CALL_H
