/*
 * Runs one MraAttention node through a plugin library the way TensorRT does, without TensorRT:
 *   the ONNX parser's fields (INT -> kINT32, STRING -> kCHAR with its NUL, in getFieldNames'
 *   order) -> createPlugin(kBUILD) -> output type, formats, configurePlugin with the profile,
 *   getWorkspaceSize (which must cover the input's own shape) -> onShapeChange and enqueue on
 *   that build-phase plugin (the builder times it) -> getFieldsToSerialize, copied as an engine
 *   stores them -> createPlugin(kRUNTIME) -> attachToContext -> onShapeChange -> enqueue. Each
 *   enqueue gets exactly the workspace asked for (a canary after it, and an unmapped page in host
 *   memory), and both must give the same bytes.
 * With libmra_attention_plugin_emulated.so (the plugin over the CUDA kernels' source under
 * tests/cuda_emulation) every pointer is host memory, so pytest can check the whole plugin, fields
 * to output, against the PyTorch reference (mra_export/native.py, PluginRunner).
 * Compiled with MRA_RUNNER_ON_DEVICE (libmra_attention_plugin_runner_cuda.so, against the real
 * CUDA runtime) it drives the real libmra_attention_plugin.so instead: the inputs copied into
 * cudaMalloc'd memory, the outputs and each workspace there too (poisoned with 0xff, the workspace
 * followed by canary bytes), enqueue on a stream of its own, the output copied back at the end.
 * The caller's pointers are read and written with cudaMemcpyDefault: host or device memory.
 *
 * int32_t mraPluginRun(library, nbAttributes, names, strings, ints, dataType, shape[4],
 *                      profileMin[4], profileOpt[4], profileMax[4],
 *                      query, key, value, mask, output, error, errorSize)
 *   Attribute i is the string strings[i], or the int ints[i] where strings[i] is NULL.
 *   dataType is an MraDataType; shapes are the query's [batch, heads, seq, head_dim], or
 *   [batch, seq, heads, head_dim] where the attribute layout is "bshd" (the mask follows as
 *   [batch, seq]). Returns 0, or non-zero with one line (the step that failed and what
 *   the plugin logged) in `error`.
 */
#include "NvInferRuntime.h"
#include "layerDescs.h"
#include "mraAttention.h"
#include "mraAttentionNode.h"
#if MRA_RUNNER_ON_DEVICE
#include <cuda_runtime_api.h>
#else
#include "guardedBuffer.h"
#endif

#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

//! Collects what the plugin logs, for the error line.
class RecordingLogger : public ILogger
{
public:
    void log(Severity severity, char const* message) noexcept override
    {
        if (severity <= Severity::kWARNING)
        {
            messages += (messages.empty() ? "" : "; ") + std::string(message);
        }
    }
    std::string messages;
};

class Finder : public ILoggerFinder
{
public:
    ILogger* findLogger() override
    {
        return &logger;
    }
    RecordingLogger logger;
};

Finder gFinder;
std::mutex gMutex; // one run at a time: the logger is shared

struct Failure
{
    std::string what;
};

void require(bool ok, char const* step)
{
    if (!ok)
    {
        throw Failure{step};
    }
}

#if MRA_RUNNER_ON_DEVICE

void requireCuda(cudaError_t status, char const* step)
{
    if (status != cudaSuccess)
    {
        throw Failure{std::string(step) + ": " + cudaGetErrorString(status)};
    }
}

//! Device memory of the runner's own.
class DeviceBuffer
{
public:
    explicit DeviceBuffer(size_t bytes)
    {
        requireCuda(cudaMalloc(&mData, std::max<size_t>(bytes, 1)), "cudaMalloc");
    }

    ~DeviceBuffer()
    {
        cudaFree(mData);
    }

    DeviceBuffer(DeviceBuffer const&) = delete;
    DeviceBuffer& operator=(DeviceBuffer const&) = delete;

    unsigned char* get() const
    {
        return static_cast<unsigned char*>(mData);
    }

private:
    void* mData{nullptr};
};

