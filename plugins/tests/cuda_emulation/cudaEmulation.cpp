/*
 * The emulation's runtime (cudaEmulation.h): clusters of CTAs (one CTA unless the launch asks
 * for more) run one at a time, their threads as fibers switched at barriers and warp collectives,
 * in the order the schedule gives.
 *
 * A fiber starts with makecontext/setcontext and then switches with _setjmp/_longjmp, which
 * (unlike swapcontext) make no system call: a run switches millions of times.
 */
#include "cudaEmulation.h" // built with -U_FORTIFY_SOURCE: its longjmp check refuses jumps between stacks
#include "fencedGaps.h" // pageSize
#include "guardedBuffer.h"

#include <dlfcn.h> // dladdr
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h> // write

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

// The linker's bounds of the section every __shared__ variable is placed in (cudaEmulation.h).
extern "C" unsigned char __start_mra_emulated_shared[] __attribute__((weak, visibility("hidden")));
extern "C" unsigned char __stop_mra_emulated_shared[] __attribute__((weak, visibility("hidden")));

#ifdef MRA_EMULATION_RACECHECK
// ThreadSanitizer's interface (libtsan), for the racecheck build (racecheckDriver.cpp).
extern "C" void* __tsan_get_current_fiber();
extern "C" void* __tsan_create_fiber(unsigned flags);
extern "C" void __tsan_destroy_fiber(void* fiber);
extern "C" void __tsan_switch_to_fiber(void* fiber, unsigned flags);
extern "C" void __tsan_acquire(void* address);
extern "C" void __tsan_release(void* address);
extern "C" void __tsan_write_range(void* address, unsigned long bytes);
extern "C" void AnnotateIgnoreWritesBegin(char const* file, int line);
extern "C" void AnnotateIgnoreWritesEnd(char const* file, int line);
#endif

namespace emu
{
namespace
{

// The racecheck build's hooks (no-ops otherwise). Each fiber is a ThreadSanitizer fiber, and
// switching between them orders nothing: only what orders memory on a GPU (__syncthreads,
// __syncwarp, cluster.sync; the end of a cluster before the next starts) is told to it, as a
// release by every thread arriving and an acquire by every thread leaving. Two accesses of
// different threads, one a write, with none of those between, are then a data race whatever
// the schedule, as racecheck reports a hazard. A CTA's exit writes its dynamic shared memory
// (exitCta), so that another CTA of its cluster reading it with no cluster.sync before the exit
// races with it. A cluster's CTAs share the one copy of the static shared memory here (swapped
// by makeResident), which ThreadSanitizer would take for memory they all use: a cluster's CTA
// writing a static variable fails the launch instead (staticSharedWritten).
namespace race
{
#ifdef MRA_EMULATION_RACECHECK
constexpr bool kEnabled = true;
constexpr unsigned kNoSync = 1; // __tsan_switch_to_fiber_no_sync

void* current()
{
    return __tsan_get_current_fiber();
}

void* newFiber()
{
    return __tsan_create_fiber(0);
}

void destroy(void* fiber)
{
    __tsan_destroy_fiber(fiber);
}

void switchTo(void* fiber)
{
    __tsan_switch_to_fiber(fiber, kNoSync);
}

void release(void* object)
{
    __tsan_release(object);
}

void acquire(void* object)
{
    __tsan_acquire(object);
}

//! A write somewhere between now and a later point (a cp.async in flight), recorded now.
void write(void* address, size_t bytes)
{
    __tsan_write_range(address, bytes);
}

//! The running fiber's accesses (its heap allocations included) unseen until ignoreEnd: the
//! emulation's own bookkeeping, which every thread shares, is not the kernels' memory.
void ignoreBegin()
{
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__); // reads too, in ThreadSanitizer
}

void ignoreEnd()
{
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
}
#else
constexpr bool kEnabled = false;
void* current()
{
    return nullptr;
}
void* newFiber()
{
    return nullptr;
}
void destroy(void*) {}
void switchTo(void*) {}
void release(void*) {}
void acquire(void*) {}
void write(void*, size_t) {}
void ignoreBegin() {}
void ignoreEnd() {}
#endif
} // namespace race

//! Fills every static __shared__ variable with garbage, as a new CTA's shared memory is.
void poisonStaticShared()
{
    if (__start_mra_emulated_shared != nullptr) // none in a program without __shared__ variables
    {
        std::memset(__start_mra_emulated_shared, 0xff,
            static_cast<size_t>(__stop_mra_emulated_shared - __start_mra_emulated_shared));
    }
}

constexpr size_t kStackBytes = 128 * 1024;
constexpr size_t kGuardBytes = 4096; // below each stack, unmapped: an overflow faults at once

enum class State
{
    Ready,
    Waiting,
    Parked, //!< past griddepcontrol.wait, until no thread that has not waited can run
    Finished,
    Abandoned, //!< stopped inside the kernel by a failure (fail): never resumed
};

struct Barrier
{
    int arrived = 0;
    char const* file = nullptr;
    int line = 0;
    unsigned long round = 0;    //!< unique id of the round being gathered
    unsigned long sequence = 0; //!< rounds completed: its parity picks a warp's word buffer
    unsigned char raceOrder[2] = {}; //!< racecheck's release/acquire object, by round parity
};

//! One cp.async not yet waited for: `sourceBytes` of `source`, then zeros up to `bytes`; it may
//! have landed already (the schedule decides when).
struct AsyncCopy
{
    unsigned char* destination;
    unsigned char const* source;
    int bytes;
    int sourceBytes;
    bool landed = false;

