/*
 * bankcheck: the emulated kernels' shared-memory bank conflicts, counted on the CPU in the
 * wavefronts Nsight Compute counts (its l1tex__data_bank_conflicts_pipe_lsu_mem_shared metrics are
 * their excess over the ideal). Part of the runtime built with MRA_EMULATION_BANKCHECK, under a
 * program whose kernels are compiled with -fsanitize=kernel-address (bankcheckDriver.cpp): GCC
 * then calls __asan_{load,store}N_noabort before each load and store and links no sanitizer
 * runtime; the hooks below record the accesses that fall in the running CTA's shared memory.
 *
 * The model (CUDA C++ Programming Guide, "Shared Memory" of compute capability 5.x and later):
 * shared memory is 32 banks of 4-byte words, and one wavefront serves one word of each bank, to
 * any number of lanes. A warp's instruction moves at most 128 bytes a phase: all 32 lanes in one
 * for accesses of up to 4 bytes, half warps for 8-byte ones, quarter warps for 16-byte ones
 * (ldmatrix: one 8x8 matrix, 8 rows of 16 bytes, a phase). A phase takes as many wavefronts as
 * the most distinct words asked of one bank; ideally one.
 *
 * Which accesses are one instruction of a warp: those of its lanes at the same instruction
 * address (the hook's return address), each lane's n-th run of it in the cluster. It counts the
 * code as compiled here, so the program is compiled without scalar replacement of aggregates
 * (-fno-tree-sra keeps a float4's load one 16-byte load, as nvcc emits it).
 */
#include "cudaEmulation.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <unordered_map>
#include <vector>

namespace
{

constexpr int kBanks = 32;
constexpr int kBankBytes = 4;
constexpr int kPhaseBytes = 128;

struct Access
{
    void const* instruction;
    uint32_t run; //!< the lane's n-th run of the instruction in the cluster
    unsigned lane;
    uintptr_t address;
    int bytes;
    bool store;
};

//! One instruction's runs, warp-wide, over every launch since the last report.
struct InstructionCount
{
    int bytes = 0;
    bool store = false;
    uint64_t requests = 0;
    uint64_t wavefronts = 0;
    uint64_t ideal = 0;      //!< one a phase that any lane takes part in
    uint32_t worstPhase = 0; //!< the most wavefronts one phase took
};

struct Recorder
{
    std::vector<std::vector<Access>> warps;                       //!< the running cluster's
    std::vector<std::unordered_map<void const*, uint32_t>> runs; //!< by fiber: runs of each instruction
    std::map<void const*, InstructionCount> instructions;
};

Recorder& recorder()
{
    static Recorder instance;
    return instance;
}

int lanesPerPhase(int bytes)
{
    return bytes <= kBankBytes ? emu::kWarpSize : std::max(1, kPhaseBytes / bytes);
}

//! Wavefronts of one phase: the most distinct words its accesses ask of one bank.
uint32_t phaseWavefronts(std::vector<uint64_t>& words)
{
    std::sort(words.begin(), words.end());
    words.erase(std::unique(words.begin(), words.end()), words.end());
    uint32_t perBank[kBanks] = {};
    uint32_t most = 0;
    for (uint64_t word : words)
    {
        most = std::max(most, ++perBank[word % kBanks]);
    }
    return most;
}

//! Adds one warp-wide run of an instruction, its lanes' accesses in [first, last).
void countRequest(std::vector<Access>::const_iterator first, std::vector<Access>::const_iterator last)
{
    InstructionCount& count = recorder().instructions[first->instruction];
    count.bytes = first->bytes;
    count.store = first->store;
    ++count.requests;
    int const lanes = lanesPerPhase(first->bytes);
    std::vector<uint64_t> words;
    for (auto phaseStart = first; phaseStart != last;)
    {
        unsigned const phase = phaseStart->lane / static_cast<unsigned>(lanes);
        auto phaseEnd = phaseStart;
        words.clear();
        for (; phaseEnd != last && phaseEnd->lane / static_cast<unsigned>(lanes) == phase; ++phaseEnd)
        {
            for (uintptr_t word = phaseEnd->address / kBankBytes;
                 word <= (phaseEnd->address + phaseEnd->bytes - 1) / kBankBytes; ++word)
            {
                words.push_back(word);
            }
        }
        uint32_t const wavefronts = phaseWavefronts(words);
        count.wavefronts += wavefronts;
        count.ideal += 1;
        count.worstPhase = std::max(count.worstPhase, wavefronts);
        phaseStart = phaseEnd;
    }
}

} // namespace

