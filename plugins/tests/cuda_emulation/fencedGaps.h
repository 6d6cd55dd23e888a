/*
 * The gaps between the sections of one buffer, fenced for as long as a FencedGaps lives: every
 * whole page of a gap is unmapped, so a read or write into it faults the process; every other
 * byte of a gap holds a canary, so a write there shows in intrudedGap(). The CUDA emulation puts
 * the kernels' workspace sections in such a buffer (fencedWorkspace.cpp), as compute-sanitizer's
 * memcheck would see a section overrun on a GPU only where it left the allocation.
 */
#ifndef MRA_CUDA_EMULATION_FENCED_GAPS_H
#define MRA_CUDA_EMULATION_FENCED_GAPS_H

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace emu
{

//! Bytes [begin, end) of a buffer, in use by what `name` names.
struct Section
{
    char const* name;
    size_t begin, end;
};

inline size_t pageSize()
{
    static size_t const page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    return page;
}

class FencedGaps
{
public:
    //! `buffer`: `size` bytes, page-aligned; `sections` in ascending order inside it, apart.
    //! Throws std::runtime_error, with nothing left unmapped, where a page cannot be unmapped.
    FencedGaps(unsigned char* buffer, size_t size, std::vector<Section> const& sections)
        : mBuffer(buffer)
    {
        size_t previousEnd = 0;
        std::string previousName;
        for (Section const& section : sections)
        {
            std::string const name = section.name;
            addGap(previousEnd, section.begin,
                previousName.empty() ? "before " + name : "between " + previousName + " and " + name);
            previousEnd = section.end;
            previousName = section.name;
        }
        addGap(previousEnd, size, "after " + previousName);
        for (size_t i = 0; i < mGaps.size(); ++i)
        {
            Gap const& gap = mGaps[i];
            std::memset(mBuffer + gap.begin, kCanary, gap.pagesBegin - gap.begin);
            std::memset(mBuffer + gap.pagesEnd, kCanary, gap.end - gap.pagesEnd);
            if (!protect(gap, PROT_NONE))
            {
                std::string const reason = std::strerror(errno);
                while (i-- > 0)
                {
                    protect(mGaps[i], PROT_READ | PROT_WRITE);
                }
                throw std::runtime_error("mprotect of the gap " + gap.name + ": " + reason);
            }
        }
    }

    //! The pages go back to read and write: the buffer is the caller's.
    ~FencedGaps()
    {
        for (Gap const& gap : mGaps)
        {
            protect(gap, PROT_READ | PROT_WRITE);
        }
    }

    FencedGaps(FencedGaps const&) = delete;
    FencedGaps& operator=(FencedGaps const&) = delete;

    //! "" while every canary holds, else the first gap written ("between lowLogits and rowMax").
    std::string intrudedGap() const
    {
        auto const intact = [this](size_t begin, size_t end) {
            return std::all_of(mBuffer + begin, mBuffer + end, [](unsigned char byte) { return byte == kCanary; });
        };
        for (Gap const& gap : mGaps)
        {
            if (!intact(gap.begin, gap.pagesBegin) || !intact(gap.pagesEnd, gap.end))
            {
                return gap.name;
            }
        }
        return std::string();
    }

    //! visit(name, start, bytes) for each gap, whole.
    template <typename Visit>
    void forEachGap(Visit visit) const
    {
        for (Gap const& gap : mGaps)
        {
            visit(gap.name, mBuffer + gap.begin, gap.end - gap.begin);
        }
    }

    //! visit(name, start, bytes) for the unmapped pages of each gap that has some.
    template <typename Visit>
    void forEachUnmapped(Visit visit) const
    {
        for (Gap const& gap : mGaps)
        {
            if (gap.pagesEnd > gap.pagesBegin)
            {
                visit(gap.name, mBuffer + gap.pagesBegin, gap.pagesEnd - gap.pagesBegin);
            }
        }
    }

private:
    static constexpr unsigned char kCanary = 0xa5;

    //! Bytes [begin, end) between two sections; [pagesBegin, pagesEnd) its whole pages.
    struct Gap
    {
        std::string name;
        size_t begin, end, pagesBegin, pagesEnd;
    };

    void addGap(size_t begin, size_t end, std::string name)
    {
        if (end <= begin)
        {
            return;
        }
        size_t const page = pageSize();
        size_t const pagesBegin = std::min((begin + page - 1) / page * page, end);
        size_t const pagesEnd = std::max(end / page * page, pagesBegin);
        mGaps.push_back(Gap{std::move(name), begin, end, pagesBegin, pagesEnd});
    }

    bool protect(Gap const& gap, int protection) const
    {
        return gap.pagesEnd == gap.pagesBegin
            || mprotect(mBuffer + gap.pagesBegin, gap.pagesEnd - gap.pagesBegin, protection) == 0;
    }

    unsigned char* mBuffer;
    std::vector<Gap> mGaps;
};

} // namespace emu

#endif // MRA_CUDA_EMULATION_FENCED_GAPS_H
