// The entry points TensorRT looks for in a plugin library: `trtexec --dynamicPlugins=LIB` and
// IPluginRegistry::loadLibrary call getCreators (and setLoggerFinder, to lend us a logger).
// The creator is registered only by whoever calls getCreators, never when the library is opened:
// nothing of ours calls TensorRT from inside loadLibrary's own dlopen. Hosts that only dlopen plugin
// libraries (Triton's tensorrt backend) open libmra_attention_plugin_triton.so instead
// (mraAttentionTritonRegistration.cpp), which registers this library's creator when opened.
#include "mraAttentionPlugin.h"

#include <cstdio>
#include <mutex>

namespace mra
{
namespace plugin
{
namespace
{

std::mutex gLoggerMutex;
nvinfer1::ILoggerFinder* gLoggerFinder = nullptr;

//! The one creator, returned by getCreators.
MraAttentionPluginCreator& theCreator()
{
    static MraAttentionPluginCreator creator;
    return creator;
}

} // namespace

void logError(std::string const& message) noexcept
{
    nvinfer1::ILogger* logger = nullptr;
    {
        std::lock_guard<std::mutex> lock(gLoggerMutex);
        logger = gLoggerFinder != nullptr ? gLoggerFinder->findLogger() : nullptr;
    }
    if (logger != nullptr)
    {
        logger->log(nvinfer1::ILogger::Severity::kERROR, message.c_str());
    }
    else
    {
        std::fprintf(stderr, "[MraAttention] %s\n", message.c_str());
    }
}

} // namespace plugin
} // namespace mra

extern "C" __attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(
    int32_t& nbCreators)
{
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&mra::plugin::theCreator()};
    nbCreators = 1;
    return creators;
}

extern "C" __attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    std::lock_guard<std::mutex> lock(mra::plugin::gLoggerMutex);
    if (mra::plugin::gLoggerFinder == nullptr && finder != nullptr)
    {
        mra::plugin::gLoggerFinder = finder;
    }
}
