/*
 * Drives the built plugin library through TensorRT's interfaces the way the ONNX parser and the
 * builder do, without TensorRT's runtime and without a GPU: getCreators, the fields of an
 * MraAttention node, serialisation round trip, formats, types, shapes, workspace, bad fields.
 * Usage: mra_attention_plugin_test path/to/libmra_attention_plugin.so
 * Prints "N passed, M failed" and exits non-zero on any failure.
 */
#include "NvInferRuntime.h"
#include "expect.h"
#include "layerDescs.h"
#include "mraAttention.h"

#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

using namespace nvinfer1;

using checks::expect;

namespace
{

//! Plugin fields of an MraAttention node as the ONNX parser builds them (INT -> kINT32,
//! STRING -> kCHAR with its NUL).
struct NodeFields
{
    int32_t numBlocks = 64;
    int32_t blockSize = 32;
    int32_t first = 1;
    int32_t diagonal = 3;
    std::string mode = "sparse";
    std::vector<PluginField> fields;
    PluginFieldCollection collection{};

    PluginFieldCollection const* get()
    {
        fields = {
            PluginField("num_blocks", &numBlocks, PluginFieldType::kINT32, 1),
            PluginField("approx_mode", mode.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(mode.size() + 1)),
            PluginField("block_size", &blockSize, PluginFieldType::kINT32, 1),
            PluginField("initial_prior_first_n_blocks", &first, PluginFieldType::kINT32, 1),
            PluginField("initial_prior_diagonal_n_blocks", &diagonal, PluginFieldType::kINT32, 1),
        };
        collection.nbFields = static_cast<int32_t>(fields.size());
        collection.fields = fields.data();
        return &collection;
    }
};

PluginField const* findField(PluginFieldCollection const* fc, char const* name)
{
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        if (std::strcmp(fc->fields[i].name, name) == 0)
        {
            return &fc->fields[i];
        }
    }
    return nullptr;
}

int32_t intField(PluginFieldCollection const* fc, char const* name)
{
    PluginField const* field = findField(fc, name);
    return field != nullptr && field->type == PluginFieldType::kINT32 ? *static_cast<int32_t const*>(field->data) : -999;
}

std::string stringField(PluginFieldCollection const* fc, char const* name)
{
    PluginField const* field = findField(fc, name);
    if (field == nullptr || field->type != PluginFieldType::kCHAR)
    {
        return "<missing>";
    }
    char const* text = static_cast<char const*>(field->data);
    return std::string(text, strnlen(text, static_cast<size_t>(field->length)));
}

Dims dims4(int64_t a, int64_t b, int64_t c, int64_t d)
{
    Dims dims{};
    dims.nbDims = 4;
    dims.d[0] = a;
    dims.d[1] = b;
    dims.d[2] = c;
    dims.d[3] = d;
    return dims;
}

Dims dims2(int64_t a, int64_t b)
{
    Dims dims{};
    dims.nbDims = 2;
    dims.d[0] = a;
    dims.d[1] = b;
    return dims;
}

//! query, key, value, mask, output descriptors of one format combination.
std::vector<DynamicPluginTensorDesc> descriptors(DataType activations, DataType mask, int64_t headDim = 64)
{
    return checks::layerDescs(activations, mask, {-1, 12, -1, headDim}, {1, 12, 1, headDim},
        {4, 12, 512, headDim}, {8, 12, 4096, headDim});
}

} // namespace

