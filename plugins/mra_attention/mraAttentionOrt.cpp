/*
 * libmra_attention_ort.so: the plugin flavour's MraAttention node (plugins/README.md, "The
 * contract") as an onnxruntime custom op in the node's own domain, trt.plugins, so that one
 * plugin-flavour file runs in TensorRT and in onnxruntime alike. Two kernels:
 *
 *   CPUExecutionProvider   the C++ twin (mraAttentionCpu), one call per (batch, head) row, the
 *                          rows spread over onnxruntime's intra-op threads;
 *   CUDAExecutionProvider  the CUDA kernels (mraAttentionCuda) on onnxruntime's compute stream
 *                          (compiled where nvcc is found: MRA_ORT_CUDA).
 *
 * Both take their workspace from onnxruntime's allocator for the inputs' device. Built against
 * the C API of onnxruntime 1.20 (GetApi(20)), so onnxruntime 1.20 and every later one load it:
 * `SessionOptions.register_custom_ops_library(path)` calls RegisterCustomOps below.
 */
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include "mraAttention.h"
#include "mraAttentionNode.h"

#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#ifdef MRA_ORT_CUDA
#include <cuda_runtime_api.h>
#endif

static_assert(ORT_API_VERSION >= 20, "onnxruntime's C API headers of 1.20 or later are needed");

namespace
{

constexpr char kDomain[] = "trt.plugins";
constexpr char kOpName[] = "MraAttention";
constexpr uint32_t kOrtApiVersion = 20; // onnxruntime 1.20, the oldest that loads this library
constexpr char kCpu[] = "CPUExecutionProvider";
constexpr char kCuda[] = "CUDAExecutionProvider";
constexpr int64_t kCudaBlockSize = 32;

//! A refusal: one line, which reaches the user as onnxruntime's exception text.
struct Refusal : std::exception
{
    explicit Refusal(std::string text)
        : message(std::move(text))
    {
    }
    char const* what() const noexcept override
    {
        return message.c_str();
    }
    std::string message;
};

//! Runs `body`, turning what it throws into the OrtStatus onnxruntime reports (nullptr: success).
template <typename Body>
OrtStatusPtr guarded(std::string const& node, Body&& body) noexcept
{
    try
    {
        body();
        return nullptr;
    }
    catch (Refusal const& refusal)
    {
        return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, (node + ": " + refusal.message).c_str());
    }
    catch (Ort::Exception const& error)
    {
        return Ort::GetApi().CreateStatus(error.GetOrtErrorCode(), (node + ": " + error.what()).c_str());
    }
    catch (std::exception const& error)
    {
        return Ort::GetApi().CreateStatus(ORT_FAIL, (node + ": " + error.what()).c_str());
    }
}

char const* typeName(ONNXTensorElementDataType type)
{
    switch (type)
    {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    default: return "another type";
    }
}

bool storageType(ONNXTensorElementDataType type, MraDataType& dtype)
{
    switch (type)
    {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: dtype = MRA_FLOAT32; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: dtype = MRA_FLOAT16; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: dtype = MRA_BFLOAT16; return true;
    default: return false;
    }
}

//! Query, key and value share one of the three storage types; its MraDataType.
MraDataType commonStorageType(ONNXTensorElementDataType query, ONNXTensorElementDataType key,
    ONNXTensorElementDataType value)
{
    MraDataType dtype{};
    if (query != key || query != value || !storageType(query, dtype))
    {
        throw Refusal(std::string("query, key and value must share one type, float32, float16 or bfloat16 (got ")
            + typeName(query) + ", " + typeName(key) + ", " + typeName(value) + ")");
    }
    return dtype;
}

std::string shapeString(std::vector<int64_t> const& shape)
{
    std::string text = "[";
    for (size_t i = 0; i < shape.size(); ++i)
    {
        text += (i ? ", " : "") + (shape[i] < 0 ? std::string("?") : std::to_string(shape[i]));
    }
    return text + "]";
}

//! The node's attributes, with the plugin's defaults where one is absent (plugin_version and
//! plugin_namespace are TensorRT's and ignored here).
using Settings = mra::NodeSettings;