    void land()
    {
        if (landed)
        {
            return;
        }
        landed = true;
        if (sourceBytes > 0)
        {
            std::memcpy(destination, source, static_cast<size_t>(sourceBytes));
        }
        std::memset(destination + sourceBytes, 0, static_cast<size_t>(bytes - sourceBytes));
    }
};

using AsyncGroup = std::vector<AsyncCopy>;

struct Fiber
{
    ucontext_t start;
    jmp_buf resumeAt;
    bool started = false;
    unsigned thread = 0; //!< threadIdx.x
    unsigned cta = 0;    //!< its CTA's rank in the cluster
    size_t warp = 0;     //!< index into Runtime::warps
    State state = State::Ready;
    Barrier const* waitingOn = nullptr;
    AsyncGroup openCopies;                  //!< issued since the last cp.async.commit_group
    std::deque<AsyncGroup> committedCopies; //!< oldest first
    bool waitedForPreviousKernel = false;   //!< reached griddepcontrol.wait
    void* raceFiber = nullptr;              //!< its ThreadSanitizer fiber (racecheck build)
    int raceIgnores = 0;                    //!< ignoreRacesBegin calls not yet ended (retireRaceFiber)
};

struct Warp
{
    Barrier barrier;
    int lanes = 0;
    int finished = 0;
    uint64_t words[2][kWarpSize][2] = {}; //!< double-buffered by round: lanes may run one round ahead
};

//! The fibers that can run, and which runs next: the lowest thread (schedule 0), the highest (1),
//! or a random one (a seed > 1). The chosen fiber runs until it blocks or completes a barrier, so
//! a low-first schedule takes warp 0 as far as it can go before warp 1 starts: a read of another
//! thread's write without the barrier between them then sees the old value in one schedule or
//! the other.
class ReadyFibers
{
public:
    void reset(uint32_t schedule)
    {
        mSchedule = schedule;
        mOrdered.clear();
        mPool.clear();
    }

    void add(size_t fiber)
    {
        if (mSchedule <= 1)
        {
            mOrdered.insert(fiber);
        }
        else
        {
            mPool.push_back(fiber);
        }
    }

    bool empty() const
    {
        return mOrdered.empty() && mPool.empty();
    }