int main(int argc, char** argv)
{
    if (argc != 2)
    {
        std::fprintf(stderr, "usage: %s libmra_attention_plugin.so\n", argv[0]);
        return 2;
    }
    void* library = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (library == nullptr)
    {
        std::fprintf(stderr, "cannot load %s: %s\n", argv[1], dlerror());
        return 2;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    using WorkspaceSize = size_t (*)(MraAttentionParams const*);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(library, "getCreators"));
    auto workspaceSize = reinterpret_cast<WorkspaceSize>(dlsym(library, "mraWorkspaceSize"));
    expect(getCreators != nullptr, "the library exports getCreators");
    expect(dlsym(library, "setLoggerFinder") != nullptr, "the library exports setLoggerFinder");
    expect(workspaceSize != nullptr, "the library exports mraWorkspaceSize");
    if (getCreators == nullptr || workspaceSize == nullptr)
    {
        return checks::report();
    }

    int32_t count = 0;
    IPluginCreatorInterface* const* creators = getCreators(count);
    expect(count == 1, "one creator");
    expect(std::strcmp(creators[0]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0, "an IPluginCreatorV3One");
    auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
    expect(std::strcmp(creator->getPluginName(), "MraAttention") == 0, "named MraAttention (the node's op_type)");
    expect(std::strcmp(creator->getPluginVersion(), "1") == 0, "version 1");
    expect(std::strcmp(creator->getPluginNamespace(), "") == 0, "namespace \"\"");
    PluginFieldCollection const* names = creator->getFieldNames();
    char const* expected[] = {"num_blocks", "approx_mode", "block_size", "initial_prior_first_n_blocks",
        "initial_prior_diagonal_n_blocks"};
    for (char const* name : expected)
    {
        expect(findField(names, name) != nullptr, name);
    }

    NodeFields node;
    IPluginV3* plugin = creator->createPlugin("layer.0", node.get(), TensorRTPhase::kBUILD);
    expect(plugin != nullptr, "createPlugin from the node's fields");
    if (plugin == nullptr)
    {
        return checks::report();
    }
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    expect(core && build && runtime, "core, build and runtime capabilities");
    expect(std::strcmp(core->getPluginName(), "MraAttention") == 0, "plugin name");
    expect(build->getNbOutputs() == 1, "one output");

    // Serialisation round trip: the fields TensorRT stores in the engine recreate the plugin.
    PluginFieldCollection const* serialized = runtime->getFieldsToSerialize();
    expect(intField(serialized, "num_blocks") == 64, "num_blocks serialised");
    expect(stringField(serialized, "approx_mode") == "sparse", "approx_mode serialised");
    expect(intField(serialized, "block_size") == 32, "block_size serialised");
    expect(intField(serialized, "initial_prior_first_n_blocks") == 1, "first prior serialised");
    expect(intField(serialized, "initial_prior_diagonal_n_blocks") == 3, "diagonal prior serialised");
    IPluginV3* restored = creator->createPlugin("layer.0", serialized, TensorRTPhase::kRUNTIME);
    expect(restored != nullptr, "createPlugin from the serialised fields");
    if (restored != nullptr)
    {
        auto* restoredRuntime
            = static_cast<IPluginV3OneRuntime*>(restored->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        PluginFieldCollection const* again = restoredRuntime->getFieldsToSerialize();
        expect(intField(again, "num_blocks") == 64 && stringField(again, "approx_mode") == "sparse"
                && intField(again, "initial_prior_diagonal_n_blocks") == 3,
            "fields survive the round trip");
        delete restored;
    }
    IPluginV3* copy = plugin->clone();
    expect(copy != nullptr, "clone");
    IPluginV3* attached = runtime->attachToContext(nullptr);
    expect(attached != nullptr, "attachToContext");
    delete copy;
    delete attached;

    // Formats: linear; query/key/value/output one of float32/float16/bfloat16; mask int32.
    expect(checks::supportsAllFormats(build, descriptors(DataType::kFLOAT, DataType::kINT32)), "float32 + int32 mask");
    expect(checks::supportsAllFormats(build, descriptors(DataType::kHALF, DataType::kINT32)), "float16 + int32 mask");
    expect(checks::supportsAllFormats(build, descriptors(DataType::kBF16, DataType::kINT32)), "bfloat16 + int32 mask");
    expect(!checks::supportsAllFormats(build, descriptors(DataType::kFLOAT, DataType::kFLOAT)), "no float mask");
    expect(!checks::supportsAllFormats(build, descriptors(DataType::kFLOAT, DataType::kBOOL)), "no bool mask");
    expect(!checks::supportsAllFormats(build, descriptors(DataType::kFLOAT, DataType::kINT64)), "no int64 mask");
    expect(!checks::supportsAllFormats(build, descriptors(DataType::kINT8, DataType::kINT32)), "no int8 activations");
    auto mixed = descriptors(DataType::kHALF, DataType::kINT32);
    mixed[2].desc.type = DataType::kFLOAT;
    expect(!build->supportsFormatCombination(2, mixed.data(), 4, 1), "value must match query's type");
    auto mixedOutput = descriptors(DataType::kHALF, DataType::kINT32);
    mixedOutput[4].desc.type = DataType::kFLOAT;
    expect(!build->supportsFormatCombination(4, mixedOutput.data(), 4, 1), "output must match query's type");
    auto strided = descriptors(DataType::kHALF, DataType::kINT32);
    strided[0].desc.format = TensorFormat::kCHW32;
    expect(!build->supportsFormatCombination(0, strided.data(), 4, 1), "linear format only");

    DataType inputTypes[4] = {DataType::kHALF, DataType::kHALF, DataType::kHALF, DataType::kINT32};
    DataType outputType = DataType::kFLOAT;
    expect(build->getOutputDataTypes(&outputType, 1, inputTypes, 4) == 0 && outputType == DataType::kHALF,
        "output type = query type");
    DataType const int8Inputs[4] = {DataType::kINT8, DataType::kINT8, DataType::kINT8, DataType::kINT32};
    std::printf("(an error message about the input types is expected next)\n");
    expect(build->getOutputDataTypes(&outputType, 1, int8Inputs, 4) != 0, "no output type for an int8 query");

    // Output shape = query shape (the expressions are opaque handles; only copied).
    DimsExprs inputs[4]{};
    auto const* handle = reinterpret_cast<IDimensionExpr const*>(&inputs); // never dereferenced
    inputs[0].nbDims = 4;
    for (int32_t d = 0; d < 4; ++d)
    {
        inputs[0].d[d] = handle + d;
    }
    inputs[1] = inputs[0];
    inputs[2] = inputs[0];
    inputs[3].nbDims = 2;
    DimsExprs output{};
    alignas(IExprBuilder) unsigned char builderStorage[sizeof(void*) * 4] = {};
    auto& builder = *reinterpret_cast<IExprBuilder*>(builderStorage); // unused by the plugin
    expect(build->getOutputShapes(inputs, 4, nullptr, 0, &output, 1, builder) == 0 && output.nbDims == 4
            && output.d[2] == inputs[0].d[2],
        "output dims = query dims");
    inputs[3].nbDims = 3;
    expect(build->getOutputShapes(inputs, 4, nullptr, 0, &output, 1, builder) != 0, "a mask of rank 3 is refused");
    inputs[3].nbDims = 2;

    // configurePlugin accepts the kernels' head dims and refuses others.
    auto good = descriptors(DataType::kHALF, DataType::kINT32, 64);
    expect(build->configurePlugin(good.data(), 4, good.data() + 4, 1) == 0, "head_dim 64 configures");
    auto odd = descriptors(DataType::kHALF, DataType::kINT32, 96);
    std::printf("(an error message about head_dim 96 is expected next)\n");
    expect(build->configurePlugin(odd.data(), 4, odd.data() + 4, 1) != 0, "head_dim 96 is refused");

    auto fewerKeyHeads = descriptors(DataType::kHALF, DataType::kINT32, 64);
    fewerKeyHeads[1].desc.dims = dims4(-1, 8, -1, 64); // query has 12
    std::printf("(an error message about the inputs' shapes is expected next)\n");
    expect(build->configurePlugin(fewerKeyHeads.data(), 4, fewerKeyHeads.data() + 4, 1) != 0,
        "a key of other known dims is refused at build time");

    auto huge = descriptors(DataType::kHALF, DataType::kINT32, 64);
    huge[0].max = dims4(1 << 20, 12, 4096, 64); // batch * heads * nb * nb past int32
    std::printf("(an error message about the profile's largest query shape is expected next)\n");
    expect(build->configurePlugin(huge.data(), 4, huge.data() + 4, 1) != 0,
        "a profile past the kernels' index range is refused at build time");

    // onShapeChange checks the runtime shapes the profile's wildcards left open.
    auto runtimeDescs = [](Dims query, Dims key, Dims mask) {
        std::vector<PluginTensorDesc> descs(5);
        for (auto& desc : descs)
        {
            desc.type = DataType::kHALF;
            desc.format = TensorFormat::kLINEAR;
            desc.dims = query;
        }
        descs[1].dims = key;
        descs[3].type = DataType::kINT32;
        descs[3].dims = mask;
        return descs;
    };
    auto shapes = runtimeDescs(dims4(2, 12, 100, 64), dims4(2, 12, 100, 64), dims2(2, 100));
    expect(runtime->onShapeChange(shapes.data(), 4, shapes.data() + 4, 1) == 0, "matching runtime shapes");
    std::printf("(four error messages about runtime shapes are expected next)\n");
    shapes = runtimeDescs(dims4(2, 12, 100, 64), dims4(2, 12, 96, 64), dims2(2, 100));
    expect(runtime->onShapeChange(shapes.data(), 4, shapes.data() + 4, 1) != 0, "a key of another length is refused");
    shapes = runtimeDescs(dims4(2, 12, 100, 64), dims4(2, 12, 100, 64), dims2(2, 100));
    shapes[2].dims = dims4(2, 12, 96, 64);
    expect(runtime->onShapeChange(shapes.data(), 4, shapes.data() + 4, 1) != 0, "a value of another length is refused");
    shapes = runtimeDescs(dims4(2, 12, 100, 64), dims4(2, 12, 100, 64), dims2(2, 64));
    expect(runtime->onShapeChange(shapes.data(), 4, shapes.data() + 4, 1) != 0, "a mask of another length is refused");
    shapes = runtimeDescs(dims4(2, 12, 100, 64), dims4(2, 12, 100, 64), dims2(3, 100));
    expect(runtime->onShapeChange(shapes.data(), 4, shapes.data() + 4, 1) != 0, "a mask of another batch is refused");

    // Workspace from the profile's maxima.
    MraAttentionParams largest{8, 12, 4096, 64, 64, 32, MRA_SPARSE, 1, 3, MRA_FLOAT16, MRA_BHSD};
    expect(build->getWorkspaceSize(good.data(), 4, good.data() + 4, 1) == workspaceSize(&largest),
        "workspace = mraWorkspaceSize at the maxima");
    expect(workspaceSize(&largest) > 0, "workspace is non-zero");

    // Bad node fields fail createPlugin (the builder then names the node).
    std::printf("(six error messages about bad fields are expected next)\n");
    NodeFields badMode;
    badMode.mode = "dense";
    expect(creator->createPlugin("bad", badMode.get(), TensorRTPhase::kBUILD) == nullptr, "approx_mode 'dense'");
    NodeFields badBlock;
    badBlock.blockSize = 16;
    expect(creator->createPlugin("bad", badBlock.get(), TensorRTPhase::kBUILD) == nullptr, "block_size 16");
    NodeFields badCount;
    badCount.numBlocks = 0;
    expect(creator->createPlugin("bad", badCount.get(), TensorRTPhase::kBUILD) == nullptr, "num_blocks 0");
    NodeFields badFirst;
    badFirst.first = -1;
    expect(creator->createPlugin("bad", badFirst.get(), TensorRTPhase::kBUILD) == nullptr, "first prior -1");
    NodeFields badDiagonal;
    badDiagonal.diagonal = -1;
    expect(creator->createPlugin("bad", badDiagonal.get(), TensorRTPhase::kBUILD) == nullptr, "diagonal prior -1");
    NodeFields wideCount;
    int64_t const tooMany = (int64_t{1} << 32) + 64; // would wrap to a valid 64 in int32
    wideCount.get();
    wideCount.fields[0] = PluginField("num_blocks", &tooMany, PluginFieldType::kINT64, 1);
    expect(creator->createPlugin("bad", &wideCount.collection, TensorRTPhase::kBUILD) == nullptr,
        "an int64 num_blocks past int32");
    int64_t const wideButFine = 64;
    wideCount.fields[0] = PluginField("num_blocks", &wideButFine, PluginFieldType::kINT64, 1);
    IPluginV3* fromInt64 = creator->createPlugin("wide", &wideCount.collection, TensorRTPhase::kBUILD);
    expect(fromInt64 != nullptr, "an int64 num_blocks that fits is accepted");
    delete fromInt64;

    delete plugin;
    return checks::report();
}