//! Whether the node has attribute `name` (of any type: onnxruntime's getters fail alike when it
//! is absent and when it has another type).
bool hasAttribute(Ort::ConstKernelInfo const& info, char const* name)
{
    OrtApi const& api = Ort::GetApi();
    int64_t integer = 0;
    float real = 0;
    size_t length = 0;
    bool found = false;
    for (OrtStatus* status : {api.KernelInfoGetAttribute_int64(info, name, &integer),
             api.KernelInfoGetAttribute_float(info, name, &real),
             api.KernelInfoGetAttribute_string(info, name, nullptr, &length)})
    {
        found = found || status == nullptr;
        api.ReleaseStatus(status); // accepts nullptr
    }
    return found;
}

int32_t intAttribute(Ort::ConstKernelInfo const& info, char const* name, int32_t fallback, int32_t low)
{
    if (!hasAttribute(info, name))
    {
        return fallback;
    }
    int64_t value = 0;
    OrtStatus* const status = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &value);
    if (status != nullptr)
    {
        Ort::GetApi().ReleaseStatus(status);
        throw Refusal(std::string("attribute ") + name + " must be an integer");
    }
    if (value < low || value > std::numeric_limits<int32_t>::max())
    {
        throw Refusal(std::string("attribute ") + name + " must be an integer from " + std::to_string(low)
            + " to 2^31-1, got " + std::to_string(value));
    }
    return static_cast<int32_t>(value);
}

std::string stringAttribute(Ort::ConstKernelInfo const& info, char const* name, char const* expected)
{
    size_t length = 0;
    if (OrtStatus* status = Ort::GetApi().KernelInfoGetAttribute_string(info, name, nullptr, &length))
    {
        Ort::GetApi().ReleaseStatus(status);
        throw Refusal(std::string("attribute ") + name + " must be the string " + expected);
    }
    std::string text(length, '\0');
    Ort::ThrowOnError(Ort::GetApi().KernelInfoGetAttribute_string(info, name, &text[0], &length));
    text.resize(std::strlen(text.c_str()));
    return text;
}

Settings readSettings(Ort::ConstKernelInfo const& info)
{
    Settings settings;
    settings.numBlocks = intAttribute(info, "num_blocks", settings.numBlocks, 1);
    settings.blockSize = intAttribute(info, "block_size", settings.blockSize, 1);
    settings.priorFirst = intAttribute(info, "initial_prior_first_n_blocks", settings.priorFirst, 0);
    settings.priorDiagonal = intAttribute(info, "initial_prior_diagonal_n_blocks", settings.priorDiagonal, 0);
    if (hasAttribute(info, "approx_mode")) // else "full"
    {
        std::string const mode = stringAttribute(info, "approx_mode", "\"full\" or \"sparse\"");
        if (mode != "full" && mode != "sparse")
        {
            throw Refusal("attribute approx_mode must be \"full\" or \"sparse\", got \"" + mode + "\"");
        }
        settings.approxMode = mode == "sparse" ? MRA_SPARSE : MRA_FULL;
    }
    if (hasAttribute(info, "layout")) // else "bhsd"
    {
        std::string const layout = stringAttribute(info, "layout", "\"bhsd\" or \"bshd\"");
        if (!mra::parseLayout(layout.c_str(), settings.layout))
        {
            throw Refusal("attribute layout must be \"bhsd\" or \"bshd\", got \"" + layout + "\"");
        }
    }
    return settings;
}

//! An OrtAllocator of onnxruntime's, released when done.
struct AllocatorDeleter
{
    void operator()(OrtAllocator* allocator) const
    {
        Ort::GetApi().ReleaseAllocator(allocator);
    }
};
using AllocatorPtr = std::unique_ptr<OrtAllocator, AllocatorDeleter>;

//! `bytes` from onnxruntime's allocator for the device of `memory` (its arena: no system call
//! per run), freed at the end of the scope.
class Workspace
{
public:
    Workspace(Ort::KernelContext const& context, OrtMemoryInfo const* memory, size_t bytes)
    {
        OrtAllocator* allocator = nullptr;
        Ort::ThrowOnError(Ort::GetApi().KernelContext_GetAllocator(context.GetOrtKernelContext(), memory, &allocator));
        mAllocator.reset(allocator);
        mData = mAllocator->Alloc(mAllocator.get(), bytes);
        if (mData == nullptr)
        {
            throw Refusal("onnxruntime's allocator could not give the " + std::to_string(bytes)
                + "-byte workspace");
        }
    }
    ~Workspace()
    {
        mAllocator->Free(mAllocator.get(), mData);
    }
    Workspace(Workspace const&) = delete;
    Workspace& operator=(Workspace const&) = delete;
    void* data() const
    {
        return mData;
    }

private:
    AllocatorPtr mAllocator;
    void* mData{nullptr};
};

