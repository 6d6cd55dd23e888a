/*
 * The emulated kernels' workspace with each section fenced, as mra_export/native.py fences each
 * whole buffer: a section overrun by the kernels faults the process or fails the call, where on a
 * GPU it would silently read or write the next section.
 *
 * The sections are also what each kernel after the first reads from the kernels before it: the
 * emulation keeps them inaccessible to each thread of such a kernel until it waits for the one
 * before (emu::setAwaitedMemory), so that a read before griddepcontrol.wait faults. The line the
 * emulation prints on a fault names the gap or section touched (emu::setFaultNames).
 *
 * CMake builds the emulated libraries with mraAttentionCommon.cpp under MRA_FENCED_WORKSPACE, so
 * that makeLayout places every section by placeFencedSection below (a page kept free after each),
 * and with the kernels' own mraAttentionCuda and mraLastCudaError renamed *Unfenced, so that the
 * ones below wrap them. The emulation runs launches synchronously: when the kernels' entry point
 * returns, they have finished, and the gaps can be checked and given back.
 */
#include "cudaEmulation.h"
#include "fencedGaps.h"
#include "mraAttentionCommon.h"

#include <string>
#include <vector>

extern "C" MraStatus mraAttentionCudaUnfenced(MraAttentionParams const* params, void const* query, void const* key,
    void const* value, int32_t const* mask, void* output, void* workspace, size_t workspaceSize, void* stream);
extern "C" char const* mraLastCudaErrorUnfenced(void);

namespace
{

//! Which edge of each section lies against its unmapped page: the end (0), as the callers'
//! default fence, or the start (1).
uint32_t gFlushSide = 0;

thread_local std::string gFenceError;

//! Where a fenced section may start: the kernels' widest access (a float4, a 16-byte cp.async)
//! needs no more, so a section ends less than 16 bytes before its page where the packed layout's
//! 256 bytes would leave up to 255 that a read past it could reach unseen.
constexpr size_t kFencedAlignment = 16;

size_t roundUp(size_t bytes, size_t multiple)
{
    return (bytes + multiple - 1) / multiple * multiple;
}

std::vector<emu::Section> sectionsOf(MraAttentionParams const& params)
{
    mra::Problem const problem = mra::makeProblem(params);
    mra::WorkspaceLayout const layout = mra::makeLayout(problem);
    std::vector<emu::Section> sections;
    for (mra::WorkspaceSection const& section : mra::workspaceSections(problem))
    {
        size_t const begin = layout.*section.offset;
        sections.push_back(emu::Section{section.name, begin, begin + section.bytes});
    }
    return sections;
}

//! The whole pages each section lies on: what a dependent kernel may touch only after its wait.
std::vector<std::pair<void*, size_t>> pagesOf(unsigned char* buffer, std::vector<emu::Section> const& sections)
{
    size_t const page = emu::pageSize();
    std::vector<std::pair<void*, size_t>> spans;
    for (emu::Section const& section : sections)
    {
        size_t const first = section.begin / page * page;
        spans.emplace_back(buffer + first, roundUp(section.end, page) - first);
    }
    return spans;
}

//! What a fault in the workspace means (the first name that holds the address): on a section's
//! pages (the canaries beside it included), which fault only while awaited, an access before
//! griddepcontrol.wait; on a gap's unmapped pages, an overrun. The gaps, whole, are the overrun
//! memory the memory-counts build fails any access to (emu::overrunAt).
std::vector<emu::NamedMemory> faultNames(emu::FencedGaps const& gaps, std::vector<emu::Section> const& sections,
    std::vector<std::pair<void*, size_t>> const& pages)
{
    std::vector<emu::NamedMemory> names;
    for (size_t i = 0; i < sections.size(); ++i)
    {
        names.push_back(emu::NamedMemory{pages[i].first, pages[i].second,
            std::string("in workspace section ") + sections[i].name
                + " before griddepcontrol.wait (a kernel before this one writes it)"});
    }
    gaps.forEachGap([&names](std::string const& gap, unsigned char const* start, size_t bytes) {
        names.push_back(emu::NamedMemory{start, bytes, "in the workspace " + gap + " (a section overrun)", true});
    });
    return names;
}

//! The workspace described to the emulation for as long as it lives: its sections awaited by
//! the dependent launches, and the names of faults in it.
class DescribedWorkspace
{
public:
    DescribedWorkspace(unsigned char* buffer, emu::FencedGaps const& gaps, std::vector<emu::Section> const& sections)
    {
        std::vector<std::pair<void*, size_t>> pages = pagesOf(buffer, sections);
        emu::setFaultNames(faultNames(gaps, sections, pages));
        emu::setAwaitedMemory(std::move(pages));
    }

