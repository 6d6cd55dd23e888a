// The CUDA emulation's stand-in for CUB's BlockReduce: the aggregate in thread 0 only, as in CUB.
#pragma once
#include "cudaEmulation.h"

#include <limits>

namespace cub
{

template <typename T, int BlockDimX>
class BlockReduce
{
public:
    struct TempStorage
    {
        T values[BlockDimX];
        unsigned long lastUse; //!< the __syncthreads round that followed its last use
    };

    explicit BlockReduce(TempStorage& storage)
        : mStorage(storage)
    {
        if (blockDim.x != static_cast<unsigned>(BlockDimX))
        {
            emu::fail("cub::BlockReduce<T, %d> used in a block of %u threads", BlockDimX, blockDim.x);
        }
    }

    template <typename Op>
    T Reduce(T input, Op op)
    {
        emu::EmulationWork const standIn; // CUB's reduction, not the kernel's accesses (racecheck)
        emu::checkTempStorageReuse(mStorage.lastUse, "cub::BlockReduce");
        mStorage.values[threadIdx.x] = input;
        emu::syncThreads(__FILE__, __LINE__);
        mStorage.lastUse = emu::blockRound();
        if (threadIdx.x != 0)
        {
            return std::numeric_limits<T>::quiet_NaN(); // undefined outside thread 0 in CUB
        }
        T result = mStorage.values[0];
        for (int t = 1; t < BlockDimX; ++t)
        {
            result = op(result, mStorage.values[t]);
        }
        return result;
    }

private:
    TempStorage& mStorage;
};

} // namespace cub
