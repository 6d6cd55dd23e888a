/*
 * Just enough of CUDA, on the CPU, to run plugins/mra_attention/mraAttentionKernels.cu as written:
 * CI has no GPU, and this lets it run the kernels' own indexing, tiling, barriers, warp shuffles,
 * tensor-core fragments (mma.sync and ldmatrix, ptxMma.h), radix select and epilogue against the PyTorch
 * reference.
 *
 * How it runs a launch: one CTA at a time, or one thread-block cluster at a time where the launch
 * asks for clusters (cudaLaunchAttributeClusterDimension; cooperative_groups.h here has
 * this_cluster() with sync and map_shared_rank); each CUDA thread is a fiber on one OS thread,
 * switched only at __syncthreads, cluster.sync, warp collectives (shuffles, ballots and votes,
 * mma.sync, ldmatrix, __syncwarp) and CUB's block collectives. Which runnable fiber goes next is the schedule: always the lowest
 * thread, always the highest, or a seeded random one. A kernel whose result depends on it reads
 * memory another thread writes without the barrier between them. Where real CUDA would hang or be undefined, the launch fails with a
 * message instead (cudaErrorLaunchFailure): a __syncthreads or warp collective not reached by
 * every thread at the same line, too
 * much dynamic shared memory without the opt-in, an access past the dynamic shared memory. Shared
 * memory, static and dynamic, is filled with 0xff (NaN as float) before each CTA, so reading it
 * before writing shows; CTAs run in ascending, descending or shuffled order with the schedule.
 * A cluster's CTAs each have their own shared memory, static and dynamic, as on a GPU; another
 * CTA's, mapped by map_shared_rank, fails the launch once that CTA has exited (on a GPU it is no
 * longer its). Such a pointer into another CTA's static shared memory points at that CTA's copy
 * set aside, which is current whenever a thread of another CTA runs.
 *
 * Asynchronous copies (cp.async, the kernels' copyAsync16) land where the schedule puts them: at
 * once under schedule 0, at the thread's cp.async.wait_group under schedule 1, either for each
 * copy under a random one. Read before its wait, a copy shows the shared memory's old contents;
 * issued into memory other threads still read, it overwrites them. A thread that exits with
 * copies it did not wait for fails the launch (on a GPU they land on whatever was stored since).
 *
 * A load or store off its type's alignment (a float4 not 16-byte aligned), which stops a GPU's
 * kernel ("misaligned address") and passes on x86, or an index past a fixed-size array (a
 * register array, a shared one), kills the process with one line naming the thread: CMake
 * builds the kernels' source with the traps of -fsanitize=alignment,bounds (a SIGILL), where
 * the compiler has them.
 *
 * A programmatic dependent launch (cudaLaunchKernelEx with
 * cudaLaunchAttributeProgrammaticStreamSerialization) runs after the kernel before it, as every
 * launch does here; a thread of it that exits without griddepcontrol.wait
 * (emu::gridDependencyWait) fails it: on a GPU its CTA could complete before that kernel, and
 * the kernel after it would then not wait for that one. The memory the kernels before write (the
 * workspace's sections, emu::setAwaitedMemory) is inaccessible to each of its threads until that
 * thread waits: an access to it before the thread's own wait faults. To open it once per CTA and
 * not once per thread, a thread that has waited parks until no thread that has not can run, so
 * every thread's code before its wait runs ahead of any thread's code after it (a plain store
 * before the wait that another thread reads after its wait without a barrier is then not
 * exposed here, but is under racecheck, below; cp.async copies, the kernels' only such stores,
 * still land at the copying thread's wait_group under schedule 1). Other memory is not checked.
 *
 * Shared-memory bank conflicts and global-memory sectors are what the memory-counts build
 * counts (memoryCounts.cpp): the same runtime, built with MRA_EMULATION_MEMORY_COUNTS, under
 * kernels whose loads and stores the compiler hooks.
 *
 * What it does not model: timing, tensor-core rounding inside
 * one MMA (products are summed in float32, k in order), FMA contraction (nvcc contracts; this
 * build does not), the device's expf (2 ulp), out-of-bounds global memory accesses (the callers
 * in mra_export/native.py fence each buffer against an unmapped page instead, and
 * fencedWorkspace.cpp each section of the kernels' workspace; a fault while a grid runs prints
 * the thread, its block and the memory's name before the process dies), and races
 * that no schedule exposes. In particular every warp collective (shuffle, ballot, vote, mma.sync, ldmatrix)
 * lets all lanes arrive before any goes on, so it also orders the lanes' memory accesses, which
 * on a GPU only __syncwarp or __syncthreads does: a missing __syncwarp after a shuffle is not
 * caught. It stands for a GPU in nothing but the kernels' logic.
 *
 * Races no schedule exposes are what the racecheck build is for (racecheckDriver.cpp): the same
 * runtime, built with MRA_EMULATION_RACECHECK, under a program built with ThreadSanitizer. Each
 * thread is then a ThreadSanitizer fiber, and only __syncthreads, __syncwarp, cluster.sync and
 * the end of a cluster order memory (a shuffle or another collective does not), and a CTA's exit
 * writes its dynamic shared memory, so two threads' accesses with none of those between, one a
 * write, are reported as a data race. A cluster's kernel there keeps its shared state in dynamic
 * shared memory: a static __shared__ variable is one copy for the whole cluster here, and a CTA
 * of a cluster writing one fails the launch.
 *
 * The kernel source is compiled with this header forced in first and its `extern __shared__`
 * declaration rewritten by CMake (plugins/CMakeLists.txt); it launches by cudaLaunchKernelEx,
 * defined below. The self-test writes `kernel<<<grid, block>>>(args...)` as
 * `kernel | ::emu::Launch(grid, block) | ::emu::args(args...)`.
 */
