// The MraAttention TensorRT plugin: shapes, formats and fields here; the work in the CUDA
// kernels behind mraAttention.h.
#include "mraAttentionPlugin.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <memory>
#include <string_view>

using namespace nvinfer1;

namespace mra
{
namespace plugin
{
namespace
{

constexpr int32_t kQuery = 0, kKey = 1, kValue = 2, kMask = 3, kOutput = 4;
constexpr int32_t kInputs = 4, kOutputs = 1;

MraDataType toMraType(DataType type)
{
    switch (type)
    {
    case DataType::kHALF: return MRA_FLOAT16;
    case DataType::kBF16: return MRA_BFLOAT16;
    default: return MRA_FLOAT32;
    }
}

bool isActivationType(DataType type)
{
    return type == DataType::kFLOAT || type == DataType::kHALF || type == DataType::kBF16;
}

bool supportedHeadDim(int64_t headDim)
{
    return headDim == 32 || headDim == 64 || headDim == 128;
}

bool sameDims(Dims const& a, Dims const& b)
{
    return a.nbDims == b.nbDims && std::equal(a.d, a.d + a.nbDims, b.d);
}

//! "[8, 12, 4096, 64]", for error messages.
std::string shapeString(Dims const& dims)
{
    std::string text = "[";
    for (int32_t i = 0; i < dims.nbDims; ++i)
    {
        text += (i > 0 ? ", " : "") + std::to_string(dims.d[i]);
    }
    return text + "]";
}

//! An int32 field; the ONNX parser gives INT attributes as kINT32 (kINT64 accepted too).
bool readInt(PluginField const& field, int32_t& value)
{
    if (field.data == nullptr || field.length < 1)
    {
        return false;
    }
    if (field.type == PluginFieldType::kINT32)
    {
        value = *static_cast<int32_t const*>(field.data);
        return true;
    }
    if (field.type == PluginFieldType::kINT64)
    {
        int64_t const wide = *static_cast<int64_t const*>(field.data);
        value = static_cast<int32_t>(wide);
        return wide == value; // refused (as a bad field) if it does not fit in int32
    }
    return false;
}

//! A kCHAR field, with or without its terminating NUL.
bool readString(PluginField const& field, std::string& value)
{
    if (field.type != PluginFieldType::kCHAR || field.data == nullptr)
    {
        return false;
    }
    char const* text = static_cast<char const*>(field.data);
    value.assign(text, strnlen(text, static_cast<size_t>(field.length)));
    return true;
}

//! Parse and check the fields; on failure return false with the reason in `error`.
bool parseSettings(PluginFieldCollection const* fc, Settings& settings, std::string& error)
{
    if (fc == nullptr)
    {
        error = "no plugin fields";
        return false;
    }
    for (int32_t f = 0; f < fc->nbFields; ++f)
    {
        PluginField const& field = fc->fields[f];
        std::string_view const name = field.name == nullptr ? "" : field.name;
        bool ok = true;
        if (name == "num_blocks")
        {
            ok = readInt(field, settings.numBlocks);
        }
        else if (name == "block_size")
        {
            ok = readInt(field, settings.blockSize);
        }
        else if (name == "initial_prior_first_n_blocks")
        {
            ok = readInt(field, settings.priorFirst);
        }
        else if (name == "initial_prior_diagonal_n_blocks")
        {
            ok = readInt(field, settings.priorDiagonal);
        }
        else if (name == "approx_mode")
        {
            std::string mode;
            ok = readString(field, mode) && (mode == "full" || mode == "sparse");
            settings.approxMode = mode == "sparse" ? MRA_SPARSE : MRA_FULL;
        }
        else if (name == "layout") // absent from engines built before it: "bhsd"
        {
            std::string layout;
            ok = readString(field, layout) && parseLayout(layout.c_str(), settings.layout);
        }
        if (!ok)
        {
            error = "field " + std::string(name) + " has the wrong type or value";
            return false;
        }
    }
    if (settings.numBlocks < 1 || settings.blockSize != 32 || settings.priorFirst < 0 || settings.priorDiagonal < 0)
    {
        error = "num_blocks must be >= 1, block_size 32, and the priors >= 0";
        return false;
    }
    return true;
}

} // namespace

// ---- the plugin --------------------------------------------------------------------------------

MraAttentionPlugin::MraAttentionPlugin(Settings const& settings, std::string pluginNamespace)
    : mSettings(settings)
    , mNamespace(std::move(pluginNamespace))
{
    describeFields();
}

MraAttentionPlugin::MraAttentionPlugin(MraAttentionPlugin const& other)
    : MraAttentionPlugin(other.mSettings, other.mNamespace)
{
}

void MraAttentionPlugin::describeFields()
{
    mApproxMode = mSettings.approxMode == MRA_SPARSE ? "sparse" : "full";
    mFields = {
        PluginField("num_blocks", &mSettings.numBlocks, PluginFieldType::kINT32, 1),
        PluginField("approx_mode", mApproxMode.c_str(), PluginFieldType::kCHAR,
            static_cast<int32_t>(mApproxMode.size() + 1)),
        PluginField("block_size", &mSettings.blockSize, PluginFieldType::kINT32, 1),
        PluginField("initial_prior_first_n_blocks", &mSettings.priorFirst, PluginFieldType::kINT32, 1),
        PluginField("initial_prior_diagonal_n_blocks", &mSettings.priorDiagonal, PluginFieldType::kINT32, 1),
        PluginField("layout", layoutName(mSettings.layout), PluginFieldType::kCHAR,
            static_cast<int32_t>(std::strlen(layoutName(mSettings.layout)) + 1)),
    };
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

IPluginCapability* MraAttentionPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    }
    return nullptr;
}

IPluginV3* MraAttentionPlugin::clone() noexcept
{
    try
    {
        return std::make_unique<MraAttentionPlugin>(*this).release();
    }
    catch (std::exception const& e)
    {
        logError(std::string("MraAttention clone: ") + e.what());
    }
    return nullptr;
}

char const* MraAttentionPlugin::getPluginName() const noexcept
{
    return kPluginName;
}

char const* MraAttentionPlugin::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* MraAttentionPlugin::getPluginNamespace() const noexcept
{
    return mNamespace.c_str();
}

int32_t MraAttentionPlugin::getNbOutputs() const noexcept
{
    return kOutputs;
}

int32_t MraAttentionPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbInputs != kInputs || nbOutputs != kOutputs || !isActivationType(inputTypes[kQuery]))
    {
        logError("MraAttention takes query, key, value (float32/float16/bfloat16) and an int32 mask");
        return -1;
    }
    outputTypes[0] = inputTypes[kQuery];
    return 0;
}

