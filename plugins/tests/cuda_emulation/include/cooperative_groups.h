// The CUDA emulation's stand-in for <cooperative_groups.h>: the thread-block cluster of the
// running CTA (see ../cudaEmulation.h), as much of cluster_group as the kernels use.
#pragma once
#include "cudaEmulation.h"

namespace cooperative_groups
{

class cluster_group
{
public:
    //! Waits for every thread of the cluster that has not exited; orders shared memory, the
    //! other CTAs' included, as a __syncthreads does within a CTA.
    static void sync(char const* file = __builtin_FILE(), int line = __builtin_LINE())
    {
        ::emu::syncCluster(file, line);
    }

    static unsigned int block_rank()
    {
        return ::emu::clusterRank();
    }

    static unsigned int num_blocks()
    {
        return ::emu::clusterSize();
    }

    //! `addr`, in this CTA's shared memory, in CTA `rank`'s (distributed shared memory).
    template <typename T>
    static T* map_shared_rank(T* addr, int rank, char const* file = __builtin_FILE(), int line = __builtin_LINE())
    {
        return static_cast<T*>(::emu::mapSharedRank(file, line, addr, rank));
    }
};

inline cluster_group this_cluster()
{
    return cluster_group();
}

} // namespace cooperative_groups
