/*
 * Who registers the MraAttention creator when, against a fake libnvinfer.so.<MAJOR> (fakeNvinfer.cpp,
 * whose registry records each call): TensorRT's loadLibrary opens the plugin library and registers
 * what getCreators returns; Triton's tensorrt backend only dlopens the libraries it is given, here
 * the triton library, which registers the plugin library's creator itself.
 *   - the plugin library, opened without TensorRT or after it (RTLD_LOCAL, as Triton loads it):
 *     no registry call at all, however it is opened; loadLibrary's registration is accepted;
 *   - the triton library, opened without TensorRT: it opens (its plugin library found beside it)
 *     and registers nothing, loading no libnvinfer;
 *   - opened after libnvinfer: one registerCreator of MraAttention 1 '', the plugin library's
 *     creator; unloaded: it deregisters (no creator left pointing into a library that is gone).
 *     Where dlclose leaves it mapped (glibc marks a library with GNU unique symbols NODELETE) its
 *     destructor runs at exit, and the fake registry checks at exit that nothing is left registered;
 *   - opened after loadLibrary registered the creator: its registration is refused, and it
 *     deregisters nothing of loadLibrary's when unloaded.
 * Each case runs in a process of its own (fork), before anything is loaded in it, and exits
 * normally (the destructors run).
 * Usage: mra_attention_plugin_registration_test path/to/libmra_attention_plugin.so
 *            path/to/libmra_attention_plugin_triton.so
 * Prints "N passed, M failed" and exits non-zero on any failure.
 */
#include "NvInferRuntime.h"
#include "expect.h"

#include <dlfcn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

using namespace nvinfer1;

using checks::expect;

namespace
{

std::string const kSoname = "libnvinfer.so." + std::to_string(NV_TENSORRT_MAJOR);
std::string const kRegistered = "registerCreator MraAttention 1 '' accepted";
std::string const kRefused = "registerCreator MraAttention 1 '' refused";
std::string const kDeregistered = "deregisterCreator MraAttention 1 ''";
using Events = std::vector<std::string>;

using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);

//! The fake libnvinfer, opened RTLD_LOCAL by its path (as Triton's backend opens the real one).
struct FakeTensorRT
{
    void* handle = nullptr;
    IPluginRegistry* registry = nullptr;
    int32_t (*eventCount)() = nullptr;
    char const* (*event)(int32_t) = nullptr;

    bool open()
    {
        handle = dlopen(MRA_FAKE_NVINFER, RTLD_NOW | RTLD_LOCAL);
        if (handle == nullptr)
        {
            std::printf("cannot load %s: %s\n", MRA_FAKE_NVINFER, dlerror());
            return false;
        }
        auto getRegistry = reinterpret_cast<decltype(&getPluginRegistry)>(dlsym(handle, "getPluginRegistry"));
        eventCount = reinterpret_cast<int32_t (*)()>(dlsym(handle, "fakeRegistryEventCount"));
        event = reinterpret_cast<char const* (*) (int32_t)>(dlsym(handle, "fakeRegistryEvent"));
        registry = getRegistry != nullptr ? getRegistry() : nullptr;
        return registry != nullptr && eventCount != nullptr && event != nullptr;
    }

    std::vector<std::string> events() const
    {
        std::vector<std::string> all;
        for (int32_t i = 0; i < eventCount(); ++i)
        {
            all.emplace_back(event(i));
        }
        return all;
    }

    int32_t registeredCount() const
    {
        int32_t count = -1;
        registry->getAllCreators(&count);
        return count;
    }
};

void printEvents(std::vector<std::string> const& events)
{
    for (std::string const& event : events)
    {
        std::printf("  registry call: %s\n", event.c_str());
    }
}

struct Libraries
{
    char const* plugin; //!< libmra_attention_plugin.so
    char const* triton; //!< libmra_attention_plugin_triton.so, beside it
};

bool sameFile(char const* a, char const* b)
{
    struct stat sa{};
    struct stat sb{};
    return a != nullptr && b != nullptr && stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev
        && sa.st_ino == sb.st_ino;
}

//! The one creator getCreators returns in the loaded `library`, or nullptr.
IPluginCreatorInterface* creatorOf(void* library)
{
    auto getCreators = library != nullptr ? reinterpret_cast<GetCreators>(dlsym(library, "getCreators")) : nullptr;
    int32_t count = 0;
    IPluginCreatorInterface* const* creators = getCreators != nullptr ? getCreators(count) : nullptr;
    return creators != nullptr && count == 1 ? creators[0] : nullptr;
}

//! Opens `path` in a process without TensorRT (expected to open, and to load no libnvinfer of its
//! own); nullptr where it did not open.
void* openWithoutTensorRT(char const* path, char const* opens)
{
    void* library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    expect(library != nullptr, opens);
    if (library == nullptr)
    {
        std::printf("  %s\n", dlerror());
        return nullptr;
    }
    expect(dlopen(kSoname.c_str(), RTLD_NOW | RTLD_NOLOAD) == nullptr, "it loads no libnvinfer itself");
    return library;
}