//! One run's inputs: checked shapes and types, and the parameters of the C interface.
struct Problem
{
    Ort::ConstValue query{nullptr}, key{nullptr}, value{nullptr}, mask{nullptr};
    std::vector<int64_t> shape; // query's: [batch, heads, seq, head_dim], or [batch, seq, heads, head_dim]
    MraAttentionParams params{};
    size_t elementBytes{0};
    bool empty{false}; // a zero-sized dimension: the output is empty, nothing to compute
};

Problem describe(Ort::KernelContext const& context, Settings const& settings)
{
    Problem p;
    p.query = context.GetInput(0);
    p.key = context.GetInput(1);
    p.value = context.GetInput(2);
    p.mask = context.GetInput(3);
    auto const queryInfo = p.query.GetTensorTypeAndShapeInfo();
    auto const keyInfo = p.key.GetTensorTypeAndShapeInfo();
    auto const valueInfo = p.value.GetTensorTypeAndShapeInfo();
    auto const maskInfo = p.mask.GetTensorTypeAndShapeInfo();
    MraDataType const dtype
        = commonStorageType(queryInfo.GetElementType(), keyInfo.GetElementType(), valueInfo.GetElementType());
    p.shape = queryInfo.GetShape();
    if (p.shape.size() != 4)
    {
        throw Refusal(std::string("query must be ") + settings.shapeNames() + ", got shape " + shapeString(p.shape));
    }
    int64_t const batch = p.shape[0], heads = p.shape[settings.headsAxis()], seq = p.shape[settings.seqAxis()];
    for (auto const& [name, info] : {std::pair{"key", &keyInfo}, std::pair{"value", &valueInfo}})
    {
        if (info->GetShape() != p.shape)
        {
            throw Refusal(std::string(name) + " must have query's shape " + shapeString(p.shape) + ", got "
                + shapeString(info->GetShape()));
        }
    }
    std::vector<int64_t> const maskShape = maskInfo.GetShape();
    if (maskInfo.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32
        || maskShape != std::vector<int64_t>{batch, seq})
    {
        throw Refusal("mask must be int32 [batch, seq] = " + shapeString({batch, seq}) + ", got "
            + typeName(maskInfo.GetElementType()) + " " + shapeString(maskShape));
    }
    for (int64_t const size : p.shape)
    {
        p.empty = p.empty || size == 0;
        if (size > std::numeric_limits<int32_t>::max())
        {
            throw Refusal("query's shape " + shapeString(p.shape) + " is past the kernels' int32 index range");
        }
    }
    p.params = MraAttentionParams{static_cast<int32_t>(batch), static_cast<int32_t>(heads),
        static_cast<int32_t>(seq), static_cast<int32_t>(p.shape[3]), settings.numBlocks, settings.blockSize,
        settings.approxMode, settings.priorFirst, settings.priorDiagonal, dtype, settings.layout};
    p.elementBytes = dtype == MRA_FLOAT32 ? 4 : 2;
    if (!p.empty)
    {
        MraStatus const status = mraCheckParams(&p.params);
        if (status == MRA_UNSUPPORTED)
        {
            throw Refusal("query's shape " + shapeString(p.shape) + " (with " + std::to_string(settings.blockSize)
                + "-token blocks) is past the kernels' int32 index range");
        }
        if (status != MRA_OK)
        {
            throw Refusal(std::string("these shapes and attributes are refused: ") + mraStatusString(status));
        }
    }
    return p;
}

//! A kernel: the node's settings and where it runs. `compute` is the provider's.
class MraKernel
{
public:
    using Compute = void (*)(Ort::KernelContext const&, Settings const&);

    MraKernel(Settings settings, std::string node, Compute compute)
        : mSettings(settings)
        , mNode(std::move(node))
        , mCompute(compute)
    {
    }

