// The CUDA emulation's stand-in for <mma.h> (WMMA): any tile shape, float32 accumulation.
// Every lane holds the whole tile; the warp-wide calls check what CUDA requires of their
// arguments (the same pointer and ldm in every lane, 256-bit aligned, ldm a multiple of 16 bytes)
// and fail the launch where a GPU would be undefined.
#pragma once
#include "cudaEmulation.h"
#include "cuda_bf16.h"
#include "cuda_fp16.h"

#include <cstring>
#include <type_traits>

#define load_matrix_sync(...) loadMatrixAt(__FILE__, __LINE__, __VA_ARGS__)
#define store_matrix_sync(...) storeMatrixAt(__FILE__, __LINE__, __VA_ARGS__)
#define mma_sync(...) mmaAt(__FILE__, __LINE__, __VA_ARGS__)

namespace nvcuda
{
namespace wmma
{

struct matrix_a;
struct matrix_b;
struct accumulator;
struct row_major;
struct col_major;

enum layout_t
{
    mem_row_major,
    mem_col_major,
};

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment
{
    static constexpr int kRows = std::is_same<Use, matrix_b>::value ? K : M;
    static constexpr int kCols = std::is_same<Use, matrix_a>::value ? K : N;
    float element[kRows * kCols]; // row-major; fp16/bf16 widen to float exactly
};

namespace detail
{

inline float widen(float value)
{
    return value;
}

inline float widen(__half value)
{
    return __half2float(value);
}

inline float widen(__nv_bfloat16 value)
{
    return __bfloat162float(value);
}

//! Checks one warp-wide WMMA call's operand; returns the call's round.
inline unsigned long checkOperand(char const* file, int line, char const* what, void const* pointer, unsigned ldm,
    size_t elementBytes)
{
    emu::WarpRound const round = emu::warpExchange(file, line, ~0u, reinterpret_cast<uintptr_t>(pointer), ldm);
    for (int lane = 0; lane < emu::kWarpSize; ++lane)
    {
        if (round.words[lane][0] != round.words[0][0] || round.words[lane][1] != round.words[0][1])
        {
            emu::fail("%s at %s:%d: lanes 0 and %d pass different pointers or ldm", what, file, line, lane);
        }
    }
    if (reinterpret_cast<uintptr_t>(pointer) % 32 != 0)
    {
        emu::fail("%s at %s:%d: pointer %p is not 256-bit aligned", what, file, line, pointer);
    }
    if ((ldm * elementBytes) % 16 != 0)
    {
        emu::fail("%s at %s:%d: ldm %u is not a multiple of 16 bytes", what, file, line, ldm);
    }
    return round.round;
}

} // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout, typename Source>
void loadMatrixAt(char const* file, int line, fragment<Use, M, N, K, T, Layout>& f, Source const* pointer,
    unsigned ldm)
{
    static_assert(std::is_same<T, Source>::value, "load_matrix_sync from memory of another type");
    unsigned long const round = detail::checkOperand(file, line, "load_matrix_sync", pointer, ldm, sizeof(Source));
    using Fragment = fragment<Use, M, N, K, T, Layout>;
    static_assert(sizeof(f.element) <= sizeof(emu::WarpCache::values), "tile too large");
    emu::WarpCache& cache = emu::warpCache(); // one lane reads the tile, the others copy it
    if (emu::claimRound(round, cache.round))
    {
        for (int r = 0; r < Fragment::kRows; ++r)
        {
            for (int c = 0; c < Fragment::kCols; ++c)
            {
                size_t const offset = std::is_same<Layout, col_major>::value ? static_cast<size_t>(c) * ldm + r
                                                                              : static_cast<size_t>(r) * ldm + c;
                cache.values[r * Fragment::kCols + c] = detail::widen(pointer[offset]);
            }
        }
    }
    std::memcpy(f.element, cache.values, sizeof(f.element));
}

template <int M, int N, int K>
void storeMatrixAt(char const* file, int line, float* pointer, fragment<accumulator, M, N, K, float> const& f,
    unsigned ldm, layout_t layout)
{
    detail::checkOperand(file, line, "store_matrix_sync", pointer, ldm, sizeof(float));
    // Each lane stores its own share of the tile (on a GPU, the elements its fragment registers
    // hold; which ones is unspecified): reading other lanes' elements needs a barrier first.
    int const lane = static_cast<int>(threadIdx.x % emu::kWarpSize);
    for (int element = lane; element < M * N; element += emu::kWarpSize)
    {
        int const r = element / N;
        int const c = element % N;
        size_t const offset = layout == mem_col_major ? static_cast<size_t>(c) * ldm + r
                                                      : static_cast<size_t>(r) * ldm + c;
        pointer[offset] = f.element[element];
    }
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float value)
{
    for (float& element : f.element)
    {
        element = value;
    }
}

//! d = a * b + c; computed once per warp and round (the fragments are uniform across it).
template <int M, int N, int K, typename T, typename LayoutA, typename LayoutB>
void mmaAt(char const* file, int line, fragment<accumulator, M, N, K, float>& d,
    fragment<matrix_a, M, N, K, T, LayoutA> const& a, fragment<matrix_b, M, N, K, T, LayoutB> const& b,
    fragment<accumulator, M, N, K, float> const& c)
{
    static_assert(M * N <= static_cast<int>(sizeof(emu::WarpCache::values) / sizeof(float)), "tile too large");
    emu::WarpRound const round = emu::warpExchange(file, line, ~0u, 0);
    emu::WarpCache& cache = emu::warpCache();
    if (emu::claimRound(round.round, cache.round))
    {
        for (int r = 0; r < M; ++r)
        {
            for (int col = 0; col < N; ++col)
            {
                float sum = c.element[r * N + col];
                for (int k = 0; k < K; ++k)
                {
                    sum += a.element[r * K + k] * b.element[k * N + col];
                }
                cache.values[r * N + col] = sum;
            }
        }
    }
    std::memcpy(d.element, cache.values, sizeof(d.element));
}

} // namespace wmma
} // namespace nvcuda