#ifndef MRA_CUDA_EMULATION_H
#define MRA_CUDA_EMULATION_H

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
// Inlined at every call, as nvcc does: the memory counts name each access by the kernel it is in.
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __restrict__
#define __align__(n) __attribute__((aligned(n)))
// One CTA runs at a time, so a static is the CTA's shared copy (a cluster's CTAs swap theirs in
// as they run). Its own section lets the runtime fill every one with 0xff before each CTA, as it
// does dynamic shared memory.
#define __shared__ static __attribute__((section("mra_emulated_shared")))
#define __syncthreads() ::emu::syncThreads(__FILE__, __LINE__)
#define __syncwarp(...) ::emu::syncWarp(__FILE__, __LINE__)

struct dim3
{
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1)
        : x(x_)
        , y(y_)
        , z(z_)
    {
    }
};

struct alignas(16) uint4
{
    unsigned x, y, z, w;
};

inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w)
{
    return uint4{x, y, z, w};
}

struct alignas(16) float4
{
    float x, y, z, w;
};

inline float4 make_float4(float x, float y, float z, float w)
{
    return float4{x, y, z, w};
}

// The running fiber's coordinates; the scheduler sets them before it resumes a fiber.
inline dim3 threadIdx;
inline dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

inline int min(int a, int b)
{
    return a < b ? a : b;
}

//! The device's fast exponential (ex2.approx, a few ulp); here the exact one.
inline float __expf(float x)
{
    return std::exp(x);
}

inline int max(int a, int b)
{
    return a > b ? a : b;
}

inline int __popc(unsigned x)
{
    return __builtin_popcount(x);
}

//! No other thread runs until this one reaches a barrier, but ThreadSanitizer (the racecheck
//! build) must see an atomic, or it reports the threads' additions as a race.
template <typename T>
T atomicAdd(T* address, T value)
{
    static_assert(std::is_integral_v<T>, "the emulation's atomicAdd takes integers (the kernels' counts)");
    return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}

typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t; // TensorRT's headers name it

enum cudaError_t
{
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorLaunchFailure = 719,
    cudaErrorInvalidClusterSize = 912,
};

enum cudaDeviceAttr
{
    cudaDevAttrMultiProcessorCount = 16,
};

enum cudaFuncAttribute
{
    cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};

struct cudaFuncAttributes
{
    int ptxVersion; //!< the virtual architecture the kernel was compiled for, e.g. 90
};

enum cudaLaunchAttributeID
{
    cudaLaunchAttributeClusterDimension = 4,
    cudaLaunchAttributeProgrammaticStreamSerialization = 6,
};

union cudaLaunchAttributeValue
{
    struct
    {
        unsigned int x;
        unsigned int y;
        unsigned int z;
    } clusterDim;
    int programmaticStreamSerializationAllowed;
};

struct cudaLaunchAttribute
{
    cudaLaunchAttributeID id;
    cudaLaunchAttributeValue val;
};

