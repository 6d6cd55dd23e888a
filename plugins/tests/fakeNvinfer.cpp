/*
 * A stand-in for TensorRT's runtime library, built as libnvinfer.so.<NV_TENSORRT_MAJOR> (its
 * soname too) in the build folder, for selfRegistrationTest.cpp: getPluginRegistry() returns a
 * registry that keeps creators as TensorRT's does (one per name, version and namespace) and
 * records each registerCreator and deregisterCreator call. Nothing else of TensorRT is here.
 * Destroyed at exit with creators still registered, it says so and exits with status 3: loaded
 * before the plugin's libraries, it is destroyed after their destructors, by which the triton
 * library must have withdrawn its registration (the test withdraws the ones it makes).
 */
#include "NvInferRuntime.h"

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

//! "name version 'namespace'" of a creator (V3 creators name themselves; older kinds are not ours).
std::string describe(IPluginCreatorInterface const& creator, AsciiChar const* pluginNamespace)
{
    if (std::strcmp(creator.getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") != 0)
    {
        return std::string("<") + creator.getInterfaceInfo().kind + ">";
    }
    auto const& v3 = static_cast<IPluginCreatorV3One const&>(creator);
    return std::string(v3.getPluginName()) + " " + v3.getPluginVersion() + " '" + pluginNamespace + "'";
}

class RecordingRegistry : public IPluginRegistry
{
public:
    struct Entry
    {
        IPluginCreatorInterface* creator;
        std::string key; //!< describe(creator, its namespace)
    };

    ~RecordingRegistry() noexcept override
    {
        for (Entry const& entry : mEntries)
        {
            std::printf("FAILED: %s still registered at exit\n", entry.key.c_str());
        }
        if (!mEntries.empty())
        {
            std::fflush(stdout);
            _exit(3);
        }
    }

    bool registerCreator(IPluginCreatorInterface& creator, AsciiChar const* const pluginNamespace) noexcept override
    {
        std::lock_guard<std::mutex> lock(mMutex);
        std::string key = describe(creator, pluginNamespace);
        bool const taken = find(key) != nullptr;
        if (!taken)
        {
            mEntries.push_back({&creator, key});
        }
        mEvents.push_back("registerCreator " + key + (taken ? " refused" : " accepted"));
        return !taken;
    }

    bool deregisterCreator(IPluginCreatorInterface const& creator) noexcept override
    {
        std::lock_guard<std::mutex> lock(mMutex);
        for (auto it = mEntries.begin(); it != mEntries.end(); ++it)
        {
            if (it->creator == &creator)
            {
                mEvents.push_back("deregisterCreator " + it->key);
                mEntries.erase(it);
                return true;
            }
        }
        mEvents.push_back("deregisterCreator <not registered>");
        return false;
    }

    IPluginCreatorInterface* getCreator(AsciiChar const* const pluginName, AsciiChar const* const pluginVersion,
        AsciiChar const* const pluginNamespace) noexcept override
    {
        std::lock_guard<std::mutex> lock(mMutex);
        std::string const space = pluginNamespace != nullptr ? pluginNamespace : "";
        Entry const* entry = find(std::string(pluginName) + " " + pluginVersion + " '" + space + "'");
        return entry != nullptr ? entry->creator : nullptr;
    }

    IPluginCreatorInterface* const* getAllCreators(int32_t* const numCreators) const noexcept override
    {
        std::lock_guard<std::mutex> lock(mMutex);
        mAll.clear();
        for (Entry const& entry : mEntries)
        {
            mAll.push_back(entry.creator);
        }
        *numCreators = static_cast<int32_t>(mAll.size());
        return mAll.empty() ? nullptr : mAll.data();
    }

    IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const numCreators) noexcept override
    {
        return getAllCreators(numCreators);
    }

    // Not used by plugin libraries: inert.
    void setErrorRecorder(IErrorRecorder* const) noexcept override {}
    IErrorRecorder* getErrorRecorder() const noexcept override
    {
        return nullptr;
    }
    bool isParentSearchEnabled() const override
    {
        return false;
    }
    void setParentSearchEnabled(bool const) override {}
    PluginLibraryHandle loadLibrary(AsciiChar const*) noexcept override
    {
        return nullptr;
    }
    void deregisterLibrary(PluginLibraryHandle) noexcept override {}
    IPluginResource* acquirePluginResource(AsciiChar const*, IPluginResource*) noexcept override
    {
        return nullptr;
    }
    int32_t releasePluginResource(AsciiChar const*) noexcept override
    {
        return -1;
    }

    std::vector<std::string> events() const
    {
        std::lock_guard<std::mutex> lock(mMutex);
        return mEvents;
    }

private:
    Entry const* find(std::string const& key) const
    {
        for (Entry const& entry : mEntries)
        {
            if (entry.key == key)
            {
                return &entry;
            }
        }
        return nullptr;
    }

    mutable std::mutex mMutex;
    std::vector<Entry> mEntries;
    std::vector<std::string> mEvents;
    mutable std::vector<IPluginCreatorInterface*> mAll;
};

RecordingRegistry gRegistry;
thread_local std::string gEvent;

} // namespace

extern "C" TENSORRTAPI IPluginRegistry* getPluginRegistry() noexcept
{
    return &gRegistry;
}

//! How many registerCreator/deregisterCreator calls the registry has seen.
extern "C" TENSORRTAPI int32_t fakeRegistryEventCount() noexcept
{
    return static_cast<int32_t>(gRegistry.events().size());
}

//! Call `index`: "registerCreator NAME VERSION 'NAMESPACE' accepted|refused" or
//! "deregisterCreator NAME VERSION 'NAMESPACE'" (valid until the next call on this thread).
extern "C" TENSORRTAPI char const* fakeRegistryEvent(int32_t index) noexcept
{
    std::vector<std::string> const events = gRegistry.events();
    gEvent = index >= 0 && index < static_cast<int32_t>(events.size()) ? events[index] : "";
    return gEvent.c_str();
}
