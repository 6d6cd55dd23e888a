/*
 * The memory-counts build: the emulated kernels' shared-memory bank conflicts and global-memory sectors,
 * counted on the CPU as Nsight Compute counts them: a shared-memory instruction's wavefronts (its
 * l1tex__data_bank_conflicts_pipe_lsu_mem_shared metrics are their excess over the ideal), a
 * global one's 32-byte sectors (l1tex__t_sectors_pipe_lsu_mem_global_op_{ld,st}). Part of the
 * runtime built with MRA_EMULATION_MEMORY_COUNTS, under a program whose kernels are compiled with
 * -fsanitize=kernel-address (memoryCountsDriver.cpp): GCC then calls __asan_{load,store}N_noabort
 * before each load and store and links no sanitizer runtime; the hooks below record the accesses
 * that fall in the running CTA's shared memory or in the global memory the driver names.
 *
 * Shared memory (CUDA C++ Programming Guide, "Shared Memory" of compute capability 5.x and later):
 * 32 banks of 4-byte words, and one wavefront serves one word of each bank, to any number of
 * lanes. A warp's instruction moves at most 128 bytes a phase: all 32 lanes in one for accesses
 * of up to 4 bytes, half warps for 8-byte ones, quarter warps for 16-byte ones (ldmatrix: one 8x8
 * matrix, 8 rows of 16 bytes, a phase). A phase takes as many wavefronts as the most distinct
 * words asked of one bank; ideally one.
 *
 * Global memory (the guide's "Device Memory Accesses"): a warp's instruction takes the 32-byte
 * sectors its lanes' bytes fall in; ideally as many as those bytes fill (a broadcast, one).
 * Caches are not modelled: a sector read twice counts twice, as the L1 requests count it.
 *
 * Which accesses are one instruction of a warp: those of its lanes at the same instruction
 * address (the hook's return address), each lane's n-th run of it in the cluster. It counts the
 * code as compiled here, so the program is compiled without scalar replacement of aggregates
 * (-fno-tree-sra keeps a float4's load one 16-byte load, as nvcc emits it).
 */