int32_t MraAttentionPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& /*exprBuilder*/) noexcept
{
    if (nbInputs != kInputs || nbOutputs != kOutputs || inputs[kQuery].nbDims != 4 || inputs[kMask].nbDims != 2)
    {
        logError(std::string("MraAttention: query/key/value must be ") + mSettings.shapeNames() + " and mask [batch, seq]");
        return -1;
    }
    outputs[0] = inputs[kQuery];
    return 0;
}

bool MraAttentionPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != kInputs || nbOutputs != kOutputs || pos < 0 || pos > kOutput)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    switch (pos)
    {
    case kQuery: return isActivationType(desc.type);
    case kMask: return desc.type == DataType::kINT32;
    default: return desc.type == inOut[kQuery].desc.type; // key, value and the output
    }
}

int32_t MraAttentionPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (nbInputs != kInputs || nbOutputs != kOutputs)
    {
        return -1;
    }
    Dims const& query = in[kQuery].desc.dims;
    for (int32_t input : {kKey, kValue})
    {
        Dims const& dims = in[input].desc.dims;
        if (dims.nbDims != 4)
        {
            logError("MraAttention: key and value must have rank 4 like query");
            return -1;
        }
        for (int32_t d = 0; d < 4; ++d)
        {
            bool const known = dims.d[d] >= 0 && query.d[d] >= 0;
            if (known && dims.d[d] != query.d[d])
            {
                logError("MraAttention: query, key and value must have the same shape");
                return -1;
            }
        }
    }
    if (query.d[3] >= 0 && !supportedHeadDim(query.d[3]))
    {
        logError("MraAttention: head_dim " + std::to_string(query.d[3])
            + " is not supported by the CUDA kernels (32, 64 or 128; the exporter pads smaller head dims to 32)");
        return -1;
    }
    // getWorkspaceSize sizes the workspace at the profile's maxima: refuse the build here if the
    // kernels cannot take that shape, rather than fail in every enqueue.
    MraAttentionParams const largest = params(in[kQuery].max, in[kQuery].desc.type);
    if (mraCheckParams(&largest) != MRA_OK)
    {
        logError("MraAttention: the profile's largest query shape " + shapeString(in[kQuery].max)
            + " is past the kernels' int32 index range; lower the profile's maximum batch or sequence");
        return -1;
    }
    (void) out;
    return 0;
}