    size_t take(std::mt19937& random)
    {
        size_t fiber;
        if (mSchedule == 0)
        {
            fiber = *mOrdered.begin();
            mOrdered.erase(mOrdered.begin());
        }
        else if (mSchedule == 1)
        {
            fiber = *mOrdered.rbegin();
            mOrdered.erase(std::prev(mOrdered.end()));
        }
        else
        {
            size_t const index = random() % mPool.size();
            fiber = mPool[index];
            mPool[index] = mPool.back();
            mPool.pop_back();
        }
        return fiber;
    }

private:
    uint32_t mSchedule = 0;
    std::set<size_t> mOrdered;
    std::vector<size_t> mPool;
};

//! One CTA of the running cluster.
struct Cta
{
    dim3 index; //!< blockIdx
    int threads = 0;
    int finished = 0;
    Barrier block; //!< its __syncthreads
    // Its dynamic shared memory: exactly the bytes asked for, 128-byte aligned, against an
    // unmapped page (a GPU reports an illegal address past it), poisoned before each cluster.
    std::optional<checks::GuardedBuffer> shared;
    // Its static shared memory while another CTA of the cluster runs: the variables' one copy
    // (their section) holds the running CTA's, as a variable's address is the same in every CTA.
    std::vector<unsigned char> staticShared;
    unsigned char raceExit = 0; //!< racecheck's: released by each of its threads as it exits
};

//! Stacks for the fibers, reused by every CTA; each with a guard page below it.
class Stacks
{
public:
    char* get(size_t index)
    {
        while (mStacks.size() <= index)
        {
            void* memory = mmap(nullptr, kGuardBytes + kStackBytes, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (memory == MAP_FAILED)
            {
                return nullptr;
            }
            mprotect(memory, kGuardBytes, PROT_NONE);
            mStacks.push_back(static_cast<char*>(memory) + kGuardBytes);
        }
        return mStacks[index];
    }

private:
    std::vector<char*> mStacks; // kept for the process's lifetime
};

struct Runtime
{
    std::mutex launchMutex;
    jmp_buf scheduler;
    std::vector<Fiber> fibers; //!< the cluster's, CTA by CTA
    ReadyFibers ready;
    std::vector<Warp> warps;
    std::vector<Cta> ctas; //!< the running cluster's, by rank
    Barrier cluster;       //!< its cluster.sync
    unsigned residentCta = 0; //!< whose static shared memory is in the variables' section
    int finished = 0;
    Fiber* current = nullptr;
    std::function<void()> const* body = nullptr;
    std::string error;
    unsigned errorBlock = 0; //!< blockIdx.x of the thread that failed
    Stacks stacks;
    unsigned multiprocessors = 132; //!< what cudaDeviceGetAttribute reports (an H100's or H200's)
    unsigned largestCluster = 0;    //!< CTAs of the largest cluster launched since it was last read
    unsigned lastLaunchThreads = 0; //!< threads per CTA of the last launch
    unsigned long nextRound = 1;
    uint32_t schedule = 0;
    std::mt19937 random;
    cudaError_t lastError = cudaSuccess;
    std::string lastMessage;
    std::map<void const*, size_t> sharedOptIn;
    bool dependentLaunch = false; //!< the running launch is a programmatic dependent
    std::vector<std::pair<void*, size_t>> awaited; //!< setAwaitedMemory's spans
    bool awaitedLocked = false;                    //!< those spans inaccessible now
    std::vector<size_t> parked;                    //!< fibers at griddepcontrol.wait, in arrival order
    std::vector<NamedMemory> faultNames;           //!< setFaultNames'
    struct sigaction actionBefore{};               //!< SIGSEGV's, while a grid runs
    struct sigaction illegalBefore{};              //!< SIGILL's, while a grid runs
    void* raceScheduler = nullptr;      //!< the launching thread's ThreadSanitizer fiber
    unsigned char raceClusterStart = 0; //!< released by the launching thread before each cluster
    unsigned char raceClusterEnd = 0;   //!< released for every thread of a cluster (retireRaceFiber)
    std::vector<void*> spareRaceFibers; //!< ThreadSanitizer fibers of exited threads, for reuse
};

Runtime& runtime()
{
    static Runtime instance;
    return instance;
}

Fiber& currentFiber()
{
    return *runtime().current;
}

Warp& currentWarp()
{
    return runtime().warps[currentFiber().warp];
}

Cta& currentCta()
{
    return runtime().ctas[currentFiber().cta];
}

size_t staticSharedBytes()
{
    return static_cast<size_t>(__stop_mra_emulated_shared - __start_mra_emulated_shared);
}

//! Puts CTA `rank`'s static shared memory in the variables' section, the resident one's aside.
void makeResident(unsigned rank)
{
    Runtime& r = runtime();
    if (rank == r.residentCta || staticSharedBytes() == 0)
    {
        r.residentCta = rank;
        return;
    }
    race::ignoreBegin(); // the emulation's bookkeeping, not an access of the kernel's
    std::memcpy(r.ctas[r.residentCta].staticShared.data(), __start_mra_emulated_shared, staticSharedBytes());
    std::memcpy(__start_mra_emulated_shared, r.ctas[rank].staticShared.data(), staticSharedBytes());
    race::ignoreEnd();
    r.residentCta = rank;
}

//! Whether the resident CTA wrote a static __shared__ variable (the section no longer all
//! poison): in a cluster of several, racecheck's stand-in cannot tell the CTAs' copies apart.
bool staticSharedWritten()
{
    race::ignoreBegin();
    bool const written = std::any_of(__start_mra_emulated_shared, __stop_mra_emulated_shared,
        [](unsigned char byte) { return byte != 0xff; });
    race::ignoreEnd();
    return written;
}

size_t fiberIndex(Fiber const& fiber)
{
    return static_cast<size_t>(&fiber - runtime().fibers.data());
}

void switchToScheduler()
{
    Runtime& r = runtime();
    if (_setjmp(r.current->resumeAt) == 0)
    {
        race::switchTo(r.raceScheduler);
        _longjmp(r.scheduler, 1);
    }
}

//! Runs ``fiber`` until it next switches back (at a barrier, a collective, its end or a failure).
__attribute__((noinline)) void resume(Fiber& fiber)
{
    Runtime& r = runtime();
    if (race::kEnabled && fiber.cta != r.residentCta && staticSharedWritten())
    {
        // Before the next CTA runs, so that no report of ThreadSanitizer's comes first.
        r.error = "racecheck's stand-in: a CTA of a cluster wrote a static __shared__ variable, whose one copy here "
                  "every CTA of the cluster would use; give the kernel dynamic shared memory";
        r.errorBlock = r.ctas[r.residentCta].index.x;
        return;
    }
    r.current = &fiber;
    threadIdx = dim3(fiber.thread);
    blockIdx = r.ctas[fiber.cta].index;
    makeResident(fiber.cta);
    if (_setjmp(r.scheduler) == 0)
    {
        race::switchTo(fiber.raceFiber);
        if (fiber.started)
        {
            _longjmp(fiber.resumeAt, 1);
        }
        fiber.started = true;
        setcontext(&fiber.start);
    }
    r.current = nullptr;
}

void wake(Barrier& barrier)
{
    Runtime& r = runtime();
    for (Fiber& fiber : r.fibers)
    {
        if (fiber.state == State::Waiting && fiber.waitingOn == &barrier)
        {
            fiber.state = State::Ready;
            fiber.waitingOn = nullptr;
            r.ready.add(fiberIndex(fiber));
        }
    }
    barrier.arrived = 0;
    barrier.file = nullptr;
    barrier.round = r.nextRound++;
    ++barrier.sequence;
    if (&barrier == &r.cluster)
    {
        // Every thread of every CTA was at it, so it also ends each CTA's __syncthreads round
        // (CUB's TempStorage rule counts it as one).
        for (Cta& cta : r.ctas)
        {
            cta.block.round = r.nextRound++;
        }
    }
}

//! Arrive at ``barrier`` of ``expected`` threads; returns the round's id after all arrived.
//! ``ordersMemory``: whether it orders the threads' memory accesses on a GPU (__syncthreads,
//! __syncwarp, cluster.sync; not a shuffle or another collective), as racecheck is told.
unsigned long arrive(Barrier& barrier, int expected, char const* file, int line, char const* what, bool ordersMemory)
{
    EmulationWork const bookkeeping; // ends in this fiber, once it is resumed
    Fiber& fiber = currentFiber();
    if (barrier.arrived == 0)
    {
        barrier.file = file;
        barrier.line = line;
    }
    else if (barrier.line != line || std::strcmp(barrier.file, file) != 0)
    {
        fail("%s at %s:%d reached by thread %u while others wait at %s:%d (divergent)", what, file, line,
            fiber.thread, barrier.file, barrier.line);
    }
    unsigned long const round = barrier.round;
    // By parity: a thread may arrive at the next round before the others have left this one.
    unsigned char* const order = &barrier.raceOrder[barrier.sequence & 1];
    if (ordersMemory)
    {
        race::release(order);
    }
    if (++barrier.arrived == expected)
    {
        wake(barrier);
        runtime().ready.add(fiberIndex(fiber));
    }
    else
    {
        fiber.state = State::Waiting;
        fiber.waitingOn = &barrier;
    }
    switchToScheduler(); // the others' turn, in the schedule's order
    if (ordersMemory)
    {
        race::acquire(order);
    }
    return round;
}

//! Copies the fiber issued and has not waited for, landed or not.
size_t copiesNotWaitedFor(Fiber const& fiber)
{
    size_t count = fiber.openCopies.size();
    for (AsyncGroup const& group : fiber.committedCopies)
    {
        count += group.size();
    }
    return count;
}

//! A ThreadSanitizer fiber for a thread (racecheck build): one a thread of an earlier cluster
//! exited from, if any. Creating and destroying one per thread took most of racecheck's time in
//! mmap and munmap; reuse orders nothing the clusters' chain does not (raceClusterStart/End).
void* takeRaceFiber(Runtime& r)
{
    if (r.spareRaceFibers.empty())
    {
        return race::newFiber();
    }
    void* const fiber = r.spareRaceFibers.back();
    r.spareRaceFibers.pop_back();
    return fiber;
}

//! racecheck: a CTA's exit gives its shared memory to the SM's next CTA, which may write it at
//! once: a write of all of it, after every access of its own threads (in a ThreadSanitizer fiber
//! of its own, which acquires their exits). Another CTA of the cluster reading it through
//! map_shared_rank with no cluster.sync between that read and the exit races with it.
__attribute__((noinline)) void exitCta(Runtime& r, Cta& cta)
{
    if (!race::kEnabled || cta.shared->size() == 0)
    {
        return;
    }
    void* const lastThread = race::current();
    // A new fiber: one that another CTA of the cluster exited in would order that CTA's accesses
    // before this write.
    void* const exit = race::newFiber();
    race::switchTo(exit);
    race::acquire(&cta.raceExit);
    race::write(cta.shared->start(), cta.shared->size());
    race::release(&r.raceClusterEnd); // before the launching thread poisons it for the next cluster
    race::switchTo(lastThread);
    race::destroy(exit);
}

void fiberMain()
{
    Runtime& r = runtime();
    Cta& cta = currentCta();
    race::acquire(&r.raceClusterStart);
    (*r.body)();
    race::release(&cta.raceExit);
    ignoreRacesBegin(); // the emulation's bookkeeping, to the fiber's end (retireRaceFiber)
    Fiber& fiber = currentFiber();
    // On a GPU a copy never waited for may land after other threads reused its memory: the
    // kernels wait for every copy they issue.
    size_t const inFlight = copiesNotWaitedFor(fiber);
    if (inFlight > 0)
    {
        fail("thread %u exited with %zu cp.async copies not waited for", fiber.thread, inFlight);
    }
    if (r.dependentLaunch && !fiber.waitedForPreviousKernel)
    {
        fail("thread %u of a programmatic dependent launch exited without griddepcontrol.wait", fiber.thread);
    }
    fiber.state = State::Finished;
    ++r.finished;
    ++currentWarp().finished;
    if (++cta.finished == cta.threads)
    {
        exitCta(r, cta);
    }
    // Exited threads no longer hold up __syncthreads (as on Volta and later) or cluster.sync.
    if (cta.block.arrived > 0 && cta.block.arrived == cta.threads - cta.finished)
    {
        wake(cta.block);
    }
    if (r.cluster.arrived > 0 && r.cluster.arrived == static_cast<int>(r.fibers.size()) - r.finished)
    {
        wake(r.cluster);
    }
    race::switchTo(r.raceScheduler);
    _longjmp(r.scheduler, 1); // never returns: the fiber's stack is free for the next CTA
}

std::string describeDeadlock()
{
    Runtime const& r = runtime();
    std::map<std::string, int> waiting;
    for (Fiber const& fiber : r.fibers)
    {
        if (fiber.state == State::Waiting)
        {
            char where[512];
            std::snprintf(where, sizeof(where), "%s:%d", fiber.waitingOn->file, fiber.waitingOn->line);
            ++waiting[where];
        }
    }
    std::string message = "deadlock:";
    for (auto const& [where, count] : waiting)
    {
        message += " " + std::to_string(count) + " threads wait at " + where + ";";
    }
    return message + " " + std::to_string(r.finished) + " finished";
}

//! The order clusters (CTAs, where each is its own) run in: ascending under schedule 0,
//! descending under 1, else shuffled.
std::vector<unsigned> ctaOrder(unsigned count)
{
    Runtime& r = runtime();
    std::vector<unsigned> order(count);
    for (unsigned b = 0; b < count; ++b)
    {
        order[b] = r.schedule == 1 ? count - 1 - b : b;
    }
    if (r.schedule > 1)
    {
        std::shuffle(order.begin(), order.end(), r.random);
    }
    return order;
}

//! Makes the awaited memory inaccessible (`locked`) or accessible again.
void lockAwaited(Runtime& r, bool locked)
{
    if (r.awaitedLocked == locked)
    {
        return;
    }
    for (auto const& [start, bytes] : r.awaited)
    {
        mprotect(start, bytes, locked ? PROT_NONE : PROT_READ | PROT_WRITE);
    }
    r.awaitedLocked = locked;
}

//! Parked fibers made ready again, once every fiber that has not waited is blocked or done;
//! false if none was parked.
bool releaseParked(Runtime& r)
{
    for (size_t f : r.parked)
    {
        r.fibers[f].state = State::Ready;
        r.ready.add(f);
    }
    bool const released = !r.parked.empty();
    r.parked.clear();
    return released;
}

//! Retires the thread's ThreadSanitizer fiber (racecheck build), first ending in its name the
//! ignores it left on (ThreadSanitizer dies of a fiber freed with any: the bookkeeping of its
//! exit, or a barrier or stand-in a failed launch abandoned it in) and releasing what it wrote
//! to the launching thread, which acquires it before the next cluster. A fiber whose thread
//! exited is kept for reuse; one abandoned inside the kernel, its call stack not unwound, is freed.
void retireRaceFiber(Runtime& r, Fiber& fiber)
{
    if (!race::kEnabled)
    {
        return;
    }
    void* const running = race::current();
    race::switchTo(fiber.raceFiber);
    for (; fiber.raceIgnores > 0; --fiber.raceIgnores)
    {
        race::ignoreEnd();
    }
    race::release(&r.raceClusterEnd);
    race::switchTo(running);
    if (fiber.state == State::Finished || !fiber.started)
    {
        r.spareRaceFibers.push_back(fiber.raceFiber);
    }
    else
    {
        race::destroy(fiber.raceFiber);
    }
}

//! Runs the cluster of r.ctas, each of ``threads``, to completion; false (with r.error) if it
//! failed or deadlocked.
bool runCluster(unsigned threads)
{
    Runtime& r = runtime();
    size_t const ctas = r.ctas.size();
    size_t const warpsPerCta = (threads + kWarpSize - 1) / kWarpSize;
    r.fibers.assign(ctas * threads, Fiber{});
    r.warps.assign(ctas * warpsPerCta, Warp{});
    r.cluster = Barrier{};
    r.cluster.round = r.nextRound++;
    r.finished = 0;
    for (Cta& cta : r.ctas)
    {
        cta.threads = static_cast<int>(threads);
        cta.finished = 0;
        cta.block = Barrier{};
        cta.block.round = r.nextRound++;
    }
    for (size_t f = 0; f < r.fibers.size(); ++f)
    {
        Fiber& fiber = r.fibers[f];
        fiber.cta = static_cast<unsigned>(f / threads);
        fiber.thread = static_cast<unsigned>(f % threads);
        fiber.warp = fiber.cta * warpsPerCta + fiber.thread / kWarpSize;
        Warp& warp = r.warps[fiber.warp];
        if (warp.lanes == 0)
        {
            warp.barrier.round = r.nextRound++;
        }
        ++warp.lanes;
        char* stack = r.stacks.get(f);
        if (stack == nullptr)
        {
            r.error = "out of memory for fiber stacks";
            return false;
        }
        getcontext(&fiber.start);
        fiber.start.uc_stack.ss_sp = stack;
        fiber.start.uc_stack.ss_size = kStackBytes;
        fiber.start.uc_link = nullptr; // fiberMain never returns
        makecontext(&fiber.start, fiberMain, 0);
        fiber.raceFiber = takeRaceFiber(r);
    }
    r.ready.reset(r.schedule);
    for (size_t f = 0; f < r.fibers.size(); ++f)
    {
        r.ready.add(f);
    }
    r.parked.clear();
    r.raceScheduler = race::current(); // the launching thread's: the fibers switch back to it
    while (r.error.empty() && (!r.ready.empty() || releaseParked(r)))
    {
        Fiber& next = r.fibers[r.ready.take(r.random)];
        // The awaited memory is open to a thread of a dependent launch from its own wait on.
        lockAwaited(r, r.dependentLaunch && !next.waitedForPreviousKernel);
        resume(next);
    }
    if (r.error.empty() && r.finished < static_cast<int>(r.fibers.size()))
    {
        r.error = describeDeadlock();
        r.errorBlock = r.ctas.front().index.x;
    }
    for (Fiber& fiber : r.fibers)
    {
        retireRaceFiber(r, fiber);
    }
#ifdef MRA_EMULATION_MEMORY_COUNTS
    memoryCountsClusterEnded();
#endif
    return r.error.empty();
}

} // namespace

unsigned long syncThreads(char const* file, int line)
{
    Cta& cta = currentCta();
    return arrive(cta.block, cta.threads - cta.finished, file, line, "__syncthreads", true);
}

unsigned long blockRound()
{
    return currentCta().block.round;
}

void syncCluster(char const* file, int line)
{
    Runtime& r = runtime();
    arrive(r.cluster, static_cast<int>(r.fibers.size()) - r.finished, file, line, "cluster.sync", true);
}

unsigned clusterRank()
{
    return currentFiber().cta;
}

unsigned clusterSize()
{
    return static_cast<unsigned>(runtime().ctas.size());
}

namespace
{

//! A warp collective; ``ordersMemory`` for __syncwarp alone (see arrive).
WarpRound exchange(char const* file, int line, unsigned mask, uint64_t first, uint64_t second, bool ordersMemory)
{
    Warp& warp = currentWarp();
    int const lane = static_cast<int>(currentFiber().thread % kWarpSize);
    unsigned const everyLane = warp.lanes == kWarpSize ? ~0u : (1u << warp.lanes) - 1u;
    if ((mask & everyLane) != everyLane)
    {
        fail("warp collective at %s:%d with mask %#x: the emulation runs whole warps only", file, line, mask);
    }
    if (warp.finished > 0)
    {
        fail("warp collective at %s:%d after lanes of the warp exited", file, line);
    }
    auto& words = warp.words[warp.barrier.sequence & 1];
    words[lane][0] = first;
    words[lane][1] = second;
    unsigned long const round = arrive(warp.barrier, warp.lanes, file, line, "warp collective", ordersMemory);
    return WarpRound{words, round, lane};
}

} // namespace

WarpRound warpExchange(char const* file, int line, unsigned mask, uint64_t first, uint64_t second)
{
    return exchange(file, line, mask, first, second, false);
}

void syncWarp(char const* file, int line)
{
    exchange(file, line, ~0u, 0, 0, true);
}

void fail(char const* format, ...)
{
    Runtime& r = runtime();
    ignoreRacesBegin(); // the emulation's bookkeeping, to the fiber's end (retireRaceFiber)
    char message[1024];
    va_list arguments;
    va_start(arguments, format);
    std::vsnprintf(message, sizeof(message), format, arguments);
    va_end(arguments);
    if (r.error.empty())
    {
        r.error = message;
        r.errorBlock = blockIdx.x;
    }
    Fiber& fiber = currentFiber();
    fiber.state = State::Abandoned;
    race::switchTo(r.raceScheduler);
    _longjmp(r.scheduler, 1);
}

unsigned char* dynamicSharedMemory()
{
    return currentCta().shared->start();
}

void* mapSharedRank(char const* file, int line, void const* address, int rank)
{
    Runtime& r = runtime();
    if (rank < 0 || static_cast<size_t>(rank) >= r.ctas.size())
    {
        fail("map_shared_rank at %s:%d: rank %d of a cluster of %zu CTAs", file, line, rank, r.ctas.size());
    }
    Cta& target = r.ctas[static_cast<size_t>(rank)];
    if (target.finished == target.threads)
    {
        // On a GPU its shared memory may already be another CTA's: a cluster.sync before exiting
        // keeps a CTA's shared memory until the others are done with it.
        fail("map_shared_rank at %s:%d: CTA %d of the cluster has exited", file, line, rank);
    }
    auto const* const byte = static_cast<unsigned char const*>(address);
    Cta const& own = currentCta();
    if (byte >= own.shared->start() && byte < own.shared->start() + own.shared->size())
    {
        return target.shared->start() + (byte - own.shared->start());
    }
    if (byte >= __start_mra_emulated_shared && byte < __stop_mra_emulated_shared)
    {
        // A fiber runs only while its CTA is resident; the others' copies are set aside.
        size_t const offset = static_cast<size_t>(byte - __start_mra_emulated_shared);
        return static_cast<unsigned>(rank) == r.residentCta ? const_cast<unsigned char*>(byte)
                                                            : target.staticShared.data() + offset;
    }
    fail("map_shared_rank at %s:%d: %p is not the CTA's shared memory", file, line, address);
}

namespace
{

//! Whether [address, address + bytes) lies in the CTA's dynamic or static shared memory.
bool isShared(unsigned char const* address, int bytes)
{
    auto within = [&](unsigned char const* begin, unsigned char const* end) {
        return begin != nullptr && address >= begin && address + bytes <= end;
    };
    Cta const& own = currentCta();
    return within(own.shared->start(), own.shared->start() + own.shared->size())
        || within(__start_mra_emulated_shared, __stop_mra_emulated_shared);
}

} // namespace

#ifdef MRA_EMULATION_MEMORY_COUNTS
bool accessor(void const* address, int bytes, Accessor& who)
{
    Runtime const& r = runtime();
    if (r.current == nullptr || r.current->raceIgnores > 0)
    {
        return false;
    }
    Fiber const& fiber = *r.current;
    who = Accessor{fiberIndex(fiber), fiber.warp, fiber.thread % kWarpSize,
        isShared(static_cast<unsigned char const*>(address), bytes)};
    return true;
}
#endif

namespace
{

//! Where the schedule lands a copy: at once (0), at the wait (1), either (a random schedule).
bool landsAtOnce()
{
    Runtime& r = runtime();
    return r.schedule == 0 || (r.schedule > 1 && (r.random() & 1u) != 0);
}

} // namespace

void asyncCopy(char const* file, int line, void* shared, void const* global, int bytes, int sourceBytes)
{
    auto* const destination = static_cast<unsigned char*>(shared);
    auto const* const source = static_cast<unsigned char const*>(global);
    if (bytes != 4 && bytes != 8 && bytes != 16)
    {
        fail("cp.async at %s:%d of %d bytes: 4, 8 or 16 only", file, line, bytes);
    }
    if (sourceBytes < 0 || sourceBytes > bytes)
    {
        fail("cp.async at %s:%d reads %d of its %d bytes", file, line, sourceBytes, bytes);
    }
    if (reinterpret_cast<uintptr_t>(destination) % bytes != 0 || reinterpret_cast<uintptr_t>(source) % bytes != 0)
    {
        fail("cp.async at %s:%d: %p to %p is not %d-byte aligned", file, line, global, shared, bytes);
    }
    if (!isShared(destination, bytes))
    {
        fail("cp.async at %s:%d: %p is not in the CTA's shared memory", file, line, shared);
    }
    AsyncCopy copy{destination, source, bytes, sourceBytes};
    race::write(destination, static_cast<size_t>(bytes)); // it may land from now on (and at landing)
#ifdef MRA_EMULATION_MEMORY_COUNTS
    recordAccess(__builtin_return_address(0), destination, bytes, true); // its store to shared memory
    recordAccess(__builtin_return_address(0), source, sourceBytes, false); // and its read, if any
#endif
    if (landsAtOnce())
    {
        copy.land();
    }
    EmulationWork const bookkeeping;
    currentFiber().openCopies.push_back(copy);
}

void asyncCommit()
{
    EmulationWork const bookkeeping;
    Fiber& fiber = currentFiber();
    fiber.committedCopies.push_back(std::move(fiber.openCopies));
    fiber.openCopies.clear();
}

void asyncWait(int pending)
{
    Fiber& fiber = currentFiber();
    while (fiber.committedCopies.size() > static_cast<size_t>(std::max(pending, 0)))
    {
        for (AsyncCopy& copy : fiber.committedCopies.front())
        {
            copy.land(); // seen: the copy's write
        }
        EmulationWork const bookkeeping;
        fiber.committedCopies.pop_front();
    }
}

void gridDependencyWait()
{
    Runtime& r = runtime();
    Fiber& fiber = currentFiber();
    fiber.waitedForPreviousKernel = true;
    if (!r.dependentLaunch || r.awaited.empty())
    {
        return;
    }
    // Parked until no thread that has not waited can run: the awaited memory, open to this thread
    // from now on and closed to those, then opens once for the CTA instead of once per thread
    // (two mprotect calls per span and thread made the emulation tests 8x slower, docs/gpu.md).
    EmulationWork const bookkeeping;
    fiber.state = State::Parked;
    r.parked.push_back(fiberIndex(fiber));
    switchToScheduler();
}

void setAwaitedMemory(std::vector<std::pair<void*, size_t>> spans)
{
    size_t const page = pageSize();
    for (auto const& [start, bytes] : spans)
    {
        if (reinterpret_cast<uintptr_t>(start) % page != 0 || bytes % page != 0)
        {
            throw std::invalid_argument("setAwaitedMemory: a span not made of whole pages");
        }
    }
    Runtime& r = runtime();
    std::lock_guard<std::mutex> const lock(r.launchMutex);
    r.awaited = std::move(spans);
}

void ignoreRacesBegin()
{
    ++currentFiber().raceIgnores;
    race::ignoreBegin();
}

void ignoreRacesEnd()
{
    --currentFiber().raceIgnores;
    race::ignoreEnd();
}

void setFaultNames(std::vector<NamedMemory> names)
{
    Runtime& r = runtime();
    std::lock_guard<std::mutex> const lock(r.launchMutex);
    r.faultNames = std::move(names);
}

namespace
{

//! The name of the first named memory (setFaultNames') that [address, address + bytes) touches,
//! of the overruns alone if `overrunsOnly`; nullptr where none.
char const* nameOf(void const* address, size_t bytes, bool overrunsOnly)
{
    auto const* begin = static_cast<unsigned char const*>(address);
    for (NamedMemory const& named : runtime().faultNames)
    {
        auto const* start = static_cast<unsigned char const*>(named.start);
        if ((named.overrun || !overrunsOnly) && begin < start + named.bytes && start < begin + bytes)
        {
            return named.name.c_str();
        }
    }
    return nullptr;
}

} // namespace

char const* overrunAt(void const* address, int bytes)
{
    return nameOf(address, static_cast<size_t>(bytes), true);
}

CodePlace codePlace(void const* code)
{
    Dl_info module{};
    bool const known = dladdr(code, &module) != 0 && module.dli_fname != nullptr;
    return CodePlace{known ? module.dli_fname : "?",
        reinterpret_cast<uintptr_t>(code) - (known ? reinterpret_cast<uintptr_t>(module.dli_fbase) : 0u)};
}

namespace
{

constexpr int kFaultLineBytes = 1024;

//! A signal handler's one line on stderr (`length` as snprintf returned it, perhaps cut), then
//! `before` restored for `signal`, so that the process still dies of it once the handler returns.
void reportAndRestore(char const* line, int length, int signal, struct sigaction const& before)
{
    ssize_t const written = write(STDERR_FILENO, line, static_cast<size_t>(std::clamp(length, 0, kFaultLineBytes - 1)));
    static_cast<void>(written);
    sigaction(signal, &before, nullptr);
}

//! The thread running when a signal came (thread 0 outside any).
unsigned faultingThread()
{
    Runtime const& r = runtime();
    return r.current != nullptr ? r.current->thread : 0u;
}

//! SIGSEGV while a grid runs: one line naming the thread, its block and the memory it touched,
//! then the handler from before the grid takes the same fault again (Python's faulthandler,
//! or the default action), so the process still dies of it.
void reportFault(int, siginfo_t* info, void*)
{
    Runtime& r = runtime();
    char const* const named = nameOf(info->si_addr, 1, false);
    char const* const where
        = named != nullptr ? named : "outside the memory the emulation has names for (past or before a caller's buffer?)";
    char line[kFaultLineBytes];
    int const length = std::snprintf(line, sizeof(line), "CUDA emulation: thread %u of block %u touched %p %s\n",
        faultingThread(), blockIdx.x, info->si_addr, where);
    reportAndRestore(line, length, SIGSEGV, r.actionBefore);
}

//! SIGILL while a grid runs: a trap -fsanitize=alignment,bounds put in the kernels' source (CMake
//! builds it so) before a load or store off its type's alignment (a float4 not 16-byte aligned,
//! a GPU's "misaligned address") or an index past a fixed-size array. The trap does not say
//! which. One line naming the thread, its block and the code's place, then the handler from
//! before.
void reportTrappedAccess(int, siginfo_t* info, void*)
{
    Runtime& r = runtime();
    CodePlace const place = codePlace(info->si_addr);
    char line[kFaultLineBytes];
    int const length = std::snprintf(line, sizeof(line),
        "CUDA emulation: thread %u of block %u made a misaligned access or indexed past an array (a trap of "
        "-fsanitize=alignment,bounds), at %s+%#lx (its function: addr2line -f -C -e that file %#lx)\n",
        faultingThread(), blockIdx.x, place.file, static_cast<unsigned long>(place.offset),
        static_cast<unsigned long>(place.offset));
    reportAndRestore(line, length, SIGILL, r.illegalBefore);
}

//! reportFault and reportTrappedAccess installed for as long as it lives.
class FaultReporting
{
public:
    explicit FaultReporting(Runtime& runtime)
        : mRuntime(runtime)
    {
        struct sigaction action{};
        action.sa_sigaction = reportFault;
        action.sa_flags = SA_SIGINFO;
        sigemptyset(&action.sa_mask);
        sigaction(SIGSEGV, &action, &mRuntime.actionBefore);
        action.sa_sigaction = reportTrappedAccess;
        sigaction(SIGILL, &action, &mRuntime.illegalBefore);
    }

