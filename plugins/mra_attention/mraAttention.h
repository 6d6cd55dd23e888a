/*
 * MRA-2 attention behind a plain C interface: the CUDA kernels, the CPU reference, the TensorRT
 * plugin, the tests (ctypes) and the benchmarks all call these functions. No TensorRT or CUDA
 * type appears here; a CUDA stream is passed as `void*`.
 *
 * Semantics: MRA_SPEC.md and plugins/README.md. Tensors are dense row-major:
 *   query, key, value, output  [batch, heads, seq, head_dim]  (dtype: float32, float16 or bfloat16)
 *                              or, with layout MRA_BSHD, [batch, seq, heads, head_dim]
 *   mask                       [batch, seq] int32, non-zero for real tokens
 * Computation is in float32 whatever the dtype.
 */
#ifndef MRA_ATTENTION_H
#define MRA_ATTENTION_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define MRA_API __declspec(dllexport)
#else
#define MRA_API __attribute__((visibility("default")))
#endif

typedef enum { MRA_FLOAT32 = 0, MRA_FLOAT16 = 1, MRA_BFLOAT16 = 2 } MraDataType;
typedef enum { MRA_FULL = 0, MRA_SPARSE = 1 } MraApproxMode;

/* How query, key, value and the output lie in memory. MRA_BSHD is a [batch, seq, hidden]
 * projection viewed as heads: a model passes it without transposing (and copying) each tensor. */
typedef enum { MRA_BHSD = 0, MRA_BSHD = 1 } MraLayout;

typedef enum {
    MRA_OK = 0,
    MRA_INVALID_ARGUMENT = 1, /* a shape, setting or pointer is invalid */
    MRA_UNSUPPORTED = 2,      /* valid MRA, but not implemented here (e.g. head_dim on CUDA) */
    MRA_WORKSPACE_TOO_SMALL = 3,
    MRA_CUDA_ERROR = 4,       /* a CUDA call or launch failed; see mraLastCudaError() */
    MRA_OUT_OF_MEMORY = 5     /* the CPU twin could not get host memory or start its threads */
} MraStatus;

typedef struct {
    int32_t batch, heads, seq_len, head_dim;
    int32_t num_blocks; /* high-resolution blocks per (batch, head); clamped to nb * nb */
    int32_t block_size; /* tokens per block; the kernels support 32 */
    MraApproxMode approx_mode;
    int32_t initial_prior_first_n_blocks;
    int32_t initial_prior_diagonal_n_blocks;
    MraDataType dtype;
    MraLayout layout;   /* MRA_BHSD (0) unless set: a zero-initialised struct is the default */
} MraAttentionParams;

/* The version of this interface a library was built with. 2: MraAttentionParams.layout, and
 * the MraAttention node's layout attribute. A caller of another version reads the struct and
 * the node differently: it must refuse the library (mra_export/native.py does). */
#define MRA_ATTENTION_INTERFACE_VERSION 2
MRA_API int32_t mraInterfaceVersion(void);

/* Number of blocks per sequence, ceil(seq_len / block_size), and the clamped top-k. */
MRA_API int32_t mraNumBlocksPerRow(const MraAttentionParams* params);
MRA_API int32_t mraSelectedBlocksPerHead(const MraAttentionParams* params);

/* MRA_OK, or why these parameters are invalid (not about pointers). */
MRA_API MraStatus mraCheckParams(const MraAttentionParams* params);

/* Bytes of scratch memory both implementations need for these shapes (256-byte aligned). */
MRA_API size_t mraWorkspaceSize(const MraAttentionParams* params);

MRA_API const char* mraStatusString(MraStatus status);

/* The CPU reference; host pointers. `workspace` may be NULL (then it allocates its own). */
MRA_API MraStatus mraAttentionCpu(const MraAttentionParams* params, const void* query,
                                  const void* key, const void* value, const int32_t* mask,
                                  void* output, void* workspace, size_t workspace_size);

/* Threads mraAttentionCpu may use, over the (batch, head) rows; 0 (the default) is one per
 * hardware thread. Process-wide; small problems run on the calling thread alone. */
MRA_API void mraSetCpuThreads(int32_t threads);

/* The CUDA kernels; device pointers, all work queued on `stream` (a cudaStream_t), no
 * allocation and no host synchronisation. query, key, value and output must be 16-byte aligned
 * (they move in 16-byte vectors; cudaMalloc and TensorRT give 256): MRA_INVALID_ARGUMENT if not. */
MRA_API MraStatus mraAttentionCuda(const MraAttentionParams* params, const void* query,
                                   const void* key, const void* value, const int32_t* mask,
                                   void* output, void* workspace, size_t workspace_size,
                                   void* stream);

/* After a call, the selected high-resolution blocks of each (batch, head): flat indices
 * (query_block * nb + key_block) in ascending order, [batch * heads, mraSelectedBlocksPerHead].
 * Read from the workspace the call used (host memory for the CPU, device memory for CUDA). */
MRA_API const int32_t* mraSelectedBlocks(const MraAttentionParams* params, const void* workspace);

/* The message of the last CUDA error seen by mraAttentionCuda on this thread. */
MRA_API const char* mraLastCudaError(void);

#ifdef __cplusplus
}
#endif

#endif /* MRA_ATTENTION_H */