MraAttentionParams MraAttentionPlugin::params(Dims const& query, DataType type) const
{
    MraAttentionParams p{};
    p.batch = static_cast<int32_t>(query.d[0]);
    p.heads = static_cast<int32_t>(query.d[mSettings.headsAxis()]);
    p.seq_len = static_cast<int32_t>(query.d[mSettings.seqAxis()]);
    p.head_dim = static_cast<int32_t>(query.d[3]);
    p.num_blocks = mSettings.numBlocks;
    p.block_size = mSettings.blockSize;
    p.approx_mode = mSettings.approxMode;
    p.initial_prior_first_n_blocks = mSettings.priorFirst;
    p.initial_prior_diagonal_n_blocks = mSettings.priorDiagonal;
    p.dtype = toMraType(type);
    p.layout = mSettings.layout;
    return p;
}

size_t MraAttentionPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t /*nbInputs*/,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    // The profile's maxima bound every shape enqueue will see; the workspace only grows with them.
    MraAttentionParams const largest = params(inputs[kQuery].max, inputs[kQuery].desc.type);
    return mraWorkspaceSize(&largest);
}

int32_t MraAttentionPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != kInputs || nbOutputs != kOutputs)
    {
        return -1;
    }
    Dims const& query = in[kQuery].dims;
    for (int32_t input : {kKey, kValue})
    {
        if (!sameDims(in[input].dims, query))
        {
            logError("MraAttention: key and value must have the query's shape " + shapeString(query) + ", got "
                + shapeString(in[input].dims));
            return -1;
        }
    }
    if (in[kMask].dims.nbDims != 2 || in[kMask].dims.d[0] != query.d[0]
        || in[kMask].dims.d[1] != query.d[mSettings.seqAxis()])
    {
        logError("MraAttention: mask must be [batch, seq] of the query");
        return -1;
    }
    return 0;
}

int32_t MraAttentionPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    MraAttentionParams const p = params(inputDesc[kQuery].dims, inputDesc[kQuery].type);
    MraStatus const status = mraAttentionCuda(&p, inputs[kQuery], inputs[kKey], inputs[kValue],
        static_cast<int32_t const*>(inputs[kMask]), outputs[0], workspace, mraWorkspaceSize(&p), stream);
    if (status != MRA_OK)
    {
        std::string message = std::string("MraAttention enqueue: ") + mraStatusString(status);
        if (status == MRA_CUDA_ERROR)
        {
            message += std::string(": ") + mraLastCudaError();
        }
        logError(message);
        return -1;
    }
    return 0;
}

IPluginV3* MraAttentionPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone(); // no per-context resources
}

PluginFieldCollection const* MraAttentionPlugin::getFieldsToSerialize() noexcept
{
    return &mFieldCollection;
}

// ---- the creator -------------------------------------------------------------------------------

MraAttentionPluginCreator::MraAttentionPluginCreator()
{
    mFieldNames = {
        PluginField("num_blocks", nullptr, PluginFieldType::kINT32, 1),
        PluginField("approx_mode", nullptr, PluginFieldType::kCHAR, 0),
        PluginField("block_size", nullptr, PluginFieldType::kINT32, 1),
        PluginField("initial_prior_first_n_blocks", nullptr, PluginFieldType::kINT32, 1),
        PluginField("initial_prior_diagonal_n_blocks", nullptr, PluginFieldType::kINT32, 1),
        PluginField("layout", nullptr, PluginFieldType::kCHAR, 0),
    };
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldCollection.fields = mFieldNames.data();
}

char const* MraAttentionPluginCreator::getPluginName() const noexcept
{
    return kPluginName;
}

char const* MraAttentionPluginCreator::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* MraAttentionPluginCreator::getPluginNamespace() const noexcept
{
    return mNamespace.c_str();
}

PluginFieldCollection const* MraAttentionPluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

IPluginV3* MraAttentionPluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        Settings settings;
        std::string error;
        if (!parseSettings(fc, settings, error))
        {
            logError(std::string("MraAttention (") + (name ? name : "") + "): " + error);
            return nullptr;
        }
        return std::make_unique<MraAttentionPlugin>(settings, mNamespace).release();
    }
    catch (std::exception const& e)
    {
        logError(std::string("MraAttention createPlugin: ") + e.what());
    }
    return nullptr;
}

} // namespace plugin
} // namespace mra
