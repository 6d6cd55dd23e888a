// The entry points TensorRT looks for in a plugin library: `trtexec --dynamicPlugins=LIB` and
// IPluginRegistry::loadLibrary call getCreators (and setLoggerFinder, to lend us a logger).
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
    static mra::plugin::MraAttentionPluginCreator creator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
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
