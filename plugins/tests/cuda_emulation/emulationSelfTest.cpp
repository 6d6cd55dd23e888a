/*
 * The CUDA emulation checked on small kernels with known answers: that it computes what CUDA
 * computes (shuffles, ballots, mma.sync, ldmatrix, cp.async, CUB's block collectives, barriers)
 * and that it fails where a GPU would hang or be undefined (a dependent launch touching awaited
 * memory before its wait faults); and fencedGaps.h, which fences the kernels' workspace sections.
 * Prints "N passed, M failed"; exit status 1 on a failure.
 * Launches are written `kernel | ::emu::Launch(grid, block) | ::emu::args(...)` (cudaEmulation.h),
 * dependent ones by cudaLaunchKernelEx, as the kernels launch.
 */
#include "cudaEmulation.h"
#include "expect.h"
#include "fencedGaps.h"

#include <cooperative_groups.h>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cuda_fp16.h>
#include "ptxMma.h"

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

extern "C" void mraCudaEmulationSetSchedule(uint32_t schedule);
extern "C" void mraCudaEmulationSetMultiprocessors(uint32_t count);

using checks::expect;

namespace
{

//! The launch's error and message, cleared.
std::string launchError()
{
    cudaError_t const error = cudaGetLastError();
    return error == cudaSuccess ? std::string() : std::string(cudaGetErrorString(error));
}

bool contains(std::string const& text, char const* part)
{
    return text.find(part) != std::string::npos;
}

// ---- kernels -------------------------------------------------------------------------------

__global__ void shuffleAndBallot(int* sums, unsigned* ballots, int* anys)
{
    int value = static_cast<int>(threadIdx.x);
    for (int offset = 16; offset > 0; offset /= 2)
    {
        value += __shfl_xor_sync(0xffffffffu, value, offset);
    }
    sums[threadIdx.x] = value;
    ballots[threadIdx.x] = __ballot_sync(0xffffffffu, threadIdx.x % 3 == 0);
    anys[threadIdx.x] = __any_sync(0xffffffffu, threadIdx.x == 37) ? 1 : 0; // a lane of warp 1 only
}

__global__ void sharedWithBarrier(int* out)
{
    __shared__ int cells[64];
    cells[threadIdx.x] = static_cast<int>(threadIdx.x) * 10;
    __syncthreads();
    out[threadIdx.x] = cells[(threadIdx.x + 1) % 64];
}

__global__ void sharedWithoutBarrier(int* out)
{
    __shared__ int cells[64];
    cells[threadIdx.x] = static_cast<int>(threadIdx.x) * 10;
    __syncwarp(); // a warp barrier only: thread 31 reads thread 32's cell, another warp's
    out[threadIdx.x] = cells[(threadIdx.x + 1) % 64];
}

__global__ void divergentBarrier(int* out)
{
    if (threadIdx.x < 16)
    {
        __syncthreads();
    }
    else
    {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}

__global__ void collectiveAfterExit(int* out)
{
    if (threadIdx.x == 5)
    {
        return;
    }
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
}

__global__ void earlyExitBeforeBarrier(int* out)
{
    if (threadIdx.x >= 32)
    {
        return; // exited threads do not hold up __syncthreads
    }
    __syncthreads();
    out[threadIdx.x] = 2;
}

__global__ void blockCollectives(float* maxima, int* prefixes, int* totals)
{
    using Reduce = cub::BlockReduce<float, 128>;
    using Scan = cub::BlockScan<int, 128>;
    __shared__ typename Reduce::TempStorage reduceStorage;
    __shared__ typename Scan::TempStorage scanStorage;
    float const maximum = Reduce(reduceStorage).Reduce(static_cast<float>((threadIdx.x * 37) % 128), [](float a, float b) {
        return a > b ? a : b;
    });
    if (threadIdx.x == 0)
    {
        maxima[blockIdx.x] = maximum;
    }
    int prefix;
    int total;
    Scan(scanStorage).ExclusiveSum(static_cast<int>(threadIdx.x % 4), prefix, total);
    prefixes[blockIdx.x * 128 + threadIdx.x] = prefix;
    totals[blockIdx.x * 128 + threadIdx.x] = total;
}

__global__ void scanTwiceWithoutBarrier(int* out)
{
    using Scan = cub::BlockScan<int, 64>;
    __shared__ typename Scan::TempStorage storage;
    int prefix;
    int total;
    Scan(storage).ExclusiveSum(1, prefix, total);
    Scan(storage).ExclusiveSum(2, prefix, total); // CUB needs a __syncthreads before this reuse
    out[threadIdx.x] = prefix;
}

//! D = A B + 1 through emu::mmaM16N8K16, each lane loading the registers the PTX ISA gives it
//! (A 16x16 row-major, B 16x8 with element (k, n) at b[k * 8 + n]); D row-major 16x8.
__global__ void ptxMmaProduct(__half const* a, __half const* b, float* d)
{
    auto pair = [](__half low, __half high) { return uint32_t(low.bits) | uint32_t(high.bits) << 16; };
    int const g = threadIdx.x / 4;
    int const t = threadIdx.x % 4;
    uint32_t const fa[4] = {pair(a[g * 16 + 2 * t], a[g * 16 + 2 * t + 1]),
        pair(a[(g + 8) * 16 + 2 * t], a[(g + 8) * 16 + 2 * t + 1]),
        pair(a[g * 16 + 2 * t + 8], a[g * 16 + 2 * t + 9]),
        pair(a[(g + 8) * 16 + 2 * t + 8], a[(g + 8) * 16 + 2 * t + 9])};
    uint32_t const fb[2] = {pair(b[(2 * t) * 8 + g], b[(2 * t + 1) * 8 + g]),
        pair(b[(2 * t + 8) * 8 + g], b[(2 * t + 9) * 8 + g])};
    float fd[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    ::emu::mmaM16N8K16<__half>(__FILE__, __LINE__, fd, fa, fb);
    for (int e = 0; e < 4; ++e)
    {
        d[(g + 8 * (e / 2)) * 8 + 2 * t + e % 2] = fd[e];
    }
}

//! Four 8x8 matrices of 16-bit words through emu::ldmatrixX4 from a [16][24] shared tile (rows
//! padded, as the kernels pad theirs): matrix m is rows 8 (m % 2).., columns 8 (m / 2)..; each
//! lane writes its 4 registers to out[lane * 4 + m].
__global__ void loadsMatrices(uint16_t const* source, uint32_t* out, int transposed, int misaligned)
{
    uint16_t* tile = reinterpret_cast<uint16_t*>(::emu::dynamicSharedMemory());
    for (int index = threadIdx.x; index < 16 * 24; index += blockDim.x)
    {
        tile[index] = source[index];
    }
    __syncthreads();
    int const lane = threadIdx.x;
    int const matrix = lane / 8;
    uint16_t const* row = tile + (8 * (matrix % 2) + lane % 8) * 24 + 8 * (matrix / 2) + misaligned;
    uint32_t r[4];
    ::emu::ldmatrixX4(__FILE__, __LINE__, r, row, transposed != 0);
    for (int m = 0; m < 4; ++m)
    {
        out[lane * 4 + m] = r[m];
    }
}

//! Thread t copies source's words 4t..4t+3 to shared words 4t.. (group 0) and 16 zero bytes to
//! words 128 + 4t.. (group 1), and records what it reads along the way, word 4t of a tile:
//! seen[0][t] its own group 0 before any wait; after waiting for group 0 and a barrier, seen[1][t]
//! thread t + 1's group 0 and seen[2][t] its own group 1; after the last wait, seen[3][t] thread
//! t + 1's group 1. `offset` moves the destination by that many words; `toGlobal` copies into
//! `seen` instead of shared memory.
__global__ void copiesAsynchronously(uint32_t const* source, uint32_t* seen, int offset, int toGlobal)
{
    uint32_t* const tile = reinterpret_cast<uint32_t*>(::emu::dynamicSharedMemory());
    int const t = static_cast<int>(threadIdx.x);
    int const next = (t + 1) % 32;
    uint32_t* const destination = toGlobal != 0 ? seen : tile + 4 * t + offset;
    ::emu::asyncCopy(__FILE__, __LINE__, destination, source + 4 * t, 16, 16);
    ::emu::asyncCommit();
    ::emu::asyncCopy(__FILE__, __LINE__, tile + 128 + 4 * t, source, 16, 0);
    ::emu::asyncCommit();
    seen[t] = tile[4 * t];
    ::emu::asyncWait(1);
    __syncthreads();
    seen[32 + t] = tile[4 * next];
    seen[64 + t] = tile[128 + 4 * t];
    ::emu::asyncWait(0);
    __syncthreads();
    seen[96 + t] = tile[128 + 4 * next];
}

__global__ void leavesACopyInFlight(uint32_t const* source)
{
    ::emu::asyncCopy(__FILE__, __LINE__, ::emu::dynamicSharedMemory(), source, 16, 16);
    ::emu::asyncCommit();
}

//! Thread t waits for the kernel before it unless t is `skipping`; then writes t + 1.
__global__ void waitsForPreviousKernel(int* out, int skipping)
{
    if (static_cast<int>(threadIdx.x) != skipping)
    {
        ::emu::gridDependencyWait();
    }
    out[threadIdx.x] = static_cast<int>(threadIdx.x) + 1;
}

//! Reads `produced` (what the kernel before wrote) after griddepcontrol.wait; thread
//! `earlyReader` (-1: none) reads it before too.
__global__ void readsWhatTheKernelBeforeWrote(int const* produced, int* out, int earlyReader)
{
    bool const readsEarly = static_cast<int>(threadIdx.x) == earlyReader;
    int const early = readsEarly ? *reinterpret_cast<int const volatile*>(produced) : 0;
    ::emu::gridDependencyWait();
    out[threadIdx.x] = produced[threadIdx.x] + early;
}

//! Like `readsWhatTheKernelBeforeWrote`, but the first warp waits before a __syncthreads and the
//! second after it; thread `earlyReader` (-1: none) also reads `produced` between the two.
__global__ void waitsOnEitherSideOfABarrier(int const* produced, int* out, int earlyReader)
{
    bool const firstWarp = threadIdx.x < 32;
    if (firstWarp)
    {
        ::emu::gridDependencyWait();
    }
    __syncthreads();
    bool const readsEarly = static_cast<int>(threadIdx.x) == earlyReader;
    int const early = readsEarly ? *reinterpret_cast<int const volatile*>(produced) : 0;
    if (!firstWarp)
    {
        ::emu::gridDependencyWait();
    }
    out[threadIdx.x] = produced[threadIdx.x] + early;
}

__global__ void readsDynamicShared(float* out)
{
    float* scratch = reinterpret_cast<float*>(::emu::dynamicSharedMemory());
    out[threadIdx.x] = scratch[threadIdx.x]; // never written: garbage, as on a GPU
}

__global__ void readsStaticShared(int* out)
{
    __shared__ int cell;
    out[blockIdx.x] = cell; // never written in this CTA: garbage, whatever the CTA before left
    cell = 5;
}

__global__ void writesPastDynamicShared(int)
{
    ::emu::dynamicSharedMemory()[100] = 1; // one byte past a launch's 100 bytes
}

//! Each thread loads the float4 at 4 * t; thread 5 at 4 * 5 + `offset` floats (1: not 16-byte
//! aligned, a GPU's "misaligned address").
__global__ void loadsVectors(float const* source, float* out, int offset)
{
    int const at = 4 * static_cast<int>(threadIdx.x) + (threadIdx.x == 5 ? offset : 0);
    float4 const four = *reinterpret_cast<float4 const*>(source + at);
    out[threadIdx.x] = four.x + four.w;
}

//! Thread t reads cell `index` of a local array of 4.
__global__ void readsALocalArray(int* out, int index)
{
    int cells[4] = {1, 2, 3, static_cast<int>(threadIdx.x)};
    out[threadIdx.x] = cells[index];
}

__global__ void usesMuchSharedMemory(int* out)
{
    unsigned char* scratch = ::emu::dynamicSharedMemory();
    scratch[64 * 1024 - 1] = 7;
    out[0] = scratch[64 * 1024 - 1];
}

//! Each CTA fills its cells, static and dynamic (+100000, so that a mix-up of the two shows); after
//! a cluster.sync each thread copies its cells from the next CTA of the cluster, and thread 0 writes
//! rank * 100 + CTAs. Without `finalSync` a CTA may exit while the one before still reads it.
__global__ void exchangesInCluster(int* fromStatic, int* fromDynamic, int* ranks, int finalSync)
{
    __shared__ int cells[64];
    int* const dynamicCells = reinterpret_cast<int*>(::emu::dynamicSharedMemory());
    auto const cluster = cooperative_groups::this_cluster();
    int const t = static_cast<int>(threadIdx.x);
    cells[t] = static_cast<int>(blockIdx.x) * 1000 + t;
    dynamicCells[t] = cells[t] + 100000;
    cluster.sync();
    int const next = static_cast<int>((cluster.block_rank() + 1) % cluster.num_blocks());
    fromStatic[blockIdx.x * 64 + t] = *cluster.map_shared_rank(&cells[t], next);
    fromDynamic[blockIdx.x * 64 + t] = *cluster.map_shared_rank(&dynamicCells[t], next);
    if (t == 0)
    {
        ranks[blockIdx.x] = static_cast<int>(cluster.block_rank() * 100 + cluster.num_blocks());
    }
    if (finalSync != 0)
    {
        cluster.sync(); // keeps this CTA's shared memory until the others have read it
    }
}

//! map_shared_rank misused: to a rank past the cluster, or (`global` 1) of a global address.
__global__ void mapsBadly(int* out, int global)
{
    __shared__ int cell;
    auto const cluster = cooperative_groups::this_cluster();
    int* const mapped = global != 0 ? cluster.map_shared_rank(out, 0)
                                    : cluster.map_shared_rank(&cell, static_cast<int>(cluster.num_blocks()));
    out[threadIdx.x] = *mapped;
}

__global__ void divergentClusterSync(int* out)
{
    auto const cluster = cooperative_groups::this_cluster();
    if (threadIdx.x < 16)
    {
        cluster.sync();
    }
    else
    {
        cluster.sync();
    }
    out[threadIdx.x] = 1;
}

__global__ void scanTwiceAcrossClusterSync(int* out)
{
    using Scan = cub::BlockScan<int, 64>;
    __shared__ typename Scan::TempStorage storage;
    int prefix;
    int total;
    Scan(storage).ExclusiveSum(1, prefix, total);
    cooperative_groups::this_cluster().sync(); // a barrier of every CTA's threads: enough for CUB
    Scan(storage).ExclusiveSum(2, prefix, total);
    out[blockIdx.x * 64 + threadIdx.x] = prefix;
}

// ---- checks --------------------------------------------------------------------------------

void checkShufflesAndBallots()
{
    std::vector<int> sums(64);
    std::vector<unsigned> ballots(64);
    std::vector<int> anys(64);
    shuffleAndBallot | ::emu::Launch(1, 64) | ::emu::args(sums.data(), ballots.data(), anys.data());
    expect(launchError().empty(), "shuffle kernel runs");
    bool sumsRight = true;
    bool ballotsRight = true;
    bool anysRight = true;
    for (int t = 0; t < 64; ++t)
    {
        anysRight &= anys[t] == (t >= 32 ? 1 : 0);
        int const warpBase = (t / 32) * 32;
        sumsRight &= sums[t] == 32 * warpBase + 31 * 32 / 2; // sum of the warp's lane ids
        unsigned expected = 0;
        for (int lane = 0; lane < 32; ++lane)
        {
            expected |= (warpBase + lane) % 3 == 0 ? 1u << lane : 0u;
        }
        ballotsRight &= ballots[t] == expected;
    }
    expect(sumsRight, "__shfl_xor_sync butterfly sums every lane of its own warp");
    expect(ballotsRight, "__ballot_sync sets bit l for each lane l whose predicate holds");
    expect(anysRight, "__any_sync holds in every lane of a warp where one lane's predicate does, in no other");
}

void checkBarriersAndSchedules()
{
    std::vector<int> out(64);
    bool barrierHolds = true;
    for (uint32_t schedule : {0u, 1u, 7u})
    {
        mraCudaEmulationSetSchedule(schedule);
        sharedWithBarrier | ::emu::Launch(1, 64) | ::emu::args(out.data());
        for (int t = 0; t < 64; ++t)
        {
            barrierHolds &= out[t] == ((t + 1) % 64) * 10;
        }
    }
    expect(barrierHolds, "with __syncthreads every schedule reads the neighbour's value");

    std::vector<int> forward(64);
    std::vector<int> reverse(64);
    mraCudaEmulationSetSchedule(0);
    sharedWithoutBarrier | ::emu::Launch(1, 64) | ::emu::args(forward.data());
    mraCudaEmulationSetSchedule(1);
    sharedWithoutBarrier | ::emu::Launch(1, 64) | ::emu::args(reverse.data());
    mraCudaEmulationSetSchedule(0);
    expect(forward[31] == -1 && reverse[31] == 320,
        "a read of another warp's write without __syncthreads sees garbage when warp 0 runs first");
    expect(forward[0] == 10 && reverse[0] == 10, "reads within a warp after __syncwarp agree");

    divergentBarrier | ::emu::Launch(1, 32) | ::emu::args(out.data());
    std::string error = launchError();
    expect(contains(error, "divergent") && contains(error, "__syncthreads"),
        "__syncthreads at two lines fails the launch as divergent");

    collectiveAfterExit | ::emu::Launch(1, 32) | ::emu::args(out.data());
    expect(contains(launchError(), "after lanes of the warp exited"), "a full-mask shuffle after a lane exited fails");

    std::fill(out.begin(), out.end(), 0);
    earlyExitBeforeBarrier | ::emu::Launch(1, 64) | ::emu::args(out.data());
    expect(launchError().empty() && out[0] == 2 && out[31] == 2 && out[32] == 0,
        "threads that exited do not hold up __syncthreads");
}

void checkBlockCollectives()
{
    std::vector<float> maxima(2);
    std::vector<int> prefixes(256);
    std::vector<int> totals(256);
    blockCollectives | ::emu::Launch(2, 128) | ::emu::args(maxima.data(), prefixes.data(), totals.data());
    expect(launchError().empty(), "CUB block collectives run");
    bool right = maxima[0] == 127.0f && maxima[1] == 127.0f;
    for (int b = 0; b < 2; ++b)
    {
        int sum = 0;
        for (int t = 0; t < 128; ++t)
        {
            right &= prefixes[b * 128 + t] == sum && totals[b * 128 + t] == 192;
            sum += t % 4;
        }
    }
    expect(right, "BlockReduce's maximum (thread 0) and BlockScan's exclusive sums and total");

    scanTwiceWithoutBarrier | ::emu::Launch(1, 64) | ::emu::args(prefixes.data());
    expect(contains(launchError(), "TempStorage reused without a __syncthreads"),
        "a CUB TempStorage reused without a barrier in between fails");

    blockCollectives | ::emu::Launch(1, 64) | ::emu::args(maxima.data(), prefixes.data(), totals.data());
    expect(contains(launchError(), "BlockReduce<T, 128> used in a block of 64 threads"),
        "a CUB collective in a block of another size fails");
}

void checkMma()
{
    std::mt19937 random(5);
    std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
    __half a[16 * 16];
    __half b[16 * 8];
    float c[16 * 8];
    for (__half& x : a)
    {
        x = __float2half_rn(uniform(random));
    }
    for (__half& x : b)
    {
        x = __float2half_rn(uniform(random));
    }
    ptxMmaProduct | ::emu::Launch(1, 32) | ::emu::args(a, b, c);
    expect(launchError().empty(), "mma.sync kernel runs");
    double worst = 0.0;
    for (int r = 0; r < 16; ++r)
    {
        for (int n = 0; n < 8; ++n)
        {
            double expected = 1.0;
            for (int k = 0; k < 16; ++k)
            {
                expected += static_cast<double>(__half2float(a[r * 16 + k])) * __half2float(b[k * 8 + n]);
            }
            worst = std::max(worst, std::abs(expected - c[r * 8 + n]));
        }
    }
    expect(worst < 1e-5, "mmaM16N8K16 gives A * B + C from the PTX ISA's m16n8k16 fragments");
}

void checkLdmatrix()
{
    std::vector<uint16_t> tile(16 * 24);
    for (size_t index = 0; index < tile.size(); ++index)
    {
        tile[index] = static_cast<uint16_t>(index); // element (row, column) holds row * 24 + column
    }
    auto at = [](int matrix, int row, int column) {
        return static_cast<uint32_t>((8 * (matrix % 2) + row) * 24 + 8 * (matrix / 2) + column);
    };
    for (int transposed = 0; transposed < 2; ++transposed)
    {
        std::vector<uint32_t> out(32 * 4);
        loadsMatrices | ::emu::Launch(1, 32, tile.size() * 2) | ::emu::args(tile.data(), out.data(), transposed, 0);
        expect(launchError().empty(), "ldmatrix kernel runs");
        bool asTheIsaSays = true;
        for (int lane = 0; lane < 32; ++lane)
        {
            int const g = lane / 4;
            int const t = lane % 4;
            for (int m = 0; m < 4; ++m)
            {
                uint32_t const expected = transposed != 0 ? at(m, 2 * t, g) | at(m, 2 * t + 1, g) << 16
                                                          : at(m, g, 2 * t) | at(m, g, 2 * t + 1) << 16;
                asTheIsaSays = asTheIsaSays && out[lane * 4 + m] == expected;
            }
        }
        expect(asTheIsaSays,
            transposed != 0 ? "ldmatrix .trans gives lane 4g + t rows 2t, 2t + 1 of column g of each matrix"
                            : "ldmatrix gives lane 4g + t row g, columns 2t, 2t + 1 of each matrix");
    }
    std::vector<uint32_t> out(32 * 4);
    loadsMatrices | ::emu::Launch(1, 32, tile.size() * 2) | ::emu::args(tile.data(), out.data(), 0, 1);
    expect(contains(launchError(), "is not 16-byte aligned"), "ldmatrix from a misaligned row fails");
}

void checkAsyncCopies()
{
    std::vector<uint32_t> source(128);
    for (size_t word = 0; word < source.size(); ++word)
    {
        source[word] = static_cast<uint32_t>(1000 + word);
    }
    size_t const sharedBytes = 256 * sizeof(uint32_t);
    auto run = [&](uint32_t schedule, int offset, int toGlobal) {
        mraCudaEmulationSetSchedule(schedule);
        std::vector<uint32_t> seen(128, 7);
        copiesAsynchronously | ::emu::Launch(1, 32, sharedBytes) | ::emu::args(source.data(), seen.data(), offset,
            toGlobal);
        return seen;
    };
    auto all = [](std::vector<uint32_t> const& seen, int part, auto expected) {
        bool same = true;
        for (int t = 0; t < 32; ++t)
        {
            same = same && seen[32 * part + t] == expected(t);
        }
        return same;
    };
    auto copied = [](int t) { return static_cast<uint32_t>(1000 + 4 * t); };
    auto nextCopied = [](int t) { return static_cast<uint32_t>(1000 + 4 * ((t + 1) % 32)); };
    auto zero = [](int) { return 0u; };
    auto garbage = [](int) { return 0xffffffffu; };

    std::vector<uint32_t> seen = run(1, 0, 0);
    expect(launchError().empty(), "cp.async kernel runs");
    expect(all(seen, 0, garbage) && all(seen, 2, garbage),
        "under schedule 1 a copy lands at its wait: read before it, shared memory is as it was");
    expect(all(seen, 1, nextCopied) && all(seen, 3, zero),
        "after wait_group and a barrier another thread's copy is there, with no source bytes as zeros");
    seen = run(0, 0, 0);
    expect(launchError().empty() && all(seen, 0, copied) && all(seen, 2, zero) && all(seen, 3, zero),
        "under schedule 0 a copy lands when issued");
    seen = run(12345, 0, 0);
    expect(launchError().empty() && all(seen, 1, nextCopied) && all(seen, 3, zero),
        "under a random schedule every copy has landed after its wait");
    run(0, 1, 0);
    expect(contains(launchError(), "is not 16-byte aligned"), "cp.async to a misaligned address fails");
    run(0, 0, 1);
    expect(contains(launchError(), "is not in the CTA's shared memory"), "cp.async to global memory fails");
    leavesACopyInFlight | ::emu::Launch(1, 1, sharedBytes) | ::emu::args(source.data());
    expect(contains(launchError(), "exited with 1 cp.async copies not waited for"),
        "a thread that exits without waiting for its copies fails, under schedule 0 too");
    mraCudaEmulationSetSchedule(0);
}

//! `kernel` in 2 CTAs of 64 threads by cudaLaunchKernelEx, as a programmatic dependent or not.
template <typename... Params, typename... Args>
cudaError_t launchInTwoCtas(bool dependent, void (*kernel)(Params...), Args... arguments)
{
    cudaLaunchAttribute attribute{};
    attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config{dim3(2), dim3(64), 0, nullptr, &attribute, dependent ? 1u : 0u};
    return cudaLaunchKernelEx(&config, kernel, arguments...);
}

//! `waitsForPreviousKernel` launched by cudaLaunchKernelEx, as a programmatic dependent or not.
std::string launchWaiting(bool dependent, int skipping, std::vector<int>& out)
{
    expect(launchInTwoCtas(dependent, waitsForPreviousKernel, out.data(), skipping) == cudaSuccess,
        "cudaLaunchKernelEx leaves failures to cudaGetLastError");
    return launchError();
}

//! `kernel` (by default `readsWhatTheKernelBeforeWrote`) in 2 CTAs of 64 threads.
void launchReading(int const* produced, std::vector<int>& out, bool dependent, int earlyReader,
    void (*kernel)(int const*, int*, int) = readsWhatTheKernelBeforeWrote)
{
    launchInTwoCtas(dependent, kernel, produced, out.data(), earlyReader);
}

//! Whether `action` kills a forked child by `signal`; what the child wrote on stderr in `errors`.
bool faultsInAChild(std::function<void()> const& action, std::string* errors = nullptr, int signal = SIGSEGV)
{
    std::fflush(stdout);
    std::fflush(stderr);
    int pipeEnds[2];
    if (pipe(pipeEnds) != 0)
    {
        return false;
    }
    pid_t const child = fork();
    if (child == 0)
    {
        dup2(pipeEnds[1], STDERR_FILENO);
        action();
        _exit(0);
    }
    close(pipeEnds[1]);
    std::string written;
    char chunk[256];
    for (ssize_t got; (got = read(pipeEnds[0], chunk, sizeof(chunk))) > 0;)
    {
        written.append(chunk, static_cast<size_t>(got));
    }
    close(pipeEnds[0]);
    if (errors != nullptr)
    {
        *errors = written;
    }
    int status = 0;
    return child > 0 && waitpid(child, &status, 0) == child && WIFSIGNALED(status) && WTERMSIG(status) == signal;
}

//! Whether that launch kills a forked child by SIGSEGV (its stderr in `errors`).
bool readingFaults(int const* produced, bool dependent, int earlyReader, std::string* errors = nullptr,
    void (*kernel)(int const*, int*, int) = readsWhatTheKernelBeforeWrote)
{
    return faultsInAChild(
        [=] {
            std::vector<int> out(64);
            launchReading(produced, out, dependent, earlyReader, kernel);
        },
        errors);
}

//! Threads of a CTA waiting on either side of a __syncthreads: each may read the awaited memory
//! from its own wait on, under every schedule, and none before.
void checkWaitsAcrossABarrier(int const* produced)
{
    for (uint32_t schedule : {0u, 1u, 77u})
    {
        mraCudaEmulationSetSchedule(schedule);
        std::vector<int> out(64);
        launchReading(produced, out, true, -1, waitsOnEitherSideOfABarrier);
        expect(launchError().empty() && std::all_of(out.begin(), out.end(), [](int v) { return v == 42; }),
            "waits on either side of a barrier: every thread reads after its own wait, whatever the schedule");
    }
    mraCudaEmulationSetSchedule(0);
    std::vector<int> out(64);
    launchReading(produced, out, true, 5, waitsOnEitherSideOfABarrier);
    expect(launchError().empty() && out[5] == 84,
        "a thread of the first warp, which waited before the barrier, reads between it and the second warp's wait");
    std::string errors;
    expect(readingFaults(produced, true, 40, &errors, waitsOnEitherSideOfABarrier)
            && contains(errors, "thread 40 of block 0 touched"),
        "a thread of the second warp reading after the barrier but before its own wait faults");
}

void checkAwaitedMemory()
{
    size_t const page = ::emu::pageSize();
    void* const mapped = mmap(nullptr, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    auto* const produced = static_cast<int*>(mapped);
    std::fill(produced, produced + 64, 42);
    ::emu::setAwaitedMemory({{mapped, page}});
    std::vector<int> out(64);
    launchReading(produced, out, true, -1);
    expect(launchError().empty() && out[0] == 42 && out[63] == 42,
        "a dependent launch reads the awaited memory after its wait");
    std::string errors;
    expect(readingFaults(produced, true, 0, &errors),
        "a dependent launch reading the awaited memory before its wait faults");
    expect(contains(errors, "CUDA emulation: thread 0 of block 0 touched 0x")
            && contains(errors, " outside the memory the emulation has names for"),
        "the fault is reported: the thread, its block, the address");
    ::emu::setFaultNames({{mapped, page, "in what the kernel before wrote"}});
    expect(readingFaults(produced, true, 0, &errors) && contains(errors, " in what the kernel before wrote\n"),
        "a fault in named memory is reported with its name");
    ::emu::setFaultNames({});
    // Each thread is checked up to its own wait, not only the one that runs first: under
    // schedule 0 threads 0 to 62 have waited when thread 63 reads.
    expect(readingFaults(produced, true, 63, &errors) && contains(errors, "thread 63 of block 0 touched"),
        "a thread reading before its wait faults after the others of its CTA have waited");
    mraCudaEmulationSetSchedule(1);
    expect(readingFaults(produced, true, 0, &errors) && contains(errors, "thread 0 of block 1 touched"),
        "under schedule 1 too, the lowest thread, the last to run, in the last CTA");
    mraCudaEmulationSetSchedule(0);
    checkWaitsAcrossABarrier(produced);
    expect(!readingFaults(produced, false, 0), "an ordinary launch reads it at any time");
    produced[0] = 7;
    expect(produced[0] == 7, "the awaited memory is accessible between launches");
    ::emu::setAwaitedMemory({});
    expect(!readingFaults(produced, true, 0), "with no memory awaited, nothing faults");
    bool refused = false;
    try
    {
        ::emu::setAwaitedMemory({{produced + 1, page}});
    }
    catch (std::invalid_argument const&)
    {
        refused = true;
    }
    expect(refused, "awaited memory that is not whole pages is refused");
    munmap(mapped, page);
}

void checkDependentLaunches()
{
    std::vector<int> out(64);
    expect(launchWaiting(true, -1, out).empty() && out[0] == 1 && out[63] == 64,
        "a dependent launch whose threads all wait for the kernel before runs");
    expect(contains(launchWaiting(true, 5, out), "thread 5 of a programmatic dependent launch exited without "
                                                 "griddepcontrol.wait"),
        "a thread of a dependent launch that exits without waiting fails it");
    expect(launchWaiting(false, 5, out).empty(), "an ordinary launch needs no wait");
    cudaFuncAttributes attributes{};
    expect(cudaFuncGetAttributes(&attributes, waitsForPreviousKernel) == cudaSuccess && attributes.ptxVersion == 90,
        "the emulated kernels stand for an sm_90 build, which may be launched as dependents");
}

//! `kernel` launched by cudaLaunchKernelEx in clusters of `clusterSize` CTAs of 64 threads; its
//! error is left for cudaGetLastError.
template <typename... Params, typename... Args>
void launchClusters(void (*kernel)(Params...), unsigned ctas, unsigned clusterSize, size_t sharedBytes,
    Args... arguments)
{
    cudaLaunchAttribute attribute{};
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = clusterSize;
    attribute.val.clusterDim.y = 1;
    attribute.val.clusterDim.z = 1;
    cudaLaunchConfig_t config{dim3(ctas), dim3(64), sharedBytes, nullptr, &attribute, 1};
    cudaLaunchKernelEx(&config, kernel, arguments...);
}

void checkClusters()
{
    int const ctas = 12; // 3 clusters of 4
    size_t const sharedBytes = 64 * sizeof(int);
    // Room for 16 CTAs: a launch that should be refused must not write past them if it runs.
    std::vector<int> fromStatic(16 * 64);
    std::vector<int> fromDynamic(16 * 64);
    std::vector<int> ranks(16);
    for (uint32_t schedule : {0u, 1u, 12345u})
    {
        mraCudaEmulationSetSchedule(schedule);
        std::fill(fromStatic.begin(), fromStatic.end(), 0);
        std::fill(fromDynamic.begin(), fromDynamic.end(), 0);
        std::fill(ranks.begin(), ranks.end(), 0);
        launchClusters(exchangesInCluster, ctas, 4, sharedBytes, fromStatic.data(), fromDynamic.data(), ranks.data(),
            1);
        expect(launchError().empty(), "a cluster launch runs");
        bool exchanged = true;
        bool ranked = true;
        for (int b = 0; b < ctas; ++b)
        {
            int const next = b / 4 * 4 + (b + 1) % 4; // the next CTA of b's cluster
            for (int t = 0; t < 64; ++t)
            {
                exchanged &= fromStatic[b * 64 + t] == next * 1000 + t
                    && fromDynamic[b * 64 + t] == next * 1000 + t + 100000;
            }
            ranked &= ranks[b] == (b % 4) * 100 + 4;
        }
        expect(exchanged, "map_shared_rank reads the next CTA's own static and dynamic shared memory");
        expect(ranked, "block_rank is blockIdx.x % 4 and num_blocks 4 in clusters of 4");
    }

    mraCudaEmulationSetSchedule(0);
    launchClusters(exchangesInCluster, ctas, 4, sharedBytes, fromStatic.data(), fromDynamic.data(), ranks.data(), 0);
    std::string const exited = launchError();
    expect(contains(exited, "block 3: map_shared_rank at") && contains(exited, "CTA 0 of the cluster has exited"),
        "reading a CTA's shared memory after it exited (no cluster.sync before exiting) fails the launch");

    launchClusters(mapsBadly, 4, 4, 0, fromStatic.data(), 0);
    expect(contains(launchError(), "rank 4 of a cluster of 4 CTAs"), "map_shared_rank past the cluster fails");
    launchClusters(mapsBadly, 4, 4, 0, fromStatic.data(), 1);
    expect(contains(launchError(), "is not the CTA's shared memory"), "map_shared_rank of a global address fails");

    launchClusters(divergentClusterSync, 4, 2, 0, fromStatic.data());
    std::string const divergent = launchError();
    expect(contains(divergent, "divergent") && contains(divergent, "cluster.sync"),
        "cluster.sync at two lines fails the launch as divergent");

    launchClusters(exchangesInCluster, 10, 4, sharedBytes, fromStatic.data(), fromDynamic.data(), ranks.data(), 1);
    expect(cudaGetLastError() == cudaErrorInvalidClusterSize, "a grid of part of a cluster is refused");
    launchClusters(exchangesInCluster, 16, 16, sharedBytes, fromStatic.data(), fromDynamic.data(), ranks.data(), 1);
    expect(cudaGetLastError() == cudaErrorInvalidClusterSize, "a cluster past CUDA's portable 8 CTAs is refused");

    std::vector<int> prefixes(2 * 64);
    launchClusters(scanTwiceAcrossClusterSync, 2, 2, 0, prefixes.data());
    expect(launchError().empty() && prefixes[0] == 0 && prefixes[63] == 126 && prefixes[64 + 63] == 126,
        "a cluster.sync counts as the __syncthreads CUB needs between uses of a TempStorage");

    int count = 0;
    expect(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, 0) == cudaSuccess && count == 132,
        "the emulated GPU has an H100's 132 multiprocessors at first");
    mraCudaEmulationSetMultiprocessors(16);
    expect(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, 0) == cudaSuccess && count == 16,
        "mraCudaEmulationSetMultiprocessors sets the multiprocessors reported");
    mraCudaEmulationSetMultiprocessors(132);
}

void checkMemoryAndLimits()
{
    std::vector<float> out(32);
    readsDynamicShared | ::emu::Launch(1, 32, 32 * sizeof(float)) | ::emu::args(out.data());
    expect(launchError().empty() && std::isnan(out[0]) && std::isnan(out[31]),
        "dynamic shared memory starts as garbage (NaN as float)");

    writesPastDynamicShared | ::emu::Launch(1, 1, 100) | ::emu::args(0);
    expect(contains(launchError(), "wrote past its 100 bytes of dynamic shared memory"),
        "a write past the dynamic shared memory fails the launch");

    std::vector<int> cells(2);
    readsStaticShared | ::emu::Launch(2, 1) | ::emu::args(cells.data());
    expect(launchError().empty() && cells[0] == -1 && cells[1] == -1,
        "static __shared__ variables start as garbage in every CTA");

    std::vector<int> flag(1);
    usesMuchSharedMemory | ::emu::Launch(1, 32, 64 * 1024) | ::emu::args(flag.data());
    expect(launchError() == "invalid argument", "64 KB of dynamic shared memory without the opt-in is refused");
    expect(cudaFuncSetAttribute(usesMuchSharedMemory, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024)
            == cudaErrorInvalidValue,
        "an opt-in past sm_86/89's 99 KB is refused");
    expect(cudaFuncSetAttribute(usesMuchSharedMemory, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024)
            == cudaSuccess,
        "the opt-in to 64 KB is accepted");
    usesMuchSharedMemory | ::emu::Launch(1, 32, 64 * 1024) | ::emu::args(flag.data());
    expect(launchError().empty() && flag[0] == 7, "after the opt-in the launch runs");

    readsDynamicShared | ::emu::Launch(1, 2048) | ::emu::args(out.data());
    expect(launchError() == "invalid configuration argument", "more than 1024 threads per block are refused");

    int blocks = 0;
    expect(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, usesMuchSharedMemory, 64, 32256) == cudaSuccess
            && blocks == 7,
        "an SM holds 7 CTAs of 31.5 KB (228 KB, 1 KB more a CTA)");
    expect(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, usesMuchSharedMemory, 64, 32268) == cudaSuccess
            && blocks == 6,
        "12 bytes more round up to 33408 bytes a CTA (128-byte steps, as cuda_occupancy.h): 6 an SM");
    expect(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, usesMuchSharedMemory, 1024, 0) == cudaSuccess
            && blocks == 2,
        "an SM holds 2 CTAs of 1024 threads (2048 threads)");
    expect(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, usesMuchSharedMemory, 32, 0) == cudaSuccess
            && blocks == 32,
        "an SM holds at most 32 CTAs");
    expect(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, usesMuchSharedMemory, 0, 0) == cudaErrorInvalidValue,
        "the occupancy of CTAs of no threads is refused");
}

