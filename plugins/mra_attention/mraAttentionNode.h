/*
 * The MraAttention node's attributes (plugins/README.md, "The contract") with their defaults, as
 * the front-ends that read a node hold them: the TensorRT plugin (its fields) and the onnxruntime
 * op (the node's attributes). plugin_version and plugin_namespace are TensorRT's own.
 */
#ifndef MRA_ATTENTION_NODE_H
#define MRA_ATTENTION_NODE_H

#include "mraAttention.h"

#include <stdint.h>
#include <string.h>

namespace mra
{

struct NodeSettings
{
    int32_t numBlocks{1};
    MraApproxMode approxMode{MRA_FULL};
    int32_t blockSize{32};
    int32_t priorFirst{0};
    int32_t priorDiagonal{0};
    MraLayout layout{MRA_BHSD}; //!< "bhsd": [batch, heads, seq, head_dim]; "bshd": [batch, seq, heads, head_dim]

    //! Where query's shape holds the heads and the tokens.
    int32_t headsAxis() const
    {
        return layout == MRA_BSHD ? 2 : 1;
    }
    int32_t seqAxis() const
    {
        return layout == MRA_BSHD ? 1 : 2;
    }
    //! The node's view of a query shape, for messages.
    char const* shapeNames() const
    {
        return layout == MRA_BSHD ? "[batch, seq, heads, head_dim]" : "[batch, heads, seq, head_dim]";
    }
};

//! The layout attribute's text, "bhsd" or "bshd"; false for any other.
inline bool parseLayout(char const* text, MraLayout& layout)
{
    bool const tokenMajor = strcmp(text, "bshd") == 0;
    if (!tokenMajor && strcmp(text, "bhsd") != 0)
    {
        return false;
    }
    layout = tokenMajor ? MRA_BSHD : MRA_BHSD;
    return true;
}

inline char const* layoutName(MraLayout layout)
{
    return layout == MRA_BSHD ? "bshd" : "bhsd";
}

} // namespace mra

#endif // MRA_ATTENTION_NODE_H
