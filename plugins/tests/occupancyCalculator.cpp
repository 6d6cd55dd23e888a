/*
 * How many CTAs of a kernel an SM of each architecture holds, by NVIDIA's occupancy calculator
 * (cuda_occupancy.h: a header of the CUDA toolkit, plain C++, which needs no GPU and no CUDA
 * runtime), for tools/occupancy.py. The kernel's registers and static shared memory come from its
 * cubin (cuobjdump -res-usage), its threads and dynamic shared memory from its launches.
 *
 * Reads lines "<sm> <registers> <static shared bytes> <threads> <dynamic shared bytes>" (sm: 80,
 * 86, 89 or 90) and prints for each "<CTAs an SM> <by warps> <by registers> <by shared memory>
 * <by CTAs an SM> <by barriers>", each limit the most CTAs that resource alone allows (-1:
 * unlimited), or "error <what>" for a line it cannot answer.
 */
#include <cuda_occupancy.h>

#include <climits>
#include <cstdio>

namespace
{

//! What cudaGetDeviceProperties reports of one SM of each architecture (the CUDA C++ Programming
//! Guide's technical specifications): threads an SM, shared memory an SM and the most a CTA may
//! opt in to (1 KB of each CTA's is the driver's).
struct Architecture
{
    int sm;
    int threadsPerSm;
    size_t sharedPerSm;
    size_t sharedOptInPerCta;
};

constexpr size_t kKiB = 1024;
constexpr Architecture kArchitectures[] = {
    {80, 2048, 164 * kKiB, 163 * kKiB}, // A100
    {86, 1536, 100 * kKiB, 99 * kKiB},  // A10, RTX 30
    {89, 1536, 100 * kKiB, 99 * kKiB},  // L4, L40, RTX 40
    {90, 2048, 228 * kKiB, 227 * kKiB}, // H100, H200
};

Architecture const* architecture(int sm)
{
    for (Architecture const& a : kArchitectures)
    {
        if (a.sm == sm)
        {
            return &a;
        }
    }
    return nullptr;
}

cudaOccDeviceProp deviceOf(Architecture const& a)
{
    cudaOccDeviceProp p;
    p.computeMajor = a.sm / 10;
    p.computeMinor = a.sm % 10;
    p.maxThreadsPerBlock = 1024;
    p.maxThreadsPerMultiprocessor = a.threadsPerSm;
    p.regsPerBlock = 65536;
    p.regsPerMultiprocessor = 65536;
    p.warpSize = 32;
    p.sharedMemPerBlock = 48 * kKiB;
    p.sharedMemPerMultiprocessor = a.sharedPerSm;
    p.numSms = 1;
    p.sharedMemPerBlockOptin = a.sharedOptInPerCta;
    p.reservedSharedMemPerBlock = kKiB;
    return p;
}

//! The fields of cudaFuncAttributes that cudaOccFuncAttributes takes; the kernel opts in to the
//! dynamic shared memory it launches with (cudaFuncSetAttribute), as the kernels do.
struct Function
{
    int maxThreadsPerBlock;
    int numRegs;
    size_t sharedSizeBytes;
    size_t maxDynamicSharedSizeBytes;
};

int limit(int ctas)
{
    return ctas == INT_MAX ? -1 : ctas;
}

} // namespace

int main()
{
    int sm = 0;
    int registers = 0;
    int threads = 0;
    size_t staticShared = 0;
    size_t dynamicShared = 0;
    while (std::scanf("%d %d %zu %d %zu", &sm, &registers, &staticShared, &threads, &dynamicShared) == 5)
    {
        Architecture const* a = architecture(sm);
        if (a == nullptr)
        {
            std::printf("error no properties for sm_%d (the calculator knows sm_80, 86, 89 and 90)\n", sm);
            continue;
        }
        cudaOccDeviceProp const device = deviceOf(*a);
        cudaOccFuncAttributes const function(Function{1024, registers, staticShared, dynamicShared});
        cudaOccDeviceState const state;
        cudaOccResult result{};
        if (cudaOccMaxActiveBlocksPerMultiprocessor(&result, &device, &function, &state, threads, dynamicShared)
            != CUDA_OCC_SUCCESS)
        {
            std::printf("error cuda_occupancy.h refused %d threads, %d registers, %zu + %zu shared bytes on sm_%d\n",
                threads, registers, staticShared, dynamicShared, sm);
            continue;
        }
        std::printf("%d %d %d %d %d %d\n", result.activeBlocksPerMultiprocessor, limit(result.blockLimitWarps),
            limit(result.blockLimitRegs), limit(result.blockLimitSharedMem), limit(result.blockLimitBlocks),
            limit(result.blockLimitBarriers));
    }
    return 0;
}