#include "cudaEmulation.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace
{

constexpr int kBanks = 32;
constexpr int kBankBytes = 4;
constexpr int kPhaseBytes = 128;
constexpr uintptr_t kSectorBytes = 32;

struct Access
{
    void const* instruction;
    uint32_t run; //!< the lane's n-th run of the instruction in the cluster
    unsigned lane;
    uintptr_t address;
    int bytes;
    bool store;
};

//! One instruction's runs, warp-wide, over every launch since the last report: in shared memory
//! its wavefronts (one a phase that any lane takes part in, ideally), in global memory its sectors
//! (as many as its bytes fill, ideally).
struct InstructionCount
{
    int bytes = 0;
    bool store = false;
    uint64_t requests = 0;
    uint64_t taken = 0;
    uint64_t ideal = 0;
    uint32_t worst = 0; //!< the most wavefronts one phase took, or sectors one request
};

//! A memory space's accesses in the running cluster, and its counts.
struct Space
{
    std::vector<std::vector<Access>> warps;                       //!< by warp
    std::vector<std::unordered_map<void const*, uint32_t>> runs; //!< by fiber: runs of each instruction
    std::map<void const*, InstructionCount> instructions;
};

//! A launch's kernel, threads a CTA, dynamic shared memory and cluster size.
using LaunchShape = std::tuple<void const*, unsigned, size_t, unsigned>;
//! An occupancy query's kernel, threads a CTA and dynamic shared memory.
using OccupancyQuery = std::tuple<void const*, int, size_t>;

struct Recorder
{
    Space shared;
    Space global;
    std::vector<std::pair<uintptr_t, uintptr_t>> globalSpans; //!< [begin, end): the driver's buffers
    std::map<LaunchShape, uint64_t> launches;                   //!< how many launches of each shape
    std::map<OccupancyQuery, int> occupancy;                    //!< the occupancy queries' answers
};

Recorder& recorder()
{
    static Recorder instance;
    return instance;
}

bool isCountedGlobal(uintptr_t address, int bytes)
{
    auto const& spans = recorder().globalSpans;
    return std::any_of(spans.begin(), spans.end(),
        [&](auto const& span) { return address >= span.first && address + bytes <= span.second; });
}

unsigned lanesPerPhase(int bytes)
{
    return bytes <= kBankBytes ? emu::kWarpSize : static_cast<unsigned>(std::max(1, kPhaseBytes / bytes));
}

using Accesses = std::vector<Access>::const_iterator;

//! How many distinct `unitBytes`-sized units (4-byte words, 32-byte sectors, bytes) the accesses
//! in [first, last) touch; in `units`, each unit once, in order.
uint32_t distinctUnits(Accesses first, Accesses last, uintptr_t unitBytes, std::vector<uintptr_t>& units)
{
    units.clear();
    for (auto access = first; access != last; ++access)
    {
        for (uintptr_t unit = access->address / unitBytes; unit <= (access->address + access->bytes - 1) / unitBytes;
             ++unit)
        {
            units.push_back(unit);
        }
    }
    std::sort(units.begin(), units.end());
    units.erase(std::unique(units.begin(), units.end()), units.end());
    return static_cast<uint32_t>(units.size());
}

//! Adds the wavefronts of one warp-wide run of a shared-memory instruction, its lanes' accesses
//! (by lane) in [first, last): each phase, the most distinct words its accesses ask of one bank.
void countWavefronts(InstructionCount& count, Accesses first, Accesses last)
{
    unsigned const lanes = lanesPerPhase(first->bytes);
    std::vector<uintptr_t> words;
    for (auto phaseStart = first; phaseStart != last;)
    {
        unsigned const phase = phaseStart->lane / lanes;
        auto const phaseEnd = std::find_if(phaseStart, last, [&](Access const& a) { return a.lane / lanes != phase; });
        distinctUnits(phaseStart, phaseEnd, kBankBytes, words);
        uint32_t perBank[kBanks] = {};
        uint32_t wavefronts = 0;
        for (uintptr_t word : words)
        {
            wavefronts = std::max(wavefronts, ++perBank[word % kBanks]);
        }
        count.taken += wavefronts;
        count.ideal += 1;
        count.worst = std::max(count.worst, wavefronts);
        phaseStart = phaseEnd;
    }
}

//! Adds the sectors of one warp-wide run of a global-memory instruction: those it touches, and
//! as many as the bytes its lanes ask for (each once) fill.
void countSectors(InstructionCount& count, Accesses first, Accesses last)
{
    std::vector<uintptr_t> units;
    uint32_t const sectors = distinctUnits(first, last, kSectorBytes, units);
    uint32_t const bytes = distinctUnits(first, last, 1, units);
    count.taken += sectors;
    count.ideal += (bytes + kSectorBytes - 1) / kSectorBytes;
    count.worst = std::max(count.worst, sectors);
}

//! Counts a space's runs of the cluster by instruction, and forgets them.
void countCluster(Space& space, bool shared)
{
    for (std::vector<Access>& accesses : space.warps)
    {
        std::sort(accesses.begin(), accesses.end(), [](Access const& a, Access const& b) {
            return a.instruction != b.instruction ? a.instruction < b.instruction
                                                  : a.run != b.run ? a.run < b.run : a.lane < b.lane;
        });
        for (auto first = accesses.cbegin(); first != accesses.cend();)
        {
            auto last = std::find_if(first, accesses.cend(), [&](Access const& a) {
                return a.instruction != first->instruction || a.run != first->run;
            });
            InstructionCount& count = space.instructions[first->instruction];
            count.bytes = first->bytes;
            count.store = first->store;
            ++count.requests;
            if (shared)
            {
                countWavefronts(count, first, last);
            }
            else
            {
                countSectors(count, first, last);
            }
            first = last;
        }
        accesses.clear();
    }
    for (auto& runs : space.runs)
    {
        runs.clear();
    }
}

void record(Space& space, emu::Accessor const& who, void const* instruction, void const* address, int bytes, bool store)
{
    if (space.warps.size() <= who.warp)
    {
        space.warps.resize(who.warp + 1);
    }
    if (space.runs.size() <= who.fiber)
    {
        space.runs.resize(who.fiber + 1);
    }
    uint32_t const run = space.runs[who.fiber][instruction]++;
    space.warps[who.warp].push_back(
        Access{instruction, run, who.lane, reinterpret_cast<uintptr_t>(address), bytes, store});
}

void print(FILE* out, char const* space, std::map<void const*, InstructionCount> const& instructions)
{
    for (auto const& [instruction, count] : instructions)
    {
        // The return address less 1: within the call, the instruction's own line for addr2line.
        uintptr_t const offset = emu::codePlace(static_cast<char const*>(instruction) - 1).offset;
        std::fprintf(out, "%s %#zx %s %d %llu %llu %llu %u\n", space, static_cast<size_t>(offset),
            count.store ? "store" : "load", count.bytes, static_cast<unsigned long long>(count.requests),
            static_cast<unsigned long long>(count.taken), static_cast<unsigned long long>(count.ideal),
            count.worst);
    }
}

} // namespace

