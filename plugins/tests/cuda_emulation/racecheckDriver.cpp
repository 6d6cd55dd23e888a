/*
 * racecheck's stand-in without a GPU: the kernels' source under the CUDA emulation, built with
 * ThreadSanitizer (-fsanitize=thread; cudaEmulation.cpp with MRA_EMULATION_RACECHECK). Each CUDA
 * thread is a ThreadSanitizer fiber, and only what orders memory on a GPU (__syncthreads,
 * __syncwarp, cluster.sync, the end of a cluster) orders it here, so two threads' accesses to
 * the same shared or global memory, one a write, with none of those between them are reported
 * as a data race under any schedule, where the emulation alone catches one only if a schedule
 * makes it change a value. A cp.async counts as a write from its issue to its landing, and a
 * CTA's exit as a write of its dynamic shared memory (a cluster's other CTAs must be done with it).
 *
 *   mra_emulation_racecheck attention       the attention on small problems: no race expected
 *   mra_emulation_racecheck <case>          one of kCases below, on a small kernel (exit 1
 *                                           where its launch fails, as divergent-barrier's
 *                                           and static-shared-in-a-cluster's)
 *
 * ThreadSanitizer prints each race ("WARNING: ThreadSanitizer: data race", with both threads'
 * stacks through the kernels' source) and makes the process exit with 66; the driver prints
 * "ran <what>" and exits 0 otherwise. tests/test_cuda_racecheck.py runs it.
 */
#include "attentionCall.h"
#include "fencedGaps.h" // pageSize
#include "guardedBuffer.h"

#include <cooperative_groups.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

extern "C" void mraCudaEmulationSetSchedule(uint32_t schedule);
extern "C" void mraCudaEmulationSetMultiprocessors(uint32_t count);
extern "C" uint32_t mraCudaEmulationTakeLargestCluster();
extern "C" uint32_t mraCudaEmulationLastLaunchThreads();