    ~DescribedWorkspace()
    {
        emu::setAwaitedMemory({});
        emu::setFaultNames({});
    }

    DescribedWorkspace(DescribedWorkspace const&) = delete;
    DescribedWorkspace& operator=(DescribedWorkspace const&) = delete;
};

MraStatus failWith(MraStatus status, std::string message)
{
    gFenceError = std::move(message);
    return status;
}

} // namespace

size_t mra::placeFencedSection(size_t& offset, size_t bytes)
{
    size_t const page = emu::pageSize();
    size_t start = offset; // flush after the page before it (offset is always on a page)
    if (gFlushSide == 0)
    {
        // As late as the alignment allows: its end less than 16 bytes before the next page.
        start = (roundUp(offset + bytes, page) - bytes) / kFencedAlignment * kFencedAlignment;
    }
    offset = roundUp(start + bytes, page) + page;
    return start;
}

extern "C" __attribute__((visibility("default"))) void mraCudaEmulationSetWorkspaceFence(uint32_t side)
{
    gFlushSide = side;
}

extern "C" MraStatus mraAttentionCuda(MraAttentionParams const* params, void const* query, void const* key,
    void const* value, int32_t const* mask, void* output, void* workspace, size_t workspaceSize, void* stream)
{
    gFenceError.clear();
    // The kernels check their arguments before the workspace's size: given none, they answer
    // MRA_WORKSPACE_TOO_SMALL only for a call they would run, and touch no memory.
    MraStatus const verdict = mraAttentionCudaUnfenced(params, query, key, value, mask, output, workspace, 0, stream);
    size_t const fencedSize = verdict == MRA_WORKSPACE_TOO_SMALL ? mraWorkspaceSize(params) : 0;
    if (verdict != MRA_WORKSPACE_TOO_SMALL || workspaceSize < fencedSize)
    {
        return verdict; // fencing pages past a short workspace would take the caller's memory
    }
    auto* const buffer = static_cast<unsigned char*>(workspace);
    if (reinterpret_cast<uintptr_t>(buffer) % emu::pageSize() != 0)
    {
        return failWith(
            MRA_CUDA_ERROR, "the emulated kernels' workspace must start on a page (its sections are fenced by pages)");
    }
    try
    {
        std::vector<emu::Section> const sections = sectionsOf(*params);
        emu::FencedGaps const gaps(buffer, fencedSize, sections);
        DescribedWorkspace const described(buffer, gaps, sections);
        MraStatus const status
            = mraAttentionCudaUnfenced(params, query, key, value, mask, output, workspace, workspaceSize, stream);
        std::string const intruded = gaps.intrudedGap();
        if (status == MRA_OK && !intruded.empty())
        {
            return failWith(MRA_CUDA_ERROR, "the kernels wrote into the workspace " + intruded);
        }
        return status;
    }
    catch (std::exception const& error)
    {
        return failWith(MRA_CUDA_ERROR, error.what());
    }
}

extern "C" char const* mraLastCudaError(void)
{
    return gFenceError.empty() ? mraLastCudaErrorUnfenced() : gFenceError.c_str();
}