//! After the library was closed: TensorRT (the fake) loaded now finds nothing registered.
void expectNothingRegisteredAfterwards()
{
    FakeTensorRT fake;
    expect(fake.open(), "the fake libnvinfer opens afterwards");
    expect(fake.eventCount() == 0, "nothing was registered anywhere");
}

void pluginOpenedWithoutTensorRT(Libraries const& libraries)
{
    void* plugin = openWithoutTensorRT(libraries.plugin, "the plugin library opens in a process without TensorRT");
    if (plugin == nullptr)
    {
        return;
    }
    expect(creatorOf(plugin) != nullptr, "getCreators works without TensorRT");
    expect(dlclose(plugin) == 0, "dlclose");
    expectNothingRegisteredAfterwards();
}

void pluginOpenedAfterTensorRT(Libraries const& libraries)
{
    FakeTensorRT fake;
    bool const opened = fake.open();
    expect(opened, "the fake libnvinfer opens");
    void* bySoname = dlopen(kSoname.c_str(), RTLD_NOW | RTLD_NOLOAD);
    expect(bySoname != nullptr && bySoname == fake.handle,
        "RTLD_NOLOAD finds it by its soname although opened RTLD_LOCAL");
    if (bySoname != nullptr)
    {
        dlclose(bySoname);
    }
    void* plugin = opened ? dlopen(libraries.plugin, RTLD_NOW | RTLD_LOCAL) : nullptr;
    expect(plugin != nullptr, "the plugin library opens");
    if (plugin == nullptr)
    {
        return;
    }
    expect(fake.eventCount() == 0 && fake.registeredCount() == 0, "opening it calls the registry not at all");

    // TensorRT's loadLibrary: getCreators, then registerCreator of each creator it returned.
    IPluginCreatorInterface* creator = creatorOf(plugin);
    expect(creator != nullptr, "getCreators returns one creator");
    expect(fake.eventCount() == 0, "getCreators calls the registry not at all");
    if (creator == nullptr)
    {
        return;
    }
    expect(fake.registry->registerCreator(*creator, ""), "loadLibrary's registration is accepted");
    expect(fake.registry->getCreator("MraAttention", "1", "") == creator,
        "the registry finds MraAttention (as engine deserialisation looks it up)");

    // deregisterLibrary: deregisterCreator, then dlclose; the library calls nothing itself.
    expect(fake.registry->deregisterCreator(*creator), "deregisterLibrary's deregistration");
    expect(dlclose(plugin) == 0, "dlclose");
    Events const events = fake.events();
    expect(events == Events{kRegistered, kDeregistered}, "only loadLibrary's and deregisterLibrary's calls");
    if (checks::gFailed != 0)
    {
        printEvents(events);
    }
}

void tritonOpenedWithoutTensorRT(Libraries const& libraries)
{
    void* triton = openWithoutTensorRT(libraries.triton, "the triton library opens in a process without TensorRT");
    if (triton == nullptr)
    {
        return;
    }
    expect(dlclose(triton) == 0, "dlclose");
    expectNothingRegisteredAfterwards();
}

//! dlclose `triton`; whether it was unmapped (else its destructor runs at exit).
bool unloaded(char const* tritonPath, void* triton)
{
    expect(dlclose(triton) == 0, "dlclose of the triton library");
    void* stillMapped = dlopen(tritonPath, RTLD_NOW | RTLD_NOLOAD);
    if (stillMapped == nullptr)
    {
        return true;
    }
    std::printf("  (NODELETE: still mapped after dlclose, its destructor runs at exit; checked then)\n");
    dlclose(stillMapped);
    return false;
}