namespace emu
{

void recordSharedAccess(void const* instruction, void const* address, int bytes, bool store)
{
    SharedAccessor accessor;
    if (!sharedAccessor(address, bytes, accessor))
    {
        return;
    }
    Recorder& r = recorder();
    if (r.warps.size() <= accessor.warp)
    {
        r.warps.resize(accessor.warp + 1);
    }
    if (r.runs.size() <= accessor.fiber)
    {
        r.runs.resize(accessor.fiber + 1);
    }
    uint32_t const run = r.runs[accessor.fiber][instruction]++;
    r.warps[accessor.warp].push_back(
        Access{instruction, run, accessor.lane, reinterpret_cast<uintptr_t>(address), bytes, store});
}

__attribute__((noinline)) void recordMatrixRow(void const* rowAddress)
{
    recordSharedAccess(__builtin_return_address(0), rowAddress, 16, false);
}

void sharedBanksClusterEnded()
{
    Recorder& r = recorder();
    for (std::vector<Access>& accesses : r.warps)
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
            countRequest(first, last);
            first = last;
        }
        accesses.clear();
    }
    for (auto& runs : r.runs)
    {
        runs.clear();
    }
}

} // namespace emu

//! Prints each instruction's counts since the last call, and forgets them: one line each,
//! "shared <offset> <load|store> <bytes> <requests> <wavefronts> <ideal> <worst phase>", the
//! offset into its executable or library (for addr2line -e that file).
extern "C" void mraCudaEmulationTakeSharedBanks(FILE* out)
{
    for (auto const& [instruction, count] : recorder().instructions)
    {
        Dl_info info{};
        uintptr_t offset = reinterpret_cast<uintptr_t>(instruction) - 1; // within the call
        if (dladdr(instruction, &info) != 0)
        {
            offset -= reinterpret_cast<uintptr_t>(info.dli_fbase);
        }
        std::fprintf(out, "shared %#zx %s %d %llu %llu %llu %u\n", static_cast<size_t>(offset),
            count.store ? "store" : "load", count.bytes, static_cast<unsigned long long>(count.requests),
            static_cast<unsigned long long>(count.wavefronts), static_cast<unsigned long long>(count.ideal),
            count.worstPhase);
    }
    recorder().instructions.clear();
}

// The compiler's hooks (-fsanitize=kernel-address, calls rather than inline checks): each load
// or store of the instrumented code, with its address; the caller is the instruction.
#define MRA_SHARED_ACCESS_HOOKS(bytes)                                                                                 \
    extern "C" void __asan_load##bytes##_noabort(void* address)                                                         \
    {                                                                                                                  \
        emu::recordSharedAccess(__builtin_return_address(0), address, bytes, false);                                   \
    }                                                                                                                  \
    extern "C" void __asan_store##bytes##_noabort(void* address)                                                        \
    {                                                                                                                  \
        emu::recordSharedAccess(__builtin_return_address(0), address, bytes, true);                                    \
    }
MRA_SHARED_ACCESS_HOOKS(1)
MRA_SHARED_ACCESS_HOOKS(2)
MRA_SHARED_ACCESS_HOOKS(4)
MRA_SHARED_ACCESS_HOOKS(8)
MRA_SHARED_ACCESS_HOOKS(16)
#undef MRA_SHARED_ACCESS_HOOKS

extern "C" void __asan_loadN_noabort(void* address, size_t bytes)
{
    emu::recordSharedAccess(__builtin_return_address(0), address, static_cast<int>(bytes), false);
}

extern "C" void __asan_storeN_noabort(void* address, size_t bytes)
{
    emu::recordSharedAccess(__builtin_return_address(0), address, static_cast<int>(bytes), true);
}

//! Called before a call that does not return (a throw, the emulation's fail); nothing to unpoison.
extern "C" void __asan_handle_no_return() {}