//! A float4 load off its 16-byte alignment, or a read past a local array, kills the process,
//! naming the thread (the kernels' source, and this test, are built with the traps of
//! -fsanitize=alignment,bounds where the compiler has them).
void checkTrappedAccesses()
{
#ifdef MRA_ACCESS_TRAPS
    alignas(16) static float source[4 * 32 + 4] = {};
    std::vector<float> out(32);
    loadsVectors | ::emu::Launch(1, 32) | ::emu::args(static_cast<float const*>(source), out.data(), 0);
    expect(launchError().empty(), "16-byte aligned float4 loads run");
    std::string errors;
    expect(faultsInAChild([&] {
        loadsVectors | ::emu::Launch(1, 32) | ::emu::args(static_cast<float const*>(source), out.data(), 1);
    }, &errors, SIGILL) && contains(errors, "thread 5 of block 0 made a misaligned access or indexed past an array"),
        "a float4 load off its alignment kills the process, naming the thread");
    std::vector<int> cells(32);
    readsALocalArray | ::emu::Launch(1, 32) | ::emu::args(cells.data(), 3);
    expect(launchError().empty() && cells[31] == 31, "a read within a local array runs");
    expect(faultsInAChild([&] { readsALocalArray | ::emu::Launch(1, 32) | ::emu::args(cells.data(), 4); }, &errors,
               SIGILL)
            && contains(errors, "thread 0 of block 0 made a misaligned access or indexed past an array"),
        "a read past a local array kills the process, naming the thread");
#else
    std::printf("skipped: trapped accesses (the compiler has no -fsanitize=alignment,bounds trap)\n");
#endif
}