void tritonOpenedAfterTensorRT(Libraries const& libraries)
{
    FakeTensorRT fake;
    bool const opened = fake.open();
    expect(opened, "the fake libnvinfer opens");
    void* triton = opened ? dlopen(libraries.triton, RTLD_NOW | RTLD_LOCAL) : nullptr;
    expect(triton != nullptr, "the triton library opens");
    if (triton == nullptr)
    {
        std::printf("  %s\n", dlerror());
        return;
    }
    expect(fake.events() == Events{kRegistered}, "opening it registers MraAttention 1 '' once");
    IPluginCreatorInterface* registered = fake.registry->getCreator("MraAttention", "1", "");
    expect(registered != nullptr, "the registry finds MraAttention (as engine deserialisation looks it up)");

    // The creator is the plugin library's, the one beside the triton library (RUNPATH $ORIGIN).
    std::string const plugin = libraries.plugin;
    std::string const pluginSoname = plugin.substr(plugin.rfind('/') + 1);
    void* loadedPlugin = dlopen(pluginSoname.c_str(), RTLD_NOW | RTLD_NOLOAD);
    expect(loadedPlugin != nullptr, "the triton library loaded the plugin library with itself");
    expect(registered != nullptr && creatorOf(loadedPlugin) == registered,
        "it registered the plugin library's creator");
    Dl_info where{};
    expect(registered != nullptr && dladdr(reinterpret_cast<void*>(registered), &where) != 0
            && sameFile(where.dli_fname, libraries.plugin),
        "that plugin library is the one beside it");
    if (loadedPlugin != nullptr)
    {
        dlclose(loadedPlugin);
    }

    if (unloaded(libraries.triton, triton))
    {
        expect(fake.events() == Events{kRegistered, kDeregistered}, "unloading it deregistered the creator");
        expect(fake.registeredCount() == 0, "no registration left pointing into the unloaded library");
    }
    else
    {
        expect(fake.events() == Events{kRegistered}, "registered while it stays mapped");
    }
    if (checks::gFailed != 0)
    {
        printEvents(fake.events());
    }
}

void tritonOpenedAfterLoadLibrary(Libraries const& libraries)
{
    FakeTensorRT fake;
    bool const opened = fake.open();
    expect(opened, "the fake libnvinfer opens");
    void* plugin = opened ? dlopen(libraries.plugin, RTLD_NOW | RTLD_LOCAL) : nullptr;
    IPluginCreatorInterface* creator = creatorOf(plugin);
    expect(creator != nullptr && fake.registry->registerCreator(*creator, ""), "loadLibrary registers the creator");
    void* triton = creator != nullptr ? dlopen(libraries.triton, RTLD_NOW | RTLD_LOCAL) : nullptr;
    expect(triton != nullptr, "the triton library opens");
    if (triton == nullptr)
    {
        return;
    }
    expect(fake.events() == Events{kRegistered, kRefused}, "its own registration is refused");
    bool const gone = unloaded(libraries.triton, triton);
    expect(fake.registry->getCreator("MraAttention", "1", "") == creator, "loadLibrary's registration stays");
    expect(fake.registry->deregisterCreator(*creator), "deregisterLibrary's deregistration");
    if (gone)
    {
        expect(fake.events() == Events{kRegistered, kRefused, kDeregistered},
            "unloading it deregistered nothing of loadLibrary's");
    }
    dlclose(plugin);
    if (checks::gFailed != 0)
    {
        printEvents(fake.events());
    }
}

//! Runs `check` in a child process (nothing loaded in it yet), which then exits normally, and adds
//! its counts to ours; a crash, a missing report or a registration left at exit (the fake's exit
//! status 3) is one more failure.
void inOwnProcess(char const* name, void (*check)(Libraries const&), Libraries const& libraries)
{
    int channel[2];
    if (pipe(channel) != 0)
    {
        expect(false, "pipe");
        return;
    }
    std::fflush(stdout);
    pid_t const child = fork();
    if (child == 0)
    {
        close(channel[0]);
        checks::gPassed = 0;
        checks::gFailed = 0;
        std::printf("%s:\n", name);
        check(libraries);
        int const counts[2] = {checks::gPassed, checks::gFailed};
        bool const sent = write(channel[1], counts, sizeof(counts)) == static_cast<ssize_t>(sizeof(counts));
        std::fflush(stdout);
        std::exit(sent ? 0 : 1);
    }
    close(channel[1]);
    int counts[2] = {0, 0};
    bool const received = child > 0 && read(channel[0], counts, sizeof(counts)) == static_cast<ssize_t>(sizeof(counts));
    close(channel[0]);
    int status = 0;
    bool const exited
        = child > 0 && waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 0;
    checks::gPassed += counts[0];
    checks::gFailed += counts[1];
    expect(received && exited, (std::string(name) + ": a clean exit, nothing left registered").c_str());
}

} // namespace

int main(int argc, char** argv)
{
    if (argc != 3)
    {
        std::fprintf(stderr, "usage: %s libmra_attention_plugin.so libmra_attention_plugin_triton.so\n", argv[0]);
        return 2;
    }
    Libraries const libraries{argv[1], argv[2]};
    inOwnProcess("plugin library opened without TensorRT", pluginOpenedWithoutTensorRT, libraries);
    inOwnProcess("plugin library opened after TensorRT, then loadLibrary", pluginOpenedAfterTensorRT, libraries);
    inOwnProcess("triton library opened without TensorRT", tritonOpenedWithoutTensorRT, libraries);
    inOwnProcess("triton library opened after TensorRT, then unloaded", tritonOpenedAfterTensorRT, libraries);
    inOwnProcess("triton library opened after loadLibrary", tritonOpenedAfterLoadLibrary, libraries);
    return checks::report();
}
