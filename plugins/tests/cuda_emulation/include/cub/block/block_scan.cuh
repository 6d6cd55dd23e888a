// The CUDA emulation's stand-in for CUB's BlockScan (ExclusiveSum with the block aggregate).
#pragma once
#include "cudaEmulation.h"

namespace cub
{

template <typename T, int BlockDimX>
class BlockScan
{
public:
    struct TempStorage
    {
        T values[BlockDimX];
        T prefix[BlockDimX];
        T total;
        unsigned long round;   //!< the barrier round prefix[] was computed for
        unsigned long lastUse; //!< the __syncthreads round that followed its last use
    };

    explicit BlockScan(TempStorage& storage)
        : mStorage(storage)
    {
        if (blockDim.x != static_cast<unsigned>(BlockDimX))
        {
            emu::fail("cub::BlockScan<T, %d> used in a block of %u threads", BlockDimX, blockDim.x);
        }
    }

    void ExclusiveSum(T input, T& output, T& aggregate)
    {
        emu::EmulationWork const standIn; // CUB's scan, not the kernel's accesses (racecheck)
        emu::checkTempStorageReuse(mStorage.lastUse, "cub::BlockScan");
        mStorage.values[threadIdx.x] = input;
        unsigned long const round = emu::syncThreads(__FILE__, __LINE__);
        mStorage.lastUse = emu::blockRound();
        if (emu::claimRound(round, mStorage.round))
        {
            T sum = T();
            for (int t = 0; t < BlockDimX; ++t)
            {
                mStorage.prefix[t] = sum;
                sum += mStorage.values[t];
            }
            mStorage.total = sum;
        }
        output = mStorage.prefix[threadIdx.x];
        aggregate = mStorage.total;
    }

private:
    TempStorage& mStorage;
};

} // namespace cub