//! Whether touching `address` (a read, or a write where `write`) kills a forked child by SIGSEGV.
bool touchFaults(unsigned char* address, bool write)
{
    return faultsInAChild([=] {
        auto* const byte = reinterpret_cast<unsigned char volatile*>(address);
        if (write)
        {
            *byte = 1;
        }
        else
        {
            static_cast<void>(*byte);
        }
    });
}

void checkFencedGaps()
{
    size_t const page = ::emu::pageSize();
    size_t const size = 6 * page;
    void* const mapped = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    auto* const buffer = static_cast<unsigned char*>(mapped);
    // a: the last 512 bytes before page 2, which is whole in the gap after it; b: from page 3
    // to 16 bytes into page 4 (the rest of page 4, then page 5, after it). Page 0 is whole too.
    std::vector<::emu::Section> const sections{{"a", 2 * page - 512, 2 * page}, {"b", 3 * page, 4 * page + 16}};
    {
        ::emu::FencedGaps const gaps(buffer, size, sections);
        size_t unmapped = 0;
        gaps.forEachUnmapped(
            [&unmapped](std::string const&, unsigned char const*, size_t bytes) { unmapped += bytes; });
        expect(unmapped == 3 * page, "the whole pages between and after the sections are fenced: 0, 2 and 5");
        expect(gaps.intrudedGap().empty(), "the canaries hold after fencing");
        expect(touchFaults(buffer + 2 * page, false), "a read one byte past a section that ends on a page faults");
        expect(touchFaults(buffer + 3 * page - 1, true),
            "a write one byte before a section that starts on a page faults");
        expect(!touchFaults(buffer + 2 * page - 1, true) && !touchFaults(buffer + 3 * page, false),
            "the sections' first and last bytes are free");
        buffer[2 * page - 1] = 7;
        buffer[3 * page] = 7;
        expect(gaps.intrudedGap().empty(), "writes inside the sections leave the canaries");
        buffer[4 * page + 16] = 7;
        expect(gaps.intrudedGap() == "after b", "a write into a gap's partial page names the gap");
        buffer[2 * page - 513] = 7;
        expect(gaps.intrudedGap() == "before a", "the first gap written is named");
    }
    buffer[0] = 1;
    buffer[2 * page] = 1;
    buffer[5 * page + 1] = 1;
    expect(buffer[0] == 1 && buffer[2 * page] == 1 && buffer[5 * page + 1] == 1,
        "the pages are readable and writable again after");
    std::vector<::emu::Section> const outside{{"c", page, 2 * page}};
    bool refused = false;
    try
    {
        ::emu::FencedGaps const gaps(buffer + page / 2, size, outside); // not on a page: mprotect fails
    }
    catch (std::runtime_error const& error)
    {
        refused = contains(error.what(), "mprotect of the gap before c");
    }
    expect(refused, "a buffer whose pages cannot be fenced is refused, naming the gap");
    munmap(mapped, size);
}

} // namespace

int main()
{
    checkShufflesAndBallots();
    checkBarriersAndSchedules();
    checkBlockCollectives();
    checkMma();
    checkLdmatrix();
    checkAsyncCopies();
    checkDependentLaunches();
    checkAwaitedMemory();
    checkClusters();
    checkMemoryAndLimits();
    checkTrappedAccesses();
    checkFencedGaps();
    return checks::report();
}
