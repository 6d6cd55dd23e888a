/*
 * One call of the kernels' entry point (mraAttentionCuda) on random inputs, as the emulation's
 * drivers make it (racecheckDriver.cpp, memoryCountsDriver.cpp): the workspace on its own pages, as
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
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <new>
#include <optional>
#include <random>
#include <utility>
#include <vector>

namespace checks
{

//! `bytes` bytes 256-byte aligned, as cudaMalloc and PyTorch's allocator give them: where a
//! buffer starts decides how many 32-byte sectors a warp's access to it takes.
class DeviceBytes
{
public:
    explicit DeviceBytes(size_t bytes)
        : mBytes(bytes)
        , mData(static_cast<unsigned char*>(std::aligned_alloc(kAlignment, roundUp(bytes))), &std::free)
    {
        if (mData == nullptr)
        {
            throw std::bad_alloc();
        }
    }
    unsigned char* data() const
    {
        return mData.get();
    }
    size_t size() const
    {
        return mBytes;
    }

private:
    static constexpr size_t kAlignment = 256;
    static size_t roundUp(size_t bytes)
    {
        return (bytes + kAlignment - 1) / kAlignment * kAlignment + kAlignment * (bytes == 0);
    }
    size_t mBytes;
    std::unique_ptr<unsigned char, decltype(&std::free)> mData;
};

//! `count` elements of `dtype` in [-2, 2), as raw bytes.
inline DeviceBytes randomTensor(size_t count, MraDataType dtype, std::mt19937& random)
{
    std::uniform_real_distribution<float> uniform(-2.0f, 2.0f);
    size_t const element = dtype == MRA_FLOAT32 ? 4 : 2;
    DeviceBytes bytes(count * element);
    for (size_t i = 0; i < count; ++i)
    {
        float const value = uniform(random);
        if (dtype == MRA_FLOAT32)
        {
            std::memcpy(bytes.data() + 4 * i, &value, 4);
        }
        else
        {
            // The emulation's own conversions (cuda_fp16.h, cuda_bf16.h stand-ins).
            uint16_t const bits = dtype == MRA_FLOAT16 ? __float2half_rn(value).bits : __float2bfloat16_rn(value).bits;
            std::memcpy(bytes.data() + 2 * i, &bits, 2);
        }
    }
    return bytes;
}

//! Memory spans (start, bytes), as runAttention hands its buffers to `beforeCall`.
using Spans = std::vector<std::pair<void const*, size_t>>;

//! One call on random inputs, the last batch's sequence cut to `realTokens`; false on failure.
//! `beforeCall`, if given, sees the call's buffers (Q, K, V, the mask, the output, the workspace).
inline bool runAttention(MraAttentionParams const& params, int32_t realTokens, uint32_t seed,
    std::function<void(Spans const&)> const& beforeCall = {})
{
    std::mt19937 random(seed);
    size_t const elements = static_cast<size_t>(params.batch) * params.heads * params.seq_len * params.head_dim;
    DeviceBytes const query = randomTensor(elements, params.dtype, random);
    DeviceBytes const key = randomTensor(elements, params.dtype, random);
    DeviceBytes const value = randomTensor(elements, params.dtype, random);
    DeviceBytes const output(query.size());
    size_t const tokens = static_cast<size_t>(params.batch) * params.seq_len;
    DeviceBytes const maskBytes(tokens * sizeof(int32_t));
    auto* const mask = reinterpret_cast<int32_t*>(maskBytes.data());
    for (size_t t = 0; t < tokens; ++t)
    {
        bool const padded = t >= static_cast<size_t>(params.batch - 1) * params.seq_len + realTokens;
        mask[t] = padded ? 0 : 1; // the last sample's tokens from realTokens on
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
    if (beforeCall)
    {
        beforeCall({{query.data(), query.size()}, {key.data(), key.size()}, {value.data(), value.size()},
            {maskBytes.data(), maskBytes.size()}, {output.data(), output.size()},
            {workspace->start(), workspace->size()}});
    }
    MraStatus const status = mraAttentionCuda(&params, query.data(), key.data(), value.data(), mask,
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