namespace
{

// ---- small kernels with and without a race ----------------------------------------------------

enum class Between
{
    Nothing,     //!< a race
    SyncThreads, //!< ordered
    SyncWarp,    //!< ordered within a warp only
    Shuffle,     //!< a race: a shuffle exchanges registers, it orders no memory (CUDA's model)
    ClusterSync, //!< ordered, across the CTAs of a cluster
};

//! Thread t writes cell t, then, after `between`, reads the cell of thread t ^ `partner`.
__global__ void readsAnotherThreadsCell(int* out, Between between, int partner)
{
    __shared__ int cells[64];
    cells[threadIdx.x] = static_cast<int>(threadIdx.x) + 1;
    if (between == Between::SyncThreads)
    {
        __syncthreads();
    }
    else if (between == Between::SyncWarp)
    {
        __syncwarp();
    }
    else if (between == Between::Shuffle)
    {
        out[64 + threadIdx.x] = __shfl_xor_sync(~0u, static_cast<int>(threadIdx.x), 1);
    }
    out[threadIdx.x] = cells[threadIdx.x ^ static_cast<unsigned>(partner)];
}

//! Thread 0 issues a cp.async of 16 bytes into cells 0..3; every thread reads cell 1 after the
//! copy's wait and a __syncthreads (ordered) or, with `early`, after the __syncthreads that
//! precedes thread 0's wait (a race: on a GPU the copy may land after it).
__global__ void readsACopy(int const* source, int* out, int early)
{
    __shared__ __align__(16) int cells[4];
    if (threadIdx.x == 0)
    {
        ::emu::asyncCopy(__FILE__, __LINE__, cells, source, 16, 16);
        ::emu::asyncCommit();
    }
    if (early != 0)
    {
        __syncthreads();
        out[threadIdx.x] = cells[1];
    }
    if (threadIdx.x == 0)
    {
        ::emu::asyncWait(0);
    }
    __syncthreads();
    out[64 + threadIdx.x] = cells[1];
}

//! In a cluster of 2 CTAs, each writes its cells (dynamic shared memory); after `between`, CTA 1
//! reads CTA 0's through map_shared_rank. With `finalSync`, a cluster.sync keeps every CTA's
//! shared memory until all have read it; without, CTA 0 may exit, and its memory pass to the
//! SM's next CTA, while CTA 1 still reads it (a race, though the read is after CTA 0's last write).
__global__ void readsAnotherCtasCells(int* out, Between between, int finalSync)
{
    int* const cells = reinterpret_cast<int*>(::emu::dynamicSharedMemory());
    auto const cluster = cooperative_groups::this_cluster();
    cells[threadIdx.x] = static_cast<int>(blockIdx.x * 64 + threadIdx.x);
    if (between == Between::ClusterSync)
    {
        cluster.sync();
    }
    else
    {
        __syncthreads(); // orders a CTA's threads, not the cluster's
    }
    if (cluster.block_rank() == 1)
    {
        out[threadIdx.x] = *cluster.map_shared_rank(&cells[threadIdx.x], 0);
    }
    if (finalSync != 0)
    {
        cluster.sync();
    }
}

//! Each CTA of a cluster writes a static __shared__ variable, which the emulation keeps at one
//! address for all of them: racecheck's stand-in fails the launch rather than report a race.
__global__ void writesStaticSharedInACluster(int* out)
{
    __shared__ int cells[64];
    cells[threadIdx.x] = static_cast<int>(threadIdx.x);
    __syncthreads();
    out[blockIdx.x * 64 + threadIdx.x] = cells[63 - threadIdx.x];
}

//! A programmatic dependent launch, the memory it awaits set (so the emulation parks each thread
//! at its wait until every thread that has not waited is blocked or done): thread 0 stores a
//! cell before its griddepcontrol.wait, thread 1 reads it after its own, with (`barrier`) or
//! without a __syncthreads between. Without, it is a race on a GPU (the wait orders a thread
//! after the kernel before, not after its CTA's other threads) that no schedule of the
//! emulation exposes: every thread's code before its wait runs first there.
__global__ void storesBeforeItsWait(int const* awaited, int* out, int barrier)
{
    __shared__ int cell;
    if (threadIdx.x == 0)
    {
        cell = 7;
    }
    ::emu::gridDependencyWait();
    if (barrier != 0)
    {
        __syncthreads();
    }
    if (threadIdx.x == 1)
    {
        out[0] = cell + awaited[0];
    }
}

//! The last thread reaches a __syncthreads at another line than the others: the launch fails
//! (a GPU would hang) while threads wait in a barrier.
__global__ void divergesAtABarrier(int* out)
{
    if (threadIdx.x == 63)
    {
        out[0] = 1;
        __syncthreads();
    }
    else
    {
        __syncthreads();
    }
}

//! A small kernel's launch, by name (tests/test_cuda_racecheck.py says which have a race).
struct Case
{
    char const* name;
    void (*run)();
};

void launchCells(Between between, int partner)
{
    std::vector<int> out(128);
    readsAnotherThreadsCell | ::emu::Launch(1, 64, 0) | ::emu::args(out.data(), between, partner);
}

void launchCtaCells(Between between, int finalSync)
{
    std::vector<int> out(64);
    readsAnotherCtasCells | ::emu::Launch(2, 64, 64 * sizeof(int)).inClusters(2)
        | ::emu::args(out.data(), between, finalSync);
}

void launchStoreBeforeWait(int barrier)
{
    // Memory a dependent launch awaits: whole pages (emu::setAwaitedMemory).
    checks::GuardedBuffer const awaited(::emu::pageSize(), ::emu::pageSize());
    auto* const produced = reinterpret_cast<int*>(awaited.start());
    produced[0] = 35; // what "the kernel before" wrote
    std::vector<int> out(1);
    ::emu::setAwaitedMemory({{awaited.start(), awaited.size()}});
    storesBeforeItsWait | ::emu::Launch(1, 64, 0).asDependent()
        | ::emu::args(static_cast<int const*>(produced), out.data(), barrier);
    ::emu::setAwaitedMemory({});
}

void launchCopy(int early)
{
    std::vector<int> source{1, 2, 3, 4};
    std::vector<int> out(128);
    readsACopy | ::emu::Launch(1, 64, 0) | ::emu::args(static_cast<int const*>(source.data()), out.data(), early);
}

Case const kCases[] = {
    {"nothing-between", [] { launchCells(Between::Nothing, 1); }},
    {"syncthreads-between", [] { launchCells(Between::SyncThreads, 33); }},
    {"syncwarp-within-a-warp", [] { launchCells(Between::SyncWarp, 1); }},
    {"syncwarp-across-warps", [] { launchCells(Between::SyncWarp, 32); }},
    {"shuffle-between", [] { launchCells(Between::Shuffle, 1); }},
    {"copy-read-after-its-wait", [] { launchCopy(0); }},
    {"copy-read-before-its-wait", [] { launchCopy(1); }},
    {"cluster-sync-between-ctas", [] { launchCtaCells(Between::ClusterSync, 1); }},
    {"syncthreads-between-ctas", [] { launchCtaCells(Between::SyncThreads, 1); }},
    {"exit-before-another-ctas-read", [] { launchCtaCells(Between::ClusterSync, 0); }},
    {"store-before-wait-barrier-after", [] { launchStoreBeforeWait(1); }},
    {"store-before-wait-read-after-wait", [] { launchStoreBeforeWait(0); }},
    // Not races: the launches fail, and racecheck stays quiet about the threads they abandoned.
    {"divergent-barrier",
        [] {
            std::vector<int> out(1);
            divergesAtABarrier | ::emu::Launch(1, 64, 0) | ::emu::args(out.data());
        }},
    {"static-shared-in-a-cluster",
        [] {
            std::vector<int> out(128);
            writesStaticSharedInACluster | ::emu::Launch(2, 64, 0).inClusters(2) | ::emu::args(out.data());
        }},
};

// ---- the attention ------------------------------------------------------------------------------

//! The call's parameters (in MraAttentionParams' order: batch, heads, seq_len, head_dim,
//! num_blocks, block_size, approx_mode, prior first and diagonal blocks, dtype, layout), the
//! real tokens of its last sample, and the CTAs per cluster its selection is to run in once (0:
//! never). A row takes a cluster only where its cells outnumber a CTA's threads, so only the
//! long problems can: 1024 cells in clusters of 2, 16641 in clusters of 8.
struct Problem
{
    MraAttentionParams params;
    int32_t realTokens;
    uint32_t selectionCluster;
};

char const* const kDtypeNames[] = {"float32", "float16", "bfloat16"};

//! How the selection's CTAs ran in the last call: "clusters of N" or "CTAs alone".
std::string selectionCtas()
{
    uint32_t const cluster = mraCudaEmulationTakeLargestCluster();
    return cluster > 1 ? "clusters of " + std::to_string(cluster) : std::string("CTAs alone");
}

//! `problem` on `multiprocessors` emulated SMs; false (with a line on stderr) on failure.
bool runProblem(Problem const& problem, uint32_t multiprocessors, uint32_t seed)
{
    MraAttentionParams const& params = problem.params;
    mraCudaEmulationSetMultiprocessors(multiprocessors);
    mraCudaEmulationTakeLargestCluster();
    if (!checks::runAttention(params, problem.realTokens, seed))
    {
        return false;
    }
    std::printf("batch %d, %d heads, %d tokens, head_dim %d, %s, %s, on %u SMs: selection in %s, "
                "high-resolution CTAs of %u threads\n",
        params.batch, params.heads, params.seq_len, params.head_dim, kDtypeNames[params.dtype],
        params.approx_mode == MRA_FULL ? "full" : "sparse", multiprocessors, selectionCtas().c_str(),
        mraCudaEmulationLastLaunchThreads());
    return true;
}

//! The problems: every dtype and mode, head sizes 32 and 64, a ragged batch, prior blocks. Each
//! runs on up to three GPUs: on enough SMs for the selection in clusters (132, an H200's, for
//! clusters of 8; clusters of 2 on twice the rows' SMs); on one SM less than twice its rows
//! (the most that runs the selection in CTAs alone; the high-resolution kernels then split
//! their query blocks' work over two thread groups where the blocks are few); and on one
//! (where they do not). The first call is on 132: the kernels ask the GPU once how many
//! clusters it runs at once.
bool runAttentionProblems()
{
    Problem const problems[] = {
        {{1, 1, 4128, 32, 8, 32, MRA_FULL, 0, 0, MRA_FLOAT32, MRA_BHSD}, 4000, 8}, // first, on 132; 129 blocks: the terms in two chunks
        {{2, 2, 100, 64, 6, 32, MRA_SPARSE, 0, 0, MRA_FLOAT32, MRA_BHSD}, 70, 0},
        {{2, 2, 100, 64, 6, 32, MRA_FULL, 1, 1, MRA_FLOAT32, MRA_BHSD}, 70, 0},
        {{2, 2, 100, 64, 6, 32, MRA_FULL, 0, 0, MRA_FLOAT16, MRA_BHSD}, 70, 0},
        {{1, 2, 200, 64, 12, 32, MRA_SPARSE, 0, 2, MRA_FLOAT16, MRA_BHSD}, 200, 0},
        {{2, 1, 130, 32, 9, 32, MRA_SPARSE, 0, 0, MRA_BFLOAT16, MRA_BHSD}, 33, 0},
        {{1, 2, 64, 32, 4, 32, MRA_FULL, 0, 0, MRA_FLOAT32, MRA_BHSD}, 64, 0},
        {{2, 2, 1024, 64, 8, 32, MRA_FULL, 1, 0, MRA_FLOAT16, MRA_BHSD}, 700, 2}, // on one SM, tensor-core CTAs unsplit
    };
    uint32_t seed = 1;
    for (Problem const& problem : problems)
    {
        uint32_t const rows = static_cast<uint32_t>(problem.params.batch * problem.params.heads);
        std::vector<uint32_t> multiprocessors;
        if (problem.selectionCluster > 1)
        {
            multiprocessors.push_back(problem.selectionCluster == 8 ? 132 : problem.selectionCluster * rows);
        }
        multiprocessors.push_back(2 * rows - 1); // CTAs alone
        if (rows > 1)
        {
            multiprocessors.push_back(1);
        }
        for (uint32_t count : multiprocessors)
        {
            if (!runProblem(problem, count, seed++))
            {
                return false;
            }
        }
    }
    return true;
}

} // namespace

int main(int argc, char** argv)
{
    std::string const what = argc == 2 ? argv[1] : "";
    // Copies land at their wait (schedule 1): racecheck also records each at its issue.
    mraCudaEmulationSetSchedule(1);
    if (what == "attention")
    {
        if (!runAttentionProblems())
        {
            return 1;
        }
        std::printf("ran attention\n");
        return 0;
    }
    for (Case const& known : kCases)
    {
        if (what == known.name)
        {
            known.run();
            cudaError_t const error = cudaGetLastError();
            if (error != cudaSuccess)
            {
                std::fprintf(stderr, "launch failed: %s\n", cudaGetErrorString(error));
                return 1;
            }
            std::printf("ran %s\n", known.name);
            return 0;
        }
    }
    std::fprintf(stderr, "usage: mra_emulation_racecheck attention | <case>; cases:\n");
    for (Case const& known : kCases)
    {
        std::fprintf(stderr, "  %s\n", known.name);
    }
    return 2;
}
