// The CUDA emulation's stand-in for <cuda_fp16.h>: storage and the conversions the kernels use.
#pragma once
#include <cstring>

struct __half
{
    unsigned short bits;
};

inline float __half2float(__half value)
{
    _Float16 half;
    std::memcpy(&half, &value.bits, sizeof(half));
    return static_cast<float>(half);
}

inline __half __float2half_rn(float value)
{
    _Float16 const half = static_cast<_Float16>(value); // IEEE round to nearest even
    __half result;
    std::memcpy(&result.bits, &half, sizeof(half));
    return result;
}
