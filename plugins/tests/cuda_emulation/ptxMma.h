// The CUDA emulation's PTX instructions for tensor cores, with their per-lane fragments:
// mma.sync.m16n8k16 (emu::mmaM16N8K16, the kernels' warpMma) and ldmatrix.sync.m8n8.x4
// (emu::ldmatrixX4, the kernels' loadMatrices), called where a GPU runs the instruction.
#pragma once
#include "cudaEmulation.h"
#include "cuda_bf16.h"
#include "cuda_fp16.h"

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace emu
{

inline float toFloat(__half value)
{
    return __half2float(value);
}

inline float toFloat(__nv_bfloat16 value)
{
    return __bfloat162float(value);
}

} // namespace emu

namespace emu
{

//! mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.f32 for the calling warp: d += a b, each lane
//! holding the fragments the PTX ISA assigns it ("Matrix Fragments for mma.m16n8k16 with
//! floating point type"): with g = lane / 4 and t = lane % 4, A's register r holds row
//! g + 8 (r % 2), columns 2t + 8 (r / 2) + {0, 1}; B's register r rows 2t + 8 r + {0, 1} of
//! column g; d[e] row g + 8 (e / 2), column 2t + e % 2. The lower index is a register's low half.
//! Products are summed in float32, k in order.
template <typename T>
void mmaM16N8K16(char const* file, int line, float (&d)[4], uint32_t const (&a)[4], uint32_t const (&b)[2])
{
    static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "fp16 or bf16");
    // Every lane's registers, copied before the next collective reuses the exchange's words.
    uint32_t aOf[kWarpSize][4];
    uint32_t bOf[kWarpSize][2];
    WarpRound const aRound = warpExchange(
        file, line, ~0u, a[0] | static_cast<uint64_t>(a[1]) << 32, a[2] | static_cast<uint64_t>(a[3]) << 32);
    for (int lane = 0; lane < kWarpSize; ++lane)
    {
        for (int r = 0; r < 4; ++r)
        {
            aOf[lane][r] = static_cast<uint32_t>(aRound.words[lane][r / 2] >> (32 * (r % 2)));
        }
    }
    WarpRound const bRound = warpExchange(file, line, ~0u, b[0] | static_cast<uint64_t>(b[1]) << 32);
    for (int lane = 0; lane < kWarpSize; ++lane)
    {
        bOf[lane][0] = static_cast<uint32_t>(bRound.words[lane][0]);
        bOf[lane][1] = static_cast<uint32_t>(bRound.words[lane][0] >> 32);
    }
    auto element = [](uint32_t word, int half) {
        T value;
        uint16_t const bits = static_cast<uint16_t>(word >> (16 * half));
        std::memcpy(&value, &bits, sizeof(bits));
        return toFloat(value);
    };
    auto aAt = [&](int row, int k) { // A[row][k]
        return element(aOf[4 * (row % 8) + (k % 8) / 2][row / 8 + 2 * (k / 8)], k % 2);
    };
    auto bAt = [&](int k, int column) { // B[k][column]
        return element(bOf[4 * column + (k % 8) / 2][k / 8], k % 2);
    };
    int const lane = aRound.lane;
    for (int e = 0; e < 4; ++e)
    {
        int const row = lane / 4 + 8 * (e / 2);
        int const column = 2 * (lane % 4) + e % 2;
        float sum = d[e];
        for (int k = 0; k < 16; ++k)
        {
            sum += aAt(row, k) * bAt(k, column);
        }
        d[e] = sum;
    }
}

//! ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16 for the calling warp: lane l gives the address
//! of row l % 8 of matrix l / 8 (8 16-bit elements, 16-byte aligned), and receives in register i
//! two adjacent elements of matrix i (PTX ISA, "Warp-level matrix load instruction: ldmatrix"):
//! row l / 4, columns 2 (l % 4) + {0, 1}; with `.trans` rows 2 (l % 4) + {0, 1} of column l / 4.
//! The lower element is the register's low half.
#ifdef MRA_EMULATION_MEMORY_COUNTS
__attribute__((always_inline)) // each call its own address: the instruction memoryCounts.cpp counts
#endif
inline void ldmatrixX4(char const* file, int line, uint32_t (&r)[4], void const* rowAddress, bool transposed)
{
    if (reinterpret_cast<uintptr_t>(rowAddress) % 16 != 0)
    {
        fail("ldmatrix at %s:%d: row address %p is not 16-byte aligned", file, line, rowAddress);
    }
    WarpRound const round = warpExchange(file, line, ~0u, reinterpret_cast<uintptr_t>(rowAddress));
#ifdef MRA_EMULATION_MEMORY_COUNTS
    recordMatrixRow(rowAddress);
    EmulationWork const otherLanesRows; // the warp's one load, recorded just above
#endif
    auto element = [&](int matrix, int row, int column) {
        uint16_t bits;
        std::memcpy(&bits, reinterpret_cast<unsigned char const*>(round.words[8 * matrix + row][0]) + 2 * column,
            sizeof(bits));
        return static_cast<uint32_t>(bits);
    };
    int const lane = round.lane;
    for (int i = 0; i < 4; ++i)
    {
        r[i] = transposed
            ? element(i, 2 * (lane % 4), lane / 4) | element(i, 2 * (lane % 4) + 1, lane / 4) << 16
            : element(i, lane / 4, 2 * (lane % 4)) | element(i, lane / 4, 2 * (lane % 4) + 1) << 16;
    }
}

} // namespace emu
