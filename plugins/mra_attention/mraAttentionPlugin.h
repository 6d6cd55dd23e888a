/*
 * MraAttention: the TensorRT IPluginV3 plugin of transformers' MRA attention.
 *
 * Inputs  0 query, 1 key, 2 value: [batch, heads, seq, head_dim] ([batch, seq, heads, head_dim]
 *         with layout "bshd"), float32/float16/bfloat16 (all the same); 3 mask: [batch, seq]
 *         int32, non-zero for real tokens.
 * Output  0 context: the query's shape and type.
 * Fields  num_blocks (int32), approx_mode ("full"|"sparse"), block_size (int32, 32),
 *         initial_prior_first_n_blocks (int32), initial_prior_diagonal_n_blocks (int32),
 *         layout ("bhsd"|"bshd"; "bhsd" where absent).
 * The contract is the ONNX node trt.plugins::MraAttention (plugins/README.md).
 */
#ifndef MRA_ATTENTION_PLUGIN_H
#define MRA_ATTENTION_PLUGIN_H

#include "NvInferRuntime.h"
#include "mraAttention.h"
#include "mraAttentionNode.h"

#include <string>
#include <vector>

namespace mra
{
namespace plugin
{

constexpr char const* kPluginName = "MraAttention";
constexpr char const* kPluginVersion = "1";

//! The plugin's fields (what the ONNX node's attributes carry).
using Settings = NodeSettings;

class MraAttentionPlugin : public nvinfer1::IPluginV3,
                           public nvinfer1::IPluginV3OneCore,
                           public nvinfer1::IPluginV3OneBuild,
                           public nvinfer1::IPluginV3OneRuntime
{
public:
    MraAttentionPlugin(Settings const& settings, std::string pluginNamespace);
    MraAttentionPlugin(MraAttentionPlugin const& other);
    MraAttentionPlugin& operator=(MraAttentionPlugin const&) = delete;
    ~MraAttentionPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs, nvinfer1::DataType const* inputTypes,
        int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    //! The C interface's parameters for query dims [B, H, S, D] of this type.
    MraAttentionParams params(nvinfer1::Dims const& queryDims, nvinfer1::DataType type) const;
    void describeFields();

    Settings mSettings;
    std::string mNamespace;
    std::string mApproxMode; // "full" / "sparse", serialised as kCHAR
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

class MraAttentionPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    MraAttentionPluginCreator();
    ~MraAttentionPluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFieldCollection{};
    std::string mNamespace;
};

//! Reports through the logger TensorRT gives the library (setLoggerFinder), else stderr.
void logError(std::string const& message) noexcept;

} // namespace plugin
} // namespace mra

#endif // MRA_ATTENTION_PLUGIN_H