//! The stream enqueue gets, as from an execution context: not the legacy default stream.
class Stream
{
public:
    Stream()
    {
        requireCuda(cudaStreamCreateWithFlags(&mStream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    }

    ~Stream()
    {
        cudaStreamDestroy(mStream);
    }

    Stream(Stream const&) = delete;
    Stream& operator=(Stream const&) = delete;

    cudaStream_t get() const
    {
        return mStream;
    }

    //! Waits for the queued work; a fault in any of it (a kernel's included) fails `step`.
    void synchronize(char const* step) const
    {
        requireCuda(cudaStreamSynchronize(mStream), step);
    }

private:
    cudaStream_t mStream{nullptr};
};

//! TensorRT's workspace on the device: getWorkspaceSize bytes, 256-aligned, uninitialised (0xff
//! here: NaN where read as float). No unmapped page can follow it, so canary bytes do.
class Workspace
{
public:
    Workspace(size_t bytes, Stream const& stream)
        : mBytes(bytes)
        , mMemory(bytes + kGuard)
        , mStream(stream)
    {
        requireCuda(cudaMemsetAsync(mMemory.get(), 0xff, bytes, stream.get()), "cudaMemsetAsync (workspace)");
        requireCuda(cudaMemsetAsync(mMemory.get() + bytes, kCanary, kGuard, stream.get()), "cudaMemsetAsync (canary)");
    }

    void* start() const
    {
        return mMemory.get();
    }

    bool canaryIntact() const
    {
        unsigned char guard[kGuard];
        requireCuda(cudaMemcpyAsync(guard, mMemory.get() + mBytes, kGuard, cudaMemcpyDeviceToHost, mStream.get()),
            "cudaMemcpyAsync (canary)");
        mStream.synchronize("reading the workspace's canary");
        return std::all_of(guard, guard + kGuard, [](unsigned char byte) { return byte == kCanary; });
    }

private:
    static constexpr size_t kGuard = 256;
    static constexpr unsigned char kCanary = 0xa5;
    size_t mBytes;
    DeviceBuffer mMemory;
    Stream const& mStream;
};

#else

//! The emulated kernels run on the calling thread: no stream, nothing to wait for.
struct Stream
{
    cudaStream_t get() const
    {
        return nullptr;
    }

    void synchronize(char const* /*step*/) const {}
};

//! TensorRT's workspace in host memory: getWorkspaceSize bytes, uninitialised, a canary and an
//! unmapped page after it. On a page (TensorRT gives 256 bytes): the emulated kernels fence
//! each section of it by pages (cuda_emulation/fencedWorkspace.cpp).
class Workspace
{
public:
    Workspace(size_t bytes, Stream const& /*stream*/)
        : mBuffer(bytes, static_cast<size_t>(sysconf(_SC_PAGESIZE)))
    {
    }

    void* start() const
    {
        return mBuffer.start();
    }

    bool canaryIntact() const
    {
        return mBuffer.canaryIntact();
    }

private:
    checks::GuardedBuffer mBuffer;
};

#endif

//! The library's MraAttention creator (the library is loaded once per path, as TensorRT does).
IPluginCreatorV3One* findCreator(char const* path)
{
    static std::map<std::string, IPluginCreatorV3One*> creators;
    auto const known = creators.find(path);
    if (known != creators.end())
    {
        return known->second;
    }
    void* library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (library == nullptr)
    {
        throw Failure{std::string("cannot load the plugin library: ") + dlerror()};
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    using SetLoggerFinder = void (*)(ILoggerFinder*);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(library, "getCreators"));
    if (getCreators == nullptr)
    {
        throw Failure{"the plugin library exports no getCreators"};
    }
    if (auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(library, "setLoggerFinder")))
    {
        setLoggerFinder(&gFinder);
    }
    int32_t count = 0;
    IPluginCreatorInterface* const* all = getCreators(count);
    for (int32_t i = 0; i < count; ++i)
    {
        if (std::strcmp(all[i]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") != 0)
        {
            continue;
        }
        auto* creator = static_cast<IPluginCreatorV3One*>(all[i]);
        if (std::strcmp(creator->getPluginName(), "MraAttention") == 0
            && std::strcmp(creator->getPluginVersion(), "1") == 0)
        {
            return creators[path] = creator;
        }
    }
    throw Failure{"the plugin library has no MraAttention version 1 creator"};
}

//! Fields that own their data: what the parser builds from a node, or an engine's stored copy.
struct OwnedFields
{
    std::vector<std::string> names;
    std::vector<std::vector<unsigned char>> data;
    std::vector<PluginField> fields;
    PluginFieldCollection collection{};

    void add(char const* name, void const* bytes, size_t size, PluginFieldType type, int32_t length)
    {
        names.emplace_back(name);
        auto const* begin = static_cast<unsigned char const*>(bytes);
        data.emplace_back(begin, begin + size);
        fields.emplace_back(nullptr, nullptr, type, length);
    }

    PluginFieldCollection const* get()
    {
        for (size_t i = 0; i < fields.size(); ++i)
        {
            fields[i].name = names[i].c_str();
            fields[i].data = data[i].data();
        }
        collection.nbFields = static_cast<int32_t>(fields.size());
        collection.fields = fields.data();
        return &collection;
    }
};

//! The parser's loadFields: the creator's field names, in order, from the node's attributes.
OwnedFields nodeFields(IPluginCreatorV3One* creator, int32_t nbAttributes, char const* const* names,
    char const* const* strings, int64_t const* ints)
{
    OwnedFields node;
    PluginFieldCollection const* wanted = creator->getFieldNames();
    for (int32_t f = 0; f < wanted->nbFields; ++f)
    {
        for (int32_t a = 0; a < nbAttributes; ++a)
        {
            if (std::strcmp(names[a], wanted->fields[f].name) != 0)
            {
                continue;
            }
            if (strings[a] != nullptr)
            {
                size_t const size = std::strlen(strings[a]) + 1;
                node.add(names[a], strings[a], size, PluginFieldType::kCHAR, static_cast<int32_t>(size));
            }
            else
            {
                int32_t const value = static_cast<int32_t>(ints[a]); // the parser reads INT as int32_t
                node.add(names[a], &value, sizeof(value), PluginFieldType::kINT32, 1);
            }
        }
    }
    return node;
}

size_t fieldBytes(PluginField const& field)
{
    switch (field.type)
    {
    case PluginFieldType::kINT64:
    case PluginFieldType::kFLOAT64: return 8 * field.length;
    case PluginFieldType::kINT32:
    case PluginFieldType::kFLOAT32: return 4 * field.length;
    case PluginFieldType::kINT16:
    case PluginFieldType::kFLOAT16:
    case PluginFieldType::kBF16: return 2 * field.length;
    default: return field.length;
    }
}

//! What an engine keeps of the build-time plugin: a deep copy of its serialised fields.
OwnedFields storedFields(PluginFieldCollection const* serialized)
{
    OwnedFields stored;
    for (int32_t i = 0; i < serialized->nbFields; ++i)
    {
        PluginField const& field = serialized->fields[i];
        stored.add(field.name, field.data, fieldBytes(field), field.type, field.length);
    }
    return stored;
}

checks::QueryShape shapeOf(int64_t const* values)
{
    return {values[0], values[1], values[2], values[3]};
}

DataType trtType(int32_t mraType)
{
    return mraType == MRA_FLOAT16 ? DataType::kHALF : mraType == MRA_BFLOAT16 ? DataType::kBF16 : DataType::kFLOAT;
}

//! The query's axis of the tokens, from the node's layout attribute (as the plugin reads it;
//! one it refuses fails at createPlugin).
int32_t seqAxisOf(int32_t nbAttributes, char const* const* names, char const* const* strings)
{
    mra::NodeSettings node;
    for (int32_t a = 0; a < nbAttributes; ++a)
    {
        if (std::strcmp(names[a], "layout") == 0 && strings[a] != nullptr)
        {
            mra::parseLayout(strings[a], node.layout);
        }
    }
    return node.seqAxis();
}

//! The layer at build time: batch and sequence dynamic (-1), the profile's min/opt/max.
std::vector<DynamicPluginTensorDesc> buildDescs(
    DataType type, int64_t const* shape, int64_t const* low, int64_t const* opt, int64_t const* high, int32_t seqAxis)
{
    checks::QueryShape dynamic = shapeOf(shape);
    dynamic[0] = dynamic[seqAxis] = -1;
    return checks::layerDescs(
        type, DataType::kINT32, dynamic, shapeOf(low), shapeOf(opt), shapeOf(high), seqAxis);
}

//! query, key, value, mask, output at the actual shape.
std::vector<PluginTensorDesc> runtimeDescs(DataType type, int64_t const* shape, int32_t seqAxis)
{
    checks::QueryShape const exact = shapeOf(shape);
    std::vector<PluginTensorDesc> descs;
    for (DynamicPluginTensorDesc const& desc :
        checks::layerDescs(type, DataType::kINT32, exact, exact, exact, exact, seqAxis))
    {
        descs.push_back(desc.desc);
    }
    return descs;
}

struct PluginDeleter
{
    void operator()(IPluginV3* plugin) const
    {
        delete plugin;
    }
};
using PluginPtr = std::unique_ptr<IPluginV3, PluginDeleter>;

template <typename Capability>
Capability* capability(IPluginV3* plugin, PluginCapabilityType type)
{
    return static_cast<Capability*>(plugin->getCapabilityInterface(type));
}

//! The build phase: the plugin from the node's fields, configured for the profile `descs`;
//! `workspaceSize` is what it asks for.
PluginPtr build(IPluginCreatorV3One* creator, PluginFieldCollection const* node, DataType type, int64_t const* shape,
    int32_t seqAxis, std::vector<DynamicPluginTensorDesc> const& descs, size_t& workspaceSize)
{
    PluginPtr plugin(creator->createPlugin("mra_attention", node, TensorRTPhase::kBUILD));
    require(plugin != nullptr, "createPlugin (build phase) refused the node's fields");
    auto* buildPart = capability<IPluginV3OneBuild>(plugin.get(), PluginCapabilityType::kBUILD);
    DataType const inputTypes[4] = {type, type, type, DataType::kINT32};
    DataType outputType{};
    require(buildPart->getNbOutputs() == 1 && buildPart->getOutputDataTypes(&outputType, 1, inputTypes, 4) == 0
            && outputType == type,
        "getOutputDataTypes");
    require(checks::supportsAllFormats(buildPart, descs), "supportsFormatCombination refused");
    // The workspace is sized once for the whole profile; it must cover the input's own shape.
    std::vector<DynamicPluginTensorDesc> const exact = buildDescs(type, shape, shape, shape, shape, seqAxis);
    require(buildPart->configurePlugin(exact.data(), 4, exact.data() + 4, 1) == 0, "configurePlugin refused");
    size_t const needed = buildPart->getWorkspaceSize(exact.data(), 4, exact.data() + 4, 1);
    require(buildPart->configurePlugin(descs.data(), 4, descs.data() + 4, 1) == 0, "configurePlugin refused");
    workspaceSize = buildPart->getWorkspaceSize(descs.data(), 4, descs.data() + 4, 1);
    require(workspaceSize >= needed, "getWorkspaceSize for the profile is less than for a shape inside it");
    return plugin;
}

//! One layer execution: the inputs' shape and the workspace size the build asked for.
struct Call
{
    DataType type;
    int64_t const* shape;
    size_t workspaceSize;
    int32_t seqAxis; //!< the query's axis of the tokens (the mask's second)

    //! Also the bytes of the query, the key and the value.
    size_t outputBytes() const
    {
        return static_cast<size_t>(shape[0] * shape[1] * shape[2] * shape[3]) * (type == DataType::kFLOAT ? 4 : 2);
    }

    size_t maskBytes() const
    {
        return static_cast<size_t>(shape[0] * shape[seqAxis]) * sizeof(int32_t);
    }
};

#if MRA_RUNNER_ON_DEVICE

//! The layer's tensors in device memory, as an engine holds them: the caller's inputs copied in,
//! and two outputs (the builder's timing run's and the engine's), poisoned with 0xff (NaN).
class LayerTensors
{
public:
    LayerTensors(Call const& call, void const* const* callerInputs, void* callerOutput, Stream const& stream)
        : mQuery(call.outputBytes())
        , mKey(call.outputBytes())
        , mValue(call.outputBytes())
        , mMask(call.maskBytes())
        , mTimed(call.outputBytes())
        , mEngine(call.outputBytes())
        , mInputs{mQuery.get(), mKey.get(), mValue.get(), mMask.get()}
        , mCallerOutput(callerOutput)
        , mOutputBytes(call.outputBytes())
    {
        DeviceBuffer const* const targets[4] = {&mQuery, &mKey, &mValue, &mMask};
        size_t const bytes[4] = {call.outputBytes(), call.outputBytes(), call.outputBytes(), call.maskBytes()};
        for (int32_t i = 0; i < 4; ++i)
        {
            requireCuda(cudaMemcpyAsync(targets[i]->get(), callerInputs[i], bytes[i], cudaMemcpyDefault, stream.get()),
                "cudaMemcpyAsync (inputs)");
        }
        for (DeviceBuffer const* output : {&mTimed, &mEngine})
        {
            requireCuda(cudaMemsetAsync(output->get(), 0xff, mOutputBytes, stream.get()), "cudaMemsetAsync (outputs)");
        }
    }

    void const* const* inputs() const
    {
        return mInputs;
    }

    void* timedOutput() const
    {
        return mTimed.get();
    }

    void* engineOutput() const
    {
        return mEngine.get();
    }

    bool outputsAgree(Stream const& stream) const
    {
        std::vector<unsigned char> timed(mOutputBytes), engine(mOutputBytes);
        requireCuda(cudaMemcpyAsync(timed.data(), mTimed.get(), mOutputBytes, cudaMemcpyDeviceToHost, stream.get()),
            "cudaMemcpyAsync (outputs)");
        requireCuda(cudaMemcpyAsync(engine.data(), mEngine.get(), mOutputBytes, cudaMemcpyDeviceToHost, stream.get()),
            "cudaMemcpyAsync (outputs)");
        stream.synchronize("copying the outputs back");
        return timed == engine;
    }

    //! The engine's output into the caller's memory.
    void deliver(Stream const& stream) const
    {
        requireCuda(cudaMemcpyAsync(mCallerOutput, mEngine.get(), mOutputBytes, cudaMemcpyDefault, stream.get()),
            "cudaMemcpyAsync (output)");
        stream.synchronize("copying the output back");
    }

private:
    DeviceBuffer mQuery, mKey, mValue, mMask, mTimed, mEngine;
    void const* mInputs[4];
    void* mCallerOutput;
    size_t mOutputBytes;
};

#else

//! The layer's tensors in host memory: the caller's own, and a second output for the timing run.
class LayerTensors
{
public:
    LayerTensors(Call const& call, void const* const* callerInputs, void* callerOutput, Stream const& /*stream*/)
        : mInputs(callerInputs)
        , mTimed(call.outputBytes())
        , mCallerOutput(callerOutput)
    {
    }

    void const* const* inputs() const
    {
        return mInputs;
    }

    void* timedOutput()
    {
        return mTimed.data();
    }

    void* engineOutput() const
    {
        return mCallerOutput;
    }

    bool outputsAgree(Stream const& /*stream*/) const
    {
        return std::memcmp(mTimed.data(), mCallerOutput, mTimed.size()) == 0;
    }

    //! The engine wrote into the caller's memory itself.
    void deliver(Stream const& /*stream*/) const {}

private:
    void const* const* mInputs;
    std::vector<unsigned char> mTimed;
    void* mCallerOutput;
};

#endif

//! onShapeChange and enqueue, as TensorRT runs the layer (when timing it in the builder, and in
//! an execution context).
void execute(IPluginV3* plugin, Call const& call, void const* const* inputs, void* output, Stream const& stream)
{
    auto* runtime = capability<IPluginV3OneRuntime>(plugin, PluginCapabilityType::kRUNTIME);
    std::vector<PluginTensorDesc> const descs = runtimeDescs(call.type, call.shape, call.seqAxis);
    require(runtime->onShapeChange(descs.data(), 4, descs.data() + 4, 1) == 0, "onShapeChange refused the shapes");
    // enqueue is not told the workspace's size, so a plugin that asked for too little would
    // write past it.
    Workspace workspace(call.workspaceSize, stream);
    void* const outputs[1] = {output};
    require(runtime->enqueue(descs.data(), descs.data() + 4, inputs, outputs, workspace.start(), stream.get()) == 0,
        "enqueue failed");
    stream.synchronize("the work enqueue queued");
    require(workspace.canaryIntact(), "enqueue wrote past the workspace getWorkspaceSize asked for");
}

} // namespace

extern "C" __attribute__((visibility("default"))) int32_t mraPluginRun(char const* library, int32_t nbAttributes,
    char const* const* names, char const* const* strings, int64_t const* ints, int32_t dataType, int64_t const* shape,
    int64_t const* profileMin, int64_t const* profileOpt, int64_t const* profileMax, void const* query,
    void const* key, void const* value, int32_t const* mask, void* output, char* error, size_t errorSize)
{
    std::lock_guard<std::mutex> lock(gMutex);
    gFinder.logger.messages.clear();
    try
    {
        IPluginCreatorV3One* creator = findCreator(library);
        OwnedFields node = nodeFields(creator, nbAttributes, names, strings, ints);
        DataType const type = trtType(dataType);
        int32_t const seqAxis = seqAxisOf(nbAttributes, names, strings);
        size_t workspaceSize = 0;
        PluginPtr built = build(creator, node.get(), type, shape, seqAxis,
            buildDescs(type, shape, profileMin, profileOpt, profileMax, seqAxis), workspaceSize);
        Call const call{type, shape, workspaceSize, seqAxis};
        Stream stream;
        void const* const callerInputs[4] = {query, key, value, mask};
        LayerTensors tensors(call, callerInputs, output, stream);
        // The builder times the build-phase plugin.
        execute(built.get(), call, tensors.inputs(), tensors.timedOutput(), stream);
        // The engine stores the fields; deserialising recreates the plugin, each context clones it.
        OwnedFields stored = storedFields(
            capability<IPluginV3OneRuntime>(built.get(), PluginCapabilityType::kRUNTIME)->getFieldsToSerialize());
        built.reset();
        PluginPtr engine(creator->createPlugin("mra_attention", stored.get(), TensorRTPhase::kRUNTIME));
        require(engine != nullptr, "createPlugin (runtime phase) refused the serialised fields");
        PluginPtr context(
            capability<IPluginV3OneRuntime>(engine.get(), PluginCapabilityType::kRUNTIME)->attachToContext(nullptr));
        require(context != nullptr, "attachToContext");
        execute(context.get(), call, tensors.inputs(), tensors.engineOutput(), stream);
        require(tensors.outputsAgree(stream),
            "the build-phase plugin (which TensorRT times) and the engine's give different outputs");
        tensors.deliver(stream);
        return 0;
    }
    catch (Failure const& failure)
    {
        std::string const& logged = gFinder.logger.messages;
        std::string const line = failure.what + (logged.empty() ? "" : ": " + logged);
        std::snprintf(error, errorSize, "%s", line.c_str());
    }
    catch (std::exception const& e)
    {
        std::snprintf(error, errorSize, "%s", e.what());
    }
    return 1;
}