struct cudaLaunchConfig_t
{
    dim3 gridDim;
    dim3 blockDim;
    size_t dynamicSmemBytes;
    cudaStream_t stream;
    cudaLaunchAttribute* attrs;
    unsigned int numAttrs;
};

namespace emu
{

constexpr int kWarpSize = 32;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr size_t kDefaultDynamicShared = 48 * 1024;
// The smallest opt-in limit of the default architectures: sm_86/89 (sm_80: 163 KB, sm_90: 227 KB).
// Static shared memory is not added to it here (the kernels' largest is 9.6 KB).
constexpr size_t kMaxDynamicShared = 99 * 1024;
constexpr unsigned kMaxClusterSize = 8; // CUDA's portable limit (more needs a non-portable opt-in)

//! A warp collective's view of every lane's two words, after all lanes of the warp arrived.
struct WarpRound
{
    uint64_t const (*words)[2]; //!< [lane][0..1]
    unsigned long round;        //!< unique per barrier round
    int lane;
};

unsigned long syncThreads(char const* file, int line);
unsigned long blockRound(); //!< the id of the __syncthreads round now being gathered
void syncWarp(char const* file, int line);
WarpRound warpExchange(char const* file, int line, unsigned mask, uint64_t first, uint64_t second = 0);
[[noreturn]] void fail(char const* format, ...) __attribute__((format(printf, 1, 2)));
unsigned char* dynamicSharedMemory();
//! cluster.sync(): every thread of the cluster's CTAs that has not exited.
void syncCluster(char const* file, int line);
unsigned clusterRank(); //!< the running thread's CTA's rank in its cluster
unsigned clusterSize(); //!< CTAs per cluster (1 without clusters)
//! cluster.map_shared_rank: `address` in the running CTA's shared memory, in CTA `rank`'s.
void* mapSharedRank(char const* file, int line, void const* address, int rank);
//! The multiprocessors cudaDeviceGetAttribute reports.
void setMultiprocessors(unsigned count);
unsigned multiprocessors();
//! The CTAs of the largest cluster launched since the last call (1 without clusters, 0 no launch).
unsigned takeLargestCluster();
//! The threads per CTA of the last kernel launched (0: none yet).
unsigned lastLaunchThreads();
// An H100's or H200's SM, for the occupancy calculator: threads, CTAs and shared memory (each
// CTA takes 1 KB more of it than it asks for, rounded up to 128 bytes, as cuda_occupancy.h
// allocates it). Registers are not emulated, so not counted (tools/occupancy.py counts them).
constexpr int kThreadsPerMultiprocessor = 2048;
constexpr int kCtasPerMultiprocessor = 32;
constexpr size_t kSharedPerMultiprocessor = 228 * 1024;
constexpr size_t kSharedReservedPerCta = 1024;
constexpr size_t kSharedAllocationBytes = 128;

//! cp.async.{ca,cg}.shared.global of `bytes` (4, 8 or 16) to `shared` from `global`, of which
//! `sourceBytes` are read and the rest filled with zeros; joins the thread's open group. Fails the
//! launch where the addresses are not `bytes`-aligned or `shared` is not the CTA's shared memory.
void asyncCopy(char const* file, int line, void* shared, void const* global, int bytes, int sourceBytes);
//! cp.async.commit_group: the thread's open group becomes its newest committed one.
void asyncCommit();
//! cp.async.wait_group: the thread's committed groups but the newest `pending` have landed.
void asyncWait(int pending);
//! griddepcontrol.wait: the kernel before this one has completed (always so here); recorded, as
//! every thread of a dependent launch must reach it, and the awaited memory opened to the thread.
void gridDependencyWait();

//! Memory that the kernels before a programmatic dependent launch write, as page-aligned spans
//! (throws std::invalid_argument otherwise): inaccessible to each thread of such a launch until
//! it reaches griddepcontrol.wait, so that an access before the thread's wait faults,
//! where on a GPU it would race with the kernel before. Empty: none (the default). The wrapper
//! of the kernels' entry point sets the workspace's sections for each call (fencedWorkspace.cpp).
void setAwaitedMemory(std::vector<std::pair<void*, size_t>> spans);

//! Memory a kernel's fault may land in, named for the line the emulation prints before the
//! process dies: "CUDA emulation: thread 3 of block 7 touched 0x... <name>", the name saying
//! where ("in the workspace between rowMax and threshold ...").
struct NamedMemory
{
    void const* start;
    size_t bytes;
    std::string name;
    bool overrun = false; //!< memory no kernel may touch (a gap between workspace sections)
};

//! The names of later faults (the wrapper of the kernels' entry point names the workspace's
//! sections and gaps for each call); empty: none.
void setFaultNames(std::vector<NamedMemory> names);
//! The name of the overrun memory (setFaultNames') that [address, address + bytes) touches;
//! nullptr where it touches none. The memory-counts build asks it of every access: it sees reads
//! too, where the fences see only whole pages and the canaries only writes.
char const* overrunAt(void const* address, int bytes);

//! Where code lies: the executable or library that holds it ("?" where none is known) and its
//! offset there, for `addr2line -f -C -e FILE OFFSET`.
struct CodePlace
{
    char const* file;
    uintptr_t offset;
};
CodePlace codePlace(void const* code);

//! The racecheck build (racecheckDriver.cpp): the calling thread's memory accesses unseen by
//! ThreadSanitizer until the matching end, nested. No-ops otherwise.
void ignoreRacesBegin();
void ignoreRacesEnd();

//! The emulation's own work in a thread, unseen by racecheck and the memory counts for as long
//! as it lives: the runtime's bookkeeping (ready lists, copy queues), a stand-in's internals
//! (CUB's collectives compute through their TempStorage as CUB does not). It is not the kernels'
//! memory.
class EmulationWork
{
public:
    EmulationWork()
    {
        ignoreRacesBegin();
    }
    ~EmulationWork()
    {
        ignoreRacesEnd();
    }
    EmulationWork(EmulationWork const&) = delete;
    EmulationWork& operator=(EmulationWork const&) = delete;
};

//! Whether a result computed once per round (a CUB scan for its block) is
//! still to be computed for ``round``: the first thread past the barrier computes, the others copy.
inline bool claimRound(unsigned long round, unsigned long& computedRound)
{
    if (computedRound == round)
    {
        return false;
    }
    computedRound = round;
    return true;
}

//! CUB's rule for a collective's TempStorage: a __syncthreads between one use and the next
//! (else a fast thread overwrites what a slow one still reads). ``lastUse`` is the storage's.
inline void checkTempStorageReuse(unsigned long& lastUse, char const* collective)
{
    if (lastUse == blockRound())
    {
        fail("%s: TempStorage reused without a __syncthreads since its last use", collective);
    }
}

#ifdef MRA_EMULATION_MEMORY_COUNTS
//! The memory-counts build (memoryCounts.cpp): the running thread's access of `bytes` at `address`
//! by the kernel's instruction at `instruction`, counted where it is its CTA's shared memory or
//! memory the driver counts as global (mraCudaEmulationCountGlobal).
//! The compiler's hooks (-fsanitize=kernel-address) record plain loads and stores; the
//! emulated instructions that touch shared memory record themselves.
void recordAccess(void const* instruction, void const* address, int bytes, bool store);
//! ldmatrix's row of the calling lane: 16 bytes, read by the caller's instruction (the lanes of
//! one 8x8 matrix in one phase, as a 16-byte load's quarter warp).
__attribute__((noinline)) void recordMatrixRow(void const* rowAddress);

//! Who makes the running thread's access: its fiber and its warp (both indices into the running
//! cluster's) and lane, and whether the access falls in its CTA's shared memory. None outside a
//! grid or within the emulation's own work (EmulationWork).
struct Accessor
{
    size_t fiber;
    size_t warp;
    unsigned lane;
    bool shared;
};
bool accessor(void const* address, int bytes, Accessor& who);
//! The runtime's call once a cluster has run (memoryCounts.cpp counts its warps' accesses).
void memoryCountsClusterEnded();
//! The runtime's call at each launch it runs: the kernel, its CTAs' threads and dynamic shared
//! memory, and its cluster size (memoryCounts.cpp lists them, for occupancy by architecture).
void memoryCountsLaunch(void const* kernel, unsigned threads, size_t sharedBytes, unsigned clusterSize);
//! The emulated occupancy query's answer for a kernel, its CTAs' threads and dynamic shared memory.
void memoryCountsOccupancy(void const* kernel, int threads, size_t sharedBytes, int blocks);
#endif

//! The schedule of later launches: lowest thread first (0), highest first (1), else random
//! with that seed; CTAs ascending, descending or shuffled alike.
void setSchedule(uint32_t schedule);

void setMaxDynamicShared(void const* kernel, size_t bytes);
//! Runs ``body`` as every thread of a 1-D grid; a failure is left for cudaGetLastError.
//! ``dependent``: a programmatic dependent launch, whose threads must each wait for the kernel
//! before (gridDependencyWait). ``clusterSize``: CTAs per cluster, run together.
void runGrid(void const* kernel, dim3 grid, dim3 block, size_t sharedBytes, std::function<void()> const& body,
    bool dependent = false, unsigned clusterSize = 1);

template <typename T>
uint64_t bitsOf(T value)
{
    static_assert(sizeof(T) <= sizeof(uint64_t), "a warp word holds up to 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    return bits;
}

template <typename T>
T fromBits(uint64_t bits)
{
    T value;
    std::memcpy(&value, &bits, sizeof(T));
    return value;
}

//! `kernel<<<grid, block, shared, stream>>>(args...)`, written
//! `kernel | ::emu::Launch(grid, block, shared, stream) | ::emu::args(args...)`.
struct Launch
{
    dim3 grid, block;
    size_t sharedBytes;
    unsigned clusterSize = 1;
    bool programmaticDependent = false;
    Launch(dim3 grid_, dim3 block_, size_t sharedBytes_ = 0, cudaStream_t = nullptr)
        : grid(grid_)
        , block(block_)
        , sharedBytes(sharedBytes_)
    {
    }

    //! The same launch in clusters of `ctas` CTAs (cudaLaunchAttributeClusterDimension).
    Launch inClusters(unsigned ctas) const
    {
        Launch clustered = *this;
        clustered.clusterSize = ctas;
        return clustered;
    }

    //! The same launch as a programmatic dependent of the kernel before
    //! (cudaLaunchAttributeProgrammaticStreamSerialization).
    Launch asDependent() const
    {
        Launch dependent = *this;
        dependent.programmaticDependent = true;
        return dependent;
    }
};

template <typename... Params>
struct BoundLaunch
{
    void (*kernel)(Params...);
    Launch launch;
};

template <typename... Params>
BoundLaunch<Params...> operator|(void (*kernel)(Params...), Launch const& launch)
{
    return {kernel, launch};
}

template <typename... Args>
std::tuple<Args...> args(Args... values)
{
    return std::tuple<Args...>(values...);
}

//! Runs `kernel(arguments...)` as a grid (runGrid); a failure is left for cudaGetLastError.
template <typename... Params, typename... Args>
void runKernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t sharedBytes, bool dependent,
    unsigned clusterSize, Args const&... arguments)
{
    static_assert(sizeof...(Params) == sizeof...(Args), "a kernel launch with the wrong number of arguments");
    // Converted once, as CUDA copies a launch's arguments; every thread calls with the copy.
    std::tuple<Params...> const converted(arguments...);
    runGrid(reinterpret_cast<void const*>(kernel), grid, block, sharedBytes, [&] { std::apply(kernel, converted); },
        dependent, clusterSize);
}

template <typename... Params, typename... Args>
void operator|(BoundLaunch<Params...> const& bound, std::tuple<Args...> const& arguments)
{
    Launch const& l = bound.launch;
    auto const run = [&](auto const&... values) {
        runKernel(bound.kernel, l.grid, l.block, l.sharedBytes, l.programmaticDependent, l.clusterSize, values...);
    };
    std::apply(run, arguments);
}

} // namespace emu

