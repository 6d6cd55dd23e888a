// The CUDA emulation's stand-in for <cuda_bf16.h>: storage and the conversions the kernels use.
#pragma once
#include <cstdint>
#include <cstring>

struct __nv_bfloat16
{
    unsigned short bits;
};

inline float __bfloat162float(__nv_bfloat16 value)
{
    uint32_t const bits = static_cast<uint32_t>(value.bits) << 16;
    float result;
    std::memcpy(&result, &bits, sizeof(result));
    return result;
}

inline __nv_bfloat16 __float2bfloat16_rn(float value)
{
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    __nv_bfloat16 result;
    if ((bits & 0x7fffffffu) > 0x7f800000u)
    {
        result.bits = static_cast<unsigned short>((bits >> 16) | 0x40u); // NaN stays a quiet NaN
        return result;
    }
    bits += 0x7fffu + ((bits >> 16) & 1u); // round to nearest even
    result.bits = static_cast<unsigned short>(bits >> 16);
    return result;
}
