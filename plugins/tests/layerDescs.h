/*
 * What TensorRT shows an MraAttention plugin of its layer's tensors at build time, for the test
 * programs that drive the plugin through TensorRT's interfaces (pluginContractTest.cpp,
 * pluginRunner.cpp): query, key, value, mask and output, the mask [batch, seq] of the query's
 * [batch, heads, seq, head_dim] (seqAxis 2) or [batch, seq, heads, head_dim] (seqAxis 1, the
 * node's layout "bshd").
 */
#ifndef MRA_PLUGIN_TESTS_LAYER_DESCS_H
#define MRA_PLUGIN_TESTS_LAYER_DESCS_H

#include "NvInferRuntime.h"

#include <array>
#include <cstdint>
#include <vector>

namespace checks
{

using QueryShape = std::array<int64_t, 4>; //!< [batch, heads, seq, head_dim]; -1 where dynamic

inline nvinfer1::Dims dimsOf(QueryShape const& query, bool isMask, int32_t seqAxis)
{
    nvinfer1::Dims dims{};
    dims.nbDims = isMask ? 2 : 4;
    for (int32_t d = 0; d < dims.nbDims; ++d)
    {
        dims.d[d] = isMask ? query[d == 0 ? 0 : seqAxis] : query[d];
    }
    return dims;
}

//! The five tensors' descriptors: `dims` (-1 where dynamic) and the profile's min, opt and max.
inline std::vector<nvinfer1::DynamicPluginTensorDesc> layerDescs(nvinfer1::DataType type,
    nvinfer1::DataType maskType, QueryShape const& dims, QueryShape const& min, QueryShape const& opt,
    QueryShape const& max, int32_t seqAxis = 2)
{
    std::vector<nvinfer1::DynamicPluginTensorDesc> descs(5);
    for (int32_t i = 0; i < 5; ++i)
    {
        bool const isMask = i == 3;
        descs[i].desc.type = isMask ? maskType : type;
        descs[i].desc.format = nvinfer1::TensorFormat::kLINEAR;
        descs[i].desc.dims = dimsOf(dims, isMask, seqAxis);
        descs[i].min = dimsOf(min, isMask, seqAxis);
        descs[i].opt = dimsOf(opt, isMask, seqAxis);
        descs[i].max = dimsOf(max, isMask, seqAxis);
    }
    return descs;
}

//! supportsFormatCombination for every position of `descs` (4 inputs, 1 output).
inline bool supportsAllFormats(
    nvinfer1::IPluginV3OneBuild* build, std::vector<nvinfer1::DynamicPluginTensorDesc> const& descs)
{
    for (int32_t pos = 0; pos < 5; ++pos)
    {
        if (!build->supportsFormatCombination(pos, descs.data(), 4, 1))
        {
            return false;
        }
    }
    return true;
}

} // namespace checks

#endif // MRA_PLUGIN_TESTS_LAYER_DESCS_H