cudaError_t cudaGetLastError();
char const* cudaGetErrorString(cudaError_t error);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device);
//! The emulated kernels stand for an sm_90 build (so their dependent launches are exercised).
template <typename Kernel>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, Kernel*)
{
    *attributes = cudaFuncAttributes{90};
    return cudaSuccess;
}

namespace emu
{
//! CTAs per cluster a launch's attributes ask for: 1 without clusters, 0 for a cluster that is
//! not 1-D (the grids are 1-D).
inline unsigned clusterSizeOf(cudaLaunchConfig_t const& config)
{
    unsigned size = 1;
    for (unsigned a = 0; a < config.numAttrs; ++a)
    {
        if (config.attrs[a].id == cudaLaunchAttributeClusterDimension)
        {
            auto const& cluster = config.attrs[a].val.clusterDim;
            size = cluster.y == 1 && cluster.z == 1 ? cluster.x : 0;
        }
    }
    return size;
}
} // namespace emu

//! cudaLaunchKernelEx's C++ form; a failure is left for cudaGetLastError, as a <<<>>> launch's is.
template <typename... Params, typename... Args>
cudaError_t cudaLaunchKernelEx(cudaLaunchConfig_t const* config, void (*kernel)(Params...), Args&&... arguments)
{
    bool dependent = false;
    for (unsigned a = 0; a < config->numAttrs; ++a)
    {
        cudaLaunchAttribute const& attribute = config->attrs[a];
        dependent = dependent
            || (attribute.id == cudaLaunchAttributeProgrammaticStreamSerialization
                && attribute.val.programmaticStreamSerializationAllowed != 0);
    }
    emu::runKernel(kernel, config->gridDim, config->blockDim, config->dynamicSmemBytes, dependent,
        emu::clusterSizeOf(*config), arguments...);
    return cudaSuccess;
}