    OrtStatusPtr ComputeV2(OrtKernelContext* context) noexcept
    {
        return guarded(mNode, [&] { mCompute(Ort::KernelContext(context), mSettings); });
    }

private:
    Settings mSettings;
    std::string mNode;
    Compute mCompute;
};

// ---- CPU: the C++ twin ---------------------------------------------------------------------------

//! What each row's task reads: plain pointers, so that nothing in a worker thread can throw.
struct CpuRows
{
    MraAttentionParams rowParams; // batch = heads = 1
    int32_t heads;
    size_t rowBytes; // one row of query, key, value or output: seq * head_dim elements
    char const* query;
    char const* key;
    char const* value;
    int32_t const* mask;
    char* output;
    char* workspace;
    size_t rowWorkspaceBytes;
    MraStatus* statuses;
};

//! Row `row` = (batch b, head h) on its own: the selection is per (batch, head), so one call
//! with batch = heads = 1 on that row's slices computes exactly its part of the whole.
void computeCpuRow(void* data, size_t row)
{
    CpuRows const& r = *static_cast<CpuRows const*>(data);
    size_t const offset = row * r.rowBytes;
    int32_t const* mask = r.mask + (row / size_t(r.heads)) * size_t(r.rowParams.seq_len);
    r.statuses[row] = mraAttentionCpu(&r.rowParams, r.query + offset, r.key + offset, r.value + offset, mask,
        r.output + offset, r.workspace + row * r.rowWorkspaceBytes, r.rowWorkspaceBytes);
}

//! [n0, n1, n2, chunk] -> [n0, n2, n1, chunk] (chunk: bytes), e.g. [batch, seq, heads, head_dim]
//! to [batch, heads, seq, head_dim] and back; a task per (a, b).
struct AxesSwap
{
    char const* from;
    char* to;
    size_t n1, n2, chunk;
};

void swapOneRow(void* data, size_t row)
{
    AxesSwap const& s = *static_cast<AxesSwap const*>(data);
    size_t const a = row / s.n1, b = row % s.n1;
    for (size_t c = 0; c < s.n2; ++c)
    {
        std::memcpy(s.to + ((a * s.n2 + c) * s.n1 + b) * s.chunk, s.from + (row * s.n2 + c) * s.chunk, s.chunk);
    }
}

void swapMiddleAxes(Ort::KernelContext const& context, char const* from, char* to, size_t n0, size_t n1, size_t n2,
    size_t chunk)
{
    AxesSwap swap{from, to, n1, n2, chunk};
    context.ParallelFor(swapOneRow, n0 * n1, 0, &swap); // onnxruntime's intra-op threads
}

void computeCpu(Ort::KernelContext const& context, Settings const& settings)
{
    Problem const p = describe(context, settings);
    auto output = context.GetOutput(0, p.shape);
    if (p.empty)
    {
        return;
    }
    // The rows below are contiguous [seq, head_dim] slices: with layout "bshd" the tensors go
    // through a head-major copy (what the graph's own Transposes cost before the layout existed;
    // the copies that layout saves are the GPU's).
    size_t const batch = size_t(p.params.batch), heads = size_t(p.params.heads), seq = size_t(p.params.seq_len);
    size_t const tokenBytes = size_t(p.params.head_dim) * p.elementBytes;
    size_t const tensorBytes = batch * heads * seq * tokenBytes;
    bool const tokenMajor = p.params.layout == MRA_BSHD;
    std::unique_ptr<Workspace> headMajor;
    if (tokenMajor)
    {
        headMajor = std::make_unique<Workspace>(context, p.query.GetTensorMemoryInfo(), 4 * tensorBytes);
    }
    auto asHeadMajor = [&](Ort::ConstValue const& tensor, size_t slot) -> char const* {
        char const* data = static_cast<char const*>(tensor.GetTensorRawData());
        if (!tokenMajor)
        {
            return data;
        }
        char* copy = static_cast<char*>(headMajor->data()) + slot * tensorBytes;
        swapMiddleAxes(context, data, copy, batch, seq, heads, tokenBytes);
        return copy;
    };
    CpuRows rows{};
    rows.rowParams = p.params;
    rows.rowParams.batch = rows.rowParams.heads = 1;
    rows.rowParams.layout = MRA_BHSD;
    rows.heads = p.params.heads;
    rows.rowBytes = size_t(p.params.seq_len) * size_t(p.params.head_dim) * p.elementBytes;
    rows.rowWorkspaceBytes = mraWorkspaceSize(&rows.rowParams); // 256-byte multiples
    size_t const rowCount = size_t(p.params.batch) * size_t(p.params.heads);
    Workspace const workspace(context, p.query.GetTensorMemoryInfo(), rowCount * rows.rowWorkspaceBytes);
    std::vector<MraStatus> statuses(rowCount, MRA_OK);
    rows.query = asHeadMajor(p.query, 0);
    rows.key = asHeadMajor(p.key, 1);
    rows.value = asHeadMajor(p.value, 2);
    rows.mask = p.mask.GetTensorData<int32_t>();
    char* const outputData = static_cast<char*>(output.GetTensorMutableRawData());
    rows.output = tokenMajor ? static_cast<char*>(headMajor->data()) + 3 * tensorBytes : outputData;
    rows.workspace = static_cast<char*>(workspace.data());
    rows.statuses = statuses.data();
    context.ParallelFor(computeCpuRow, rowCount, 0, &rows); // onnxruntime's intra-op threads
    for (MraStatus const status : statuses)
    {
        if (status != MRA_OK)
        {
            throw Refusal(std::string("the CPU kernel failed: ") + mraStatusString(status));
        }
    }
    if (tokenMajor)
    {
        swapMiddleAxes(context, rows.output, outputData, batch, heads, seq, tokenBytes);
    }
}

