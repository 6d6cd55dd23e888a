// libmra_attention_plugin_triton.so: for hosts that only dlopen plugin libraries and expect them to
// register themselves, as REGISTER_TENSORRT_PLUGIN libraries do (Triton's tensorrt backend:
// `--backend-config=tensorrt,plugins=LIB`). Opened into a process where TensorRT's runtime
// (libnvinfer.so.<NV_TENSORRT_MAJOR>) is already loaded, it registers the MraAttention creator of
// libmra_attention_plugin.so (its DT_NEEDED, found beside it through RUNPATH $ORIGIN) with that
// runtime's registry, and deregisters it when unloaded. Opened anywhere else it does nothing.
//
// Why a library of its own: IPluginRegistry::loadLibrary (`trtexec --dynamicPlugins`, mra-export
// build, TrtMraModel) dlopens the plugin library from inside TensorRT, then registers what
// getCreators returns. A registration from the plugin library's static initializers would run
// inside that dlopen, calling TensorRT's registry while TensorRT may hold its lock. So the plugin
// library registers nothing when opened, and only this one, which loadLibrary is never given,
// does. Give it to Triton, not to loadLibrary.
#include "NvInferRuntime.h"

#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstring>

namespace
{

using GetCreators = nvinfer1::IPluginCreatorInterface* const* (*) (int32_t&);

//! The registry of the libnvinfer already in this process, or nullptr. RTLD_NOLOAD: TensorRT is
//! never loaded here, and it is found by its soname even where it was opened RTLD_LOCAL (as Triton's
//! backend opens it), which dlsym(RTLD_DEFAULT) would not see.
nvinfer1::IPluginRegistry* loadedRegistry() noexcept
{
    char soname[32];
    std::snprintf(soname, sizeof(soname), "libnvinfer.so.%d", NV_TENSORRT_MAJOR);
    void* nvinfer = dlopen(soname, RTLD_NOW | RTLD_NOLOAD);
    if (nvinfer == nullptr)
    {
        return nullptr;
    }
    auto getRegistry = reinterpret_cast<decltype(&getPluginRegistry)>(dlsym(nvinfer, "getPluginRegistry"));
    nvinfer1::IPluginRegistry* registry = getRegistry != nullptr ? getRegistry() : nullptr;
    dlclose(nvinfer); // only the reference RTLD_NOLOAD took: whoever loaded TensorRT keeps it loaded
    return registry;
}

//! The creator from the plugin library's getCreators, or nullptr. Looked up through the plugin
//! library's own handle (its soname, MRA_PLUGIN_SONAME: loaded before us as our DT_NEEDED), so that
//! no other getCreators in the process can stand in for it.
nvinfer1::IPluginCreatorV3One* pluginCreator() noexcept
{
    void* plugin = dlopen(MRA_PLUGIN_SONAME, RTLD_NOW | RTLD_NOLOAD);
    if (plugin == nullptr)
    {
        return nullptr;
    }
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(plugin, "getCreators"));
    int32_t count = 0;
    nvinfer1::IPluginCreatorInterface* const* creators = getCreators != nullptr ? getCreators(count) : nullptr;
    nvinfer1::IPluginCreatorInterface* creator = creators != nullptr && count == 1 ? creators[0] : nullptr;
    dlclose(plugin); // our DT_NEEDED keeps it loaded
    if (creator == nullptr || std::strcmp(creator->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") != 0)
    {
        return nullptr;
    }
    return static_cast<nvinfer1::IPluginCreatorV3One*>(creator);
}

//! The registration made when this library is opened, withdrawn when it is unloaded (the registry
//! must not keep a creator registered by a library that is gone). A creator already registered
//! (by loadLibrary, say) is refused by the registry and left alone.
class Registration
{
public:
    Registration() noexcept
    {
        nvinfer1::IPluginRegistry* registry = loadedRegistry();
        nvinfer1::IPluginCreatorV3One* creator = registry != nullptr ? pluginCreator() : nullptr;
        if (registry == nullptr)
        {
            return;
        }
        if (creator == nullptr)
        {
            std::fprintf(stderr, "[MraAttention] %s has no MraAttention creator: nothing registered\n",
                MRA_PLUGIN_SONAME);
            return;
        }
        if (registry->registerCreator(*creator, creator->getPluginNamespace()))
        {
            mRegistry = registry;
            mCreator = creator;
        }
    }

    ~Registration() noexcept
    {
        if (mRegistry != nullptr)
        {
            mRegistry->deregisterCreator(*mCreator);
        }
    }

    Registration(Registration const&) = delete;
    Registration& operator=(Registration const&) = delete;

private:
    nvinfer1::IPluginRegistry* mRegistry = nullptr; //!< where we registered the creator, if we did
    nvinfer1::IPluginCreatorV3One* mCreator = nullptr;
};

Registration gRegistration;

} // namespace