//! As if each SM held one CTA (a GPU's answer for a kernel whose CTA takes an SM's registers)
//! and any SMs could form a cluster.
template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveClusters(int* clusters, Kernel*, cudaLaunchConfig_t const* config)
{
    unsigned const size = emu::clusterSizeOf(*config);
    if (size == 0 || size > emu::kMaxClusterSize)
    {
        return cudaErrorInvalidClusterSize;
    }
    *clusters = static_cast<int>(emu::multiprocessors() / size);
    return cudaSuccess;
}

//! An H100's or H200's answer by threads and shared memory (emu::kThreadsPerMultiprocessor...);
//! not by registers, which the emulation does not know of (the memory-counts build lists each
//! answer, which tests/test_occupancy.py holds to NVIDIA's calculator with the kernel's registers).
template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel* kernel, int threads, size_t sharedBytes)
{
    if (threads <= 0 || static_cast<unsigned>(threads) > emu::kMaxThreadsPerBlock)
    {
        return cudaErrorInvalidValue;
    }
    size_t const perCta = (sharedBytes + emu::kSharedReservedPerCta + emu::kSharedAllocationBytes - 1)
        / emu::kSharedAllocationBytes * emu::kSharedAllocationBytes;
    size_t const byShared = emu::kSharedPerMultiprocessor / perCta;
    *blocks = static_cast<int>(std::min<size_t>(
        {byShared, static_cast<size_t>(emu::kThreadsPerMultiprocessor / threads), emu::kCtasPerMultiprocessor}));
#ifdef MRA_EMULATION_MEMORY_COUNTS
    emu::memoryCountsOccupancy(reinterpret_cast<void const*>(kernel), threads, sharedBytes, *blocks);
#else
    (void) kernel;
#endif
    return cudaSuccess;
}

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attribute, int value)
{
    if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0
        || static_cast<size_t>(value) > emu::kMaxDynamicShared)
    {
        return cudaErrorInvalidValue;
    }
    emu::setMaxDynamicShared(reinterpret_cast<void const*>(kernel), static_cast<size_t>(value));
    return cudaSuccess;
}

