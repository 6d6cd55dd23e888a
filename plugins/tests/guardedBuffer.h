/*
 * Test memory that shows overruns, for what plugins/tests hands to code under test as device
 * memory: the emulated kernels' dynamic shared memory and the plugin runner's workspace.
 * Exactly `bytes` bytes, `alignment`-aligned, ending less than `alignment` bytes before an
 * unmapped page: an access past that page faults, and a write into the gap before it changes a
 * canary (canaryIntact). poison() fills the bytes with 0xff, as garbage (NaN where read as float).
 */
#ifndef MRA_PLUGIN_TESTS_GUARDED_BUFFER_H
#define MRA_PLUGIN_TESTS_GUARDED_BUFFER_H

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>

namespace checks
{

class GuardedBuffer
{
public:
    //! Poisoned from the start; throws std::bad_alloc if the pages cannot be mapped.
    GuardedBuffer(size_t bytes, size_t alignment)
        : mBytes(bytes)
    {
        size_t const page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
        mMapped = ((bytes + alignment + page - 1) / page + 1) * page;
        void* mapped = mmap(nullptr, mMapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mapped == MAP_FAILED)
        {
            throw std::bad_alloc();
        }
        mBase = static_cast<unsigned char*>(mapped);
        mGuard = mBase + mMapped - page;
        mprotect(mGuard, page, PROT_NONE);
        mStart = reinterpret_cast<unsigned char*>(
            (reinterpret_cast<uintptr_t>(mGuard) - bytes) & ~(static_cast<uintptr_t>(alignment) - 1));
        poison();
    }

    ~GuardedBuffer()
    {
        munmap(mBase, mMapped);
    }

    GuardedBuffer(GuardedBuffer const&) = delete;
    GuardedBuffer& operator=(GuardedBuffer const&) = delete;

    void poison()
    {
        std::memset(mStart, 0xff, mBytes);
        std::memset(mStart + mBytes, kCanary, static_cast<size_t>(mGuard - (mStart + mBytes)));
    }

    bool canaryIntact() const
    {
        return std::all_of(mStart + mBytes, mGuard, [](unsigned char byte) { return byte == kCanary; });
    }

    unsigned char* start() const
    {
        return mStart;
    }

    size_t size() const
    {
        return mBytes;
    }

private:
    static constexpr unsigned char kCanary = 0xa5;
    size_t mBytes;
    size_t mMapped{0};
    unsigned char* mBase{nullptr};
    unsigned char* mGuard{nullptr};
    unsigned char* mStart{nullptr};
};

} // namespace checks

#endif // MRA_PLUGIN_TESTS_GUARDED_BUFFER_H