namespace emu
{

void recordAccess(void const* instruction, void const* address, int bytes, bool store)
{
    Accessor who;
    if (bytes <= 0 || !accessor(address, bytes, who))
    {
        return;
    }
    if (char const* overrun = who.shared ? nullptr : overrunAt(address, bytes))
    {
        fail("%s %d bytes at %p %s", store ? "wrote" : "read", bytes, address, overrun);
    }
    Recorder& r = recorder();
    if (who.shared)
    {
        record(r.shared, who, instruction, address, bytes, store);
    }
    else if (isCountedGlobal(reinterpret_cast<uintptr_t>(address), bytes))
    {
        record(r.global, who, instruction, address, bytes, store);
    }
}

__attribute__((noinline)) void recordMatrixRow(void const* rowAddress)
{
    recordAccess(__builtin_return_address(0), rowAddress, 16, false);
}

void memoryCountsLaunch(void const* kernel, unsigned threads, size_t sharedBytes, unsigned clusterSize)
{
    ++recorder().launches[LaunchShape{kernel, threads, sharedBytes, clusterSize}];
}

void memoryCountsOccupancy(void const* kernel, int threads, size_t sharedBytes, int blocks)
{
    recorder().occupancy[OccupancyQuery{kernel, threads, sharedBytes}] = blocks;
}

void memoryCountsClusterEnded()
{
    countCluster(recorder().shared, true);
    countCluster(recorder().global, false);
}

} // namespace emu

//! The driver's buffers, counted as global memory from now on; (nullptr, 0): none from now on.
extern "C" void mraCudaEmulationCountGlobal(void const* start, size_t bytes)
{
    auto& spans = recorder().globalSpans;
    if (start == nullptr)
    {
        spans.clear();
        return;
    }
    uintptr_t const begin = reinterpret_cast<uintptr_t>(start);
    spans.emplace_back(begin, begin + bytes);
}

//! Prints each instruction's counts since the last call, and forgets them: one line each,
//! "<shared|global> <offset> <load|store> <bytes> <requests> <wavefronts or sectors> <ideal>
//! <worst>", the offset into its executable or library (for addr2line -e that file); then each
//! launch shape's count, "launch <kernel's offset> <threads> <dynamic shared bytes> <cluster
//! size> <launches>", and each occupancy query's answer, "occupancy <kernel's offset> <threads>
//! <dynamic shared bytes> <CTAs an SM>".
extern "C" void mraCudaEmulationTakeCounts(FILE* out)
{
    print(out, "shared", recorder().shared.instructions);
    print(out, "global", recorder().global.instructions);
    recorder().shared.instructions.clear();
    recorder().global.instructions.clear();
    for (auto const& [shape, count] : recorder().launches)
    {
        auto const& [kernel, threads, sharedBytes, clusterSize] = shape;
        std::fprintf(out, "launch %#zx %u %zu %u %llu\n", static_cast<size_t>(emu::codePlace(kernel).offset), threads,
            sharedBytes, clusterSize, static_cast<unsigned long long>(count));
    }
    recorder().launches.clear();
    for (auto const& [query, blocks] : recorder().occupancy)
    {
        auto const& [kernel, threads, sharedBytes] = query;
        std::fprintf(out, "occupancy %#zx %d %zu %d\n", static_cast<size_t>(emu::codePlace(kernel).offset), threads,
            sharedBytes, blocks);
    }
    recorder().occupancy.clear();
}

// The compiler's hooks (-fsanitize=kernel-address, calls rather than inline checks): each load
// or store of the instrumented code, with its address; the caller is the instruction.
#define MRA_LOAD_AND_STORE_HOOKS(bytes)                                                                                \
    extern "C" void __asan_load##bytes##_noabort(void* address)                                                        \
    {                                                                                                                  \
        emu::recordAccess(__builtin_return_address(0), address, bytes, false);                                         \
    }                                                                                                                  \
    extern "C" void __asan_store##bytes##_noabort(void* address)                                                       \
    {                                                                                                                  \
        emu::recordAccess(__builtin_return_address(0), address, bytes, true);                                          \
    }
MRA_LOAD_AND_STORE_HOOKS(1)
MRA_LOAD_AND_STORE_HOOKS(2)
MRA_LOAD_AND_STORE_HOOKS(4)
MRA_LOAD_AND_STORE_HOOKS(8)
MRA_LOAD_AND_STORE_HOOKS(16)
#undef MRA_LOAD_AND_STORE_HOOKS

extern "C" void __asan_loadN_noabort(void* address, size_t bytes)
{
    emu::recordAccess(__builtin_return_address(0), address, static_cast<int>(bytes), false);
}

extern "C" void __asan_storeN_noabort(void* address, size_t bytes)
{
    emu::recordAccess(__builtin_return_address(0), address, static_cast<int>(bytes), true);
}

//! Called before a call that does not return (a throw, the emulation's fail); nothing to unpoison.
extern "C" void __asan_handle_no_return() {}