// ---- warp intrinsics ---------------------------------------------------------------------

#define __shfl_xor_sync(mask, value, laneMask, ...)                                                                    \
    ::emu::shflXor(__FILE__, __LINE__, mask, value, laneMask, ##__VA_ARGS__)
#define __ballot_sync(mask, predicate) ::emu::ballot(__FILE__, __LINE__, mask, predicate)
#define __any_sync(mask, predicate) (::emu::ballot(__FILE__, __LINE__, mask, predicate) != 0u)

namespace emu
{

template <typename T>
T shflXor(char const* file, int line, unsigned mask, T value, int laneMask, int width = kWarpSize)
{
    if (width != kWarpSize)
    {
        fail("__shfl_xor_sync at %s:%d with width %d: the emulation shuffles whole warps only", file, line, width);
    }
    WarpRound const round = warpExchange(file, line, mask, bitsOf(value));
    return fromBits<T>(round.words[(round.lane ^ laneMask) & (kWarpSize - 1)][0]);
}

inline unsigned ballot(char const* file, int line, unsigned mask, int predicate)
{
    WarpRound const round = warpExchange(file, line, mask, predicate != 0 ? 1 : 0);
    unsigned result = 0;
    for (int lane = 0; lane < kWarpSize; ++lane)
    {
        result |= ((mask >> lane) & 1u) != 0 && round.words[lane][0] != 0 ? 1u << lane : 0u;
    }
    return result;
}

} // namespace emu

#endif // MRA_CUDA_EMULATION_H