    ~FaultReporting()
    {
        sigaction(SIGSEGV, &mRuntime.actionBefore, nullptr);
        sigaction(SIGILL, &mRuntime.illegalBefore, nullptr);
    }

private:
    Runtime& mRuntime;
};

} // namespace

void setSchedule(uint32_t schedule)
{
    Runtime& r = runtime();
    std::lock_guard<std::mutex> const lock(r.launchMutex);
    r.schedule = schedule;
    r.random.seed(schedule);
}

void setMaxDynamicShared(void const* kernel, size_t bytes)
{
    Runtime& r = runtime();
    std::lock_guard<std::mutex> const lock(r.launchMutex);
    r.sharedOptIn[kernel] = std::max(bytes, kDefaultDynamicShared);
}

void runGrid(void const* kernel, dim3 grid, dim3 block, size_t sharedBytes, std::function<void()> const& body,
    bool dependent, unsigned clusterSize)
{
    Runtime& r = runtime();
    std::lock_guard<std::mutex> const lock(r.launchMutex);
    if (grid.x == 0 || block.x == 0 || block.x > kMaxThreadsPerBlock || grid.y != 1 || grid.z != 1 || block.y != 1
        || block.z != 1)
    {
        r.lastError = cudaErrorInvalidConfiguration; // 1-D grids and blocks are all the kernels use
        return;
    }
    if (clusterSize == 0 || clusterSize > kMaxClusterSize || grid.x % clusterSize != 0)
    {
        r.lastError = cudaErrorInvalidClusterSize; // CUDA's portable limit, and whole clusters only
        return;
    }
    auto const optIn = r.sharedOptIn.find(kernel);
    if (sharedBytes > (optIn == r.sharedOptIn.end() ? kDefaultDynamicShared : optIn->second))
    {
        r.lastError = cudaErrorInvalidValue; // as CUDA: more than the kernel's opt-in allows
        return;
    }
    r.ctas = std::vector<Cta>(clusterSize); // built in place: a GuardedBuffer does not move
    r.largestCluster = std::max(r.largestCluster, clusterSize);
    r.lastLaunchThreads = block.x;
    try
    {
        for (Cta& cta : r.ctas)
        {
            cta.shared.emplace(sharedBytes, 128);
            cta.staticShared.resize(clusterSize > 1 ? staticSharedBytes() : 0);
        }
    }
    catch (std::bad_alloc const&)
    {
        r.lastError = cudaErrorMemoryAllocation;
        return;
    }
    r.body = &body;
    r.dependentLaunch = dependent;
#ifdef MRA_EMULATION_MEMORY_COUNTS
    memoryCountsLaunch(kernel, block.x, sharedBytes, clusterSize);
#endif
    FaultReporting const reporting(r);
    gridDim = grid;
    blockDim = block;
    for (unsigned c : ctaOrder(grid.x / clusterSize))
    {
        for (unsigned rank = 0; rank < clusterSize; ++rank)
        {
            Cta& cta = r.ctas[rank];
            cta.index = dim3(c * clusterSize + rank);
            cta.shared->poison();
            std::fill(cta.staticShared.begin(), cta.staticShared.end(), static_cast<unsigned char>(0xff));
        }
        poisonStaticShared(); // CTA 0's, resident first
        r.residentCta = 0;
        r.error.clear();
        race::release(&r.raceClusterStart); // the launch's inputs and the clusters before
        bool const ran = runCluster(block.x);
        race::acquire(&r.raceClusterEnd);
        lockAwaited(r, false);
        for (Cta const& cta : r.ctas)
        {
            if (ran && r.error.empty() && !cta.shared->canaryIntact())
            {
                r.error = "wrote past its " + std::to_string(sharedBytes) + " bytes of dynamic shared memory";
                r.errorBlock = cta.index.x;
            }
        }
        if (!r.error.empty())
        {
            r.lastError = cudaErrorLaunchFailure;
            r.lastMessage = "unspecified launch failure (CUDA emulation, block " + std::to_string(r.errorBlock) + ": "
                + r.error + ")";
            return;
        }
    }
}

void setMultiprocessors(unsigned count)
{
    Runtime& r = runtime();
    std::lock_guard<std::mutex> const lock(r.launchMutex);
    r.multiprocessors = count;
}

unsigned multiprocessors()
{
    return runtime().multiprocessors;
}

unsigned takeLargestCluster()
{
    Runtime& r = runtime();
    std::lock_guard<std::mutex> const lock(r.launchMutex);
    unsigned const largest = r.largestCluster;
    r.largestCluster = 0;
    return largest;
}

unsigned lastLaunchThreads()
{
    Runtime& r = runtime();
    std::lock_guard<std::mutex> const lock(r.launchMutex);
    return r.lastLaunchThreads;
}

} // namespace emu