// ---- CUDA: the kernels on onnxruntime's stream --------------------------------------------------

#ifdef MRA_ORT_CUDA
std::string cudaFailureText(int device)
{
    std::string text = std::string("the CUDA kernels failed: ") + mraLastCudaError();
    if (std::strstr(mraLastCudaError(), cudaGetErrorString(cudaErrorNoKernelImageForDevice)) != nullptr)
    {
        int major = 0;
        int minor = 0;
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
        std::string const arch = std::to_string(major * 10 + minor);
        text += "; libmra_attention_ort.so was built for other CUDA architectures than this GPU's (sm_" + arch
            + "): rebuild it with 'make plugins MRA_CUDA_ARCHITECTURES=" + arch + "'";
    }
    return text;
}

void computeCuda(Ort::KernelContext const& context, Settings const& settings)
{
    Problem const p = describe(context, settings);
    int64_t const headDim = p.shape[3];
    if (headDim != 32 && headDim != 64 && headDim != 128)
    {
        throw Refusal("head_dim " + std::to_string(headDim)
            + " is not supported by the CUDA kernels (32, 64 or 128; the exporter pads smaller head dims to 32); "
              "run this model on the CPU provider");
    }
    if (settings.blockSize != kCudaBlockSize)
    {
        throw Refusal("the CUDA kernels take block_size 32, got " + std::to_string(settings.blockSize));
    }
    auto output = context.GetOutput(0, p.shape);
    if (p.empty)
    {
        return;
    }
    // The CUDA runtime is linked statically: its current device is its own, so set it to the one
    // onnxruntime put the tensors on (the stream and memory are shared through the primary context).
    int const device = p.query.GetTensorMemoryInfo().GetDeviceId();
    cudaError_t const selected = cudaSetDevice(device);
    if (selected != cudaSuccess)
    {
        throw Refusal(std::string("cudaSetDevice(") + std::to_string(device) + "): " + cudaGetErrorString(selected));
    }
    size_t const bytes = mraWorkspaceSize(&p.params);
    // Freed when this returns, with the kernels still queued: the arena hands it out again only to
    // work queued later on the same stream.
    Workspace const workspace(context, p.query.GetTensorMemoryInfo(), bytes);
    MraStatus const status = mraAttentionCuda(&p.params, p.query.GetTensorRawData(), p.key.GetTensorRawData(),
        p.value.GetTensorRawData(), p.mask.GetTensorData<int32_t>(), output.GetTensorMutableRawData(),
        workspace.data(), bytes, context.GetGPUComputeStream());
    if (status == MRA_CUDA_ERROR)
    {
        throw Refusal(cudaFailureText(device));
    }
    if (status == MRA_INVALID_ARGUMENT)
    {
        throw Refusal("the CUDA kernels need query, key, value and the output 16-byte aligned");
    }
    if (status != MRA_OK)
    {
        throw Refusal(std::string("the CUDA kernels failed: ") + mraStatusString(status));
    }
}
#endif

