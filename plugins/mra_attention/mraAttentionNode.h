/*
 * The MraAttention node's attributes (plugins/README.md, "The contract") with their defaults, as
 * the front-ends that read a node hold them: the TensorRT plugin (its fields) and the onnxruntime
 * op (the node's attributes). plugin_version and plugin_namespace are TensorRT's own.
 */
#ifndef MRA_ATTENTION_NODE_H
#define MRA_ATTENTION_NODE_H

#include "mraAttention.h"

#include <stdint.h>

namespace mra
{

struct NodeSettings
{
    int32_t numBlocks{1};
    MraApproxMode approxMode{MRA_FULL};
    int32_t blockSize{32};
    int32_t priorFirst{0};
    int32_t priorDiagonal{0};
};

} // namespace mra

#endif // MRA_ATTENTION_NODE_H