cudaError_t cudaGetLastError()
{
    emu::Runtime& r = emu::runtime();
    cudaError_t const error = r.lastError;
    r.lastError = cudaSuccess;
    return error;
}

char const* cudaGetErrorString(cudaError_t error)
{
    switch (error)
    {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidClusterSize: return "invalid cluster size";
    case cudaErrorLaunchFailure: return emu::runtime().lastMessage.c_str();
    }
    return "unknown error";
}

cudaError_t cudaGetDevice(int* device)
{
    *device = 0;
    return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device)
{
    if (attribute != cudaDevAttrMultiProcessorCount || device != 0)
    {
        return cudaErrorInvalidValue;
    }
    *value = static_cast<int>(emu::multiprocessors());
    return cudaSuccess;
}

//! For tests: the schedule of every later launch (see emu::setSchedule). A correct kernel gives
//! bit-identical results under every schedule.
extern "C" __attribute__((visibility("default"))) void mraCudaEmulationSetSchedule(uint32_t schedule)
{
    emu::setSchedule(schedule);
}

//! For tests: the multiprocessors cudaDeviceGetAttribute reports from now on (132 at first, an
//! H100's or H200's), so that launches which size themselves to the GPU take their other shapes.
extern "C" __attribute__((visibility("default"))) void mraCudaEmulationSetMultiprocessors(uint32_t count)
{
    emu::setMultiprocessors(count);
}

//! For tests: the CTAs of the largest cluster launched since the last call (1: none; 0: no launch).
extern "C" __attribute__((visibility("default"))) uint32_t mraCudaEmulationTakeLargestCluster()
{
    return emu::takeLargestCluster();
}

//! For tests: the threads per CTA of the last kernel launched (0: none yet); for the attention,
//! its high-resolution kernel's, which tells whether it split the query blocks' key blocks.
extern "C" __attribute__((visibility("default"))) uint32_t mraCudaEmulationLastLaunchThreads()
{
    return emu::lastLaunchThreads();
}