// ---- the op ------------------------------------------------------------------------------------

//! MraAttention for one provider and one storage type of query, key, value and output, or, with
//! ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, for any other combination: that one only refuses
//! (onnxruntime would otherwise report mixed types as "no kernel", not what is wrong).
struct MraOp : Ort::CustomOpBase<MraOp, MraKernel, /*WithStatus=*/true>
{
    MraOp(char const* provider, MraKernel::Compute compute, ONNXTensorElementDataType type)
        : mProvider(provider)
        , mCompute(compute)
        , mType(type)
    {
        // The API version the op is built to, whatever headers compiled it: onnxruntime reads
        // no OrtCustomOp member past it, and onnxruntime 1.20 refuses ops newer than itself.
        OrtCustomOp::version = kOrtApiVersion;
    }

    OrtStatusPtr CreateKernelV2(OrtApi const& /*api*/, OrtKernelInfo const* rawInfo, void** kernel) const
    {
        Ort::ConstKernelInfo const info(rawInfo);
        std::string node = std::string(kOpName) + " node";
        try
        {
            node += " '" + info.GetNodeName() + "'";
        }
        catch (Ort::Exception const&)
        {
        }
        return guarded(node, [&] {
            commonStorageType(inputType(info, 0), inputType(info, 1), inputType(info, 2));
            *kernel = new MraKernel(readSettings(info), node, mCompute);
        });
    }

    char const* GetName() const
    {
        return kOpName;
    }
    char const* GetExecutionProviderType() const
    {
        return mProvider;
    }
    size_t GetInputTypeCount() const
    {
        return 4; // query, key, value, mask
    }
    ONNXTensorElementDataType GetInputType(size_t index) const
    {
        return index == 3 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : mType;
    }
    size_t GetOutputTypeCount() const
    {
        return 1;
    }
    ONNXTensorElementDataType GetOutputType(size_t /*index*/) const
    {
        return mType;
    }

private:
    static ONNXTensorElementDataType inputType(Ort::ConstKernelInfo const& info, size_t index)
    {
        return info.GetInputTypeInfo(index).GetTensorTypeAndShapeInfo().GetElementType();
    }

    char const* mProvider;
    MraKernel::Compute mCompute;
    ONNXTensorElementDataType mType;
};

// onnxruntime builds the op's schema from the first op of the name, and an untyped output there
// must have exactly one untyped input: so the typed ops come first, the catch-all op last.
MraOp gOps[] = {
    {kCpu, computeCpu, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT},
    {kCpu, computeCpu, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16},
    {kCpu, computeCpu, ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16},
    {kCpu, computeCpu, ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED},
#ifdef MRA_ORT_CUDA
    {kCuda, computeCuda, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT},
    {kCuda, computeCuda, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16},
    {kCuda, computeCuda, ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16},
    {kCuda, computeCuda, ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED},
#endif
};

} // namespace

//! The library's entry point (onnxruntime's RegisterCustomOps convention): adds the trt.plugins
//! domain with MraAttention to `options`.
extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(
    OrtSessionOptions* options, OrtApiBase const* apiBase)
{
    OrtApi const* api = apiBase->GetApi(kOrtApiVersion);
    if (api == nullptr) // onnxruntime older than 1.20: say so through the API every version has
    {
        std::string const message = std::string("libmra_attention_ort.so needs onnxruntime 1.20 or later, this is ")
            + apiBase->GetVersionString();
        return apiBase->GetApi(1)->CreateStatus(ORT_FAIL, message.c_str());
    }
    Ort::InitApi(api);
    OrtCustomOpDomain* domain = nullptr;
    if (OrtStatus* status = api->CreateCustomOpDomain(kDomain, &domain))
    {
        return status;
    }
    for (MraOp& op : gOps)
    {
        if (OrtStatus* status = api->CustomOpDomain_Add(domain, &op))
        {
            return status;
        }
    }
    // The domain is never released: sessions made from these options keep pointing at it, and may
    // outlive any point this library could release it at (onnxruntime itself may be gone by exit).
    return api->AddCustomOpDomain(options, domain);
}
