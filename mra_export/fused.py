"""``mra_export::mra_attention``: MRA attention as one PyTorch op that runs the kernel library.

- CUDA tensors: the CUDA kernels (``libmra_attention_cuda.so``) on the current stream, the
  workspace from PyTorch's caching allocator, no host synchronisation (CUDA-graph capturable).
- CPU tensors: the C++ twin (``libmra_attention_cpu.so``) on ``torch.get_num_threads()`` threads,
  one (batch, head) row per thread at a time.
- Q, K and V that are heads of a ``[B, S, H * D]`` projection (``view`` + ``transpose``, as the
  patched model passes them) go to the library as they lie, and the output comes back the same
  way (``memory_layout``); other tensors are made contiguous.
- ``register_fake`` lets torch.compile and torch.export trace it; the plugin flavour of the
  exporter turns it into the ``MraAttention`` ONNX node (``export/plugin_node.py``).
- Gradients go through the PyTorch reference: the backward pass recomputes ``mra_attention`` with
  autograd on the saved inputs. Training works, at the reference's cost in the backward pass.

``make plugins`` builds the libraries (nvcc for the CUDA one).
"""

from __future__ import annotations

import functools

import torch

from . import native
from .attention import mra_attention
from .errors import InputError, UserError

# The head dims the CUDA kernels are compiled for (plugins/README.md); the C++ twin takes any.
CUDA_HEAD_DIMS = (32, 64, 128)
CUDA_BLOCK_SIZE = 32
LIBRARIES = {"cpu": native.CPU_LIBRARY, "cuda": native.CUDA_LIBRARY}
ALIGNMENT = 16  # the CUDA kernels move 16-byte vectors


def library_built(device_type: str) -> bool:
    """Whether ``make plugins`` built the kernel library for this device type."""
    return device_type in LIBRARIES and native.is_built(LIBRARIES[device_type])


@functools.cache
def kernel_library(device_type: str) -> native.MraLibrary:
    """The kernel library for ``device_type`` ("cpu" or "cuda"), or a one-line error."""
    if device_type not in LIBRARIES:
        raise UserError(f"the fused MRA attention runs on cpu or cuda tensors, not {device_type}; "
                        "patch the model with attention='reference' there")
    path = native.build_dir() / LIBRARIES[device_type]
    if not path.is_file():
        needs = " (it needs nvcc)" if device_type == "cuda" else ""
        raise UserError(f"the fused MRA attention for {device_type} needs {path}, which is not "
                        f"built; run 'make plugins'{needs}, or patch the model with "
                        "attention='reference'")
    return native.MraLibrary(path)


def check_inputs(query, key, value, mask, block_size: int) -> None:
    """One line for what the libraries cannot take, before they see it."""
    if not (query.shape == key.shape == value.shape) or query.dim() != 4:
        raise InputError("query, key and value must share one [batch, heads, seq, head_dim] "
                         f"shape, got {list(query.shape)}, {list(key.shape)}, {list(value.shape)}")
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in native.DTYPES:
        raise InputError("query, key and value must share one dtype of float32, float16 or "
                         f"bfloat16, got {query.dtype}, {key.dtype}, {value.dtype}")
    if mask.shape != (query.shape[0], query.shape[2]):
        raise InputError(f"the mask must be [batch, seq] = {[query.shape[0], query.shape[2]]}, "
                         f"got {list(mask.shape)}")
    devices = {t.device for t in (query, key, value, mask)}
    if len(devices) != 1:
        raise InputError("query, key, value and mask must be on one device, got "
                         f"{', '.join(sorted(map(str, devices)))}")
    if query.is_cuda and (query.shape[-1] not in CUDA_HEAD_DIMS or block_size != CUDA_BLOCK_SIZE):
        raise InputError(f"the CUDA kernels take head_dim {', '.join(map(str, CUDA_HEAD_DIMS))} "
                         f"and block_size {CUDA_BLOCK_SIZE}, got head_dim {query.shape[-1]}, "
                         f"block_size {block_size}; pad the head dim or use attention='reference'")


def memory_layout(query, key, value) -> str:
    """How the op hands the three tensors to the library. "bshd" where each is a ``[B, S, H, D]``
    tensor seen as ``[B, H, S, D]`` (a projection split into heads, as the patched model passes
    them): no copy in, and the output comes back the same way, so the caller's transpose back to
    ``[B, S, H * D]`` is free too. Otherwise "bhsd", each made contiguous."""
    if all(t.transpose(1, 2).is_contiguous() for t in (query, key, value)):
        return "bshd"
    return "bhsd"


def _layout_of(query, key, value) -> str:
    """``memory_layout`` of real tensors, sooner for what the patched model passes: three heads
    of ``[B, S, H * D]`` projections have exactly the token-major strides, which three
    transposes and contiguity checks took microseconds of every call to find. (The fake kernel
    keeps ``memory_layout``: comparing symbolic sizes would add guards to an export.)"""
    batch, heads, seq_len, head_dim = query.shape
    token_major = (seq_len * heads * head_dim, head_dim, heads * head_dim, 1)
    if query.stride() == key.stride() == value.stride() == token_major:
        return "bshd"
    return memory_layout(query, key, value)


def _as_c_array(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """Laid out as ``layout`` (from ``memory_layout``) says and 16-byte aligned (a view into a
    larger tensor may be neither; ``clone`` keeps the strides and gets a fresh, aligned
    allocation). "bshd" tensors are laid out so already."""
    if layout != "bshd":
        tensor = tensor.contiguous()
    return tensor if tensor.data_ptr() % ALIGNMENT == 0 else tensor.clone()


@functools.lru_cache(maxsize=256)
def _checked_params(library: native.MraLibrary, shape: tuple[int, ...], dtype: torch.dtype,
                    layout: str, num_blocks: int, approx_mode: str, block_size: int,
                    initial_prior_first_n_blocks: int, initial_prior_diagonal_n_blocks: int
                    ) -> tuple[native.MraAttentionParams, int]:
    """A call's parameters and workspace size, checked by ``library`` once per shape and setting:
    a call from Python costs microseconds that the kernels of a short sequence do not hide, and
    a model makes the same call layer after layer."""
    params = native.make_params(shape, dtype, num_blocks=num_blocks, approx_mode=approx_mode,
                                block_size=block_size,
                                initial_prior_first_n_blocks=initial_prior_first_n_blocks,
                                initial_prior_diagonal_n_blocks=initial_prior_diagonal_n_blocks,
                                layout=layout)
    return params, library.workspace_size(params)


# The op is defined with torch.library.Library rather than torch.library.custom_op: the
# latter's per-call wrapping (alias checks, a dynamo guard) cost about 9 µs more a call from
# Python on the 2-core machine under torch.no_grad, 2.5 µs under torch.inference_mode.
_LIBRARY = torch.library.Library("mra_export", "DEF")
_LIBRARY.define("mra_attention(Tensor query, Tensor key, Tensor value, Tensor mask, int num_blocks, "
                "str approx_mode, int block_size, int initial_prior_first_n_blocks, "
                "int initial_prior_diagonal_n_blocks) -> Tensor")


def _mra_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   mask: torch.Tensor, num_blocks: int, approx_mode: str, block_size: int,
                   initial_prior_first_n_blocks: int,
                   initial_prior_diagonal_n_blocks: int) -> torch.Tensor:
    """MRA attention of ``[B, H, S, D]`` query/key/value and a ``[B, S]`` mask (non-zero for
    real tokens), computed by the kernel library of the tensors' device."""
    check_inputs(query, key, value, mask, block_size)
    if query.numel() == 0:  # an empty batch, as torch's own ops allow
        return native.empty_in_layout(query.shape, memory_layout(query, key, value), query)
    layout = _layout_of(query, key, value)
    library = kernel_library(query.device.type)
    params, workspace_size = _checked_params(
        library, tuple(query.shape), query.dtype, layout, num_blocks, approx_mode, block_size,
        initial_prior_first_n_blocks, initial_prior_diagonal_n_blocks)
    if not query.is_cuda:
        library.set_cpu_threads(torch.get_num_threads())
    mask = mask if mask.dtype == torch.int32 else (mask != 0).to(torch.int32)
    output, _ = library.run(params, *(_as_c_array(t, layout) for t in (query, key, value)),
                            mask.contiguous(), workspace_size)
    return output


# Every device type reaches the one function, which names the ones without a library in a line.
_LIBRARY.impl("mra_attention", _mra_attention, "CompositeExplicitAutograd")
mra_attention_op = torch.ops.mra_export.mra_attention.default


@torch.library.register_fake("mra_export::mra_attention", lib=_LIBRARY)
def _(query, key, value, mask, num_blocks, approx_mode, block_size, initial_prior_first_n_blocks,
      initial_prior_diagonal_n_blocks):
    return native.empty_in_layout(query.shape, memory_layout(query, key, value), query)


def _save_for_backward(ctx, inputs, output) -> None:
    query, key, value, mask, *settings = inputs
    ctx.save_for_backward(query, key, value, mask)
    ctx.settings = dict(zip(("num_blocks", "approx_mode", "block_size",
                             "initial_prior_first_n_blocks", "initial_prior_diagonal_n_blocks"),
                            settings))


def _backward_through_reference(ctx, grad_output):
    """The gradients of the PyTorch reference at the saved inputs (the forward recomputed)."""
    query, key, value, mask = ctx.saved_tensors
    wanted = ctx.needs_input_grad[:3]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(need) for t, need in zip((query, key, value), wanted)]
        output = mra_attention(*leaves, mask, **ctx.settings)
        grads = iter(torch.autograd.grad(output, [t for t in leaves if t.requires_grad],
                                         grad_output))
    return (*(next(grads) if need else None for need in wanted), None, None, None, None, None, None)


torch.library.register_autograd("mra_export::mra_attention", _backward_through_reference,
                               setup_context=_save_for_backward, lib=_LIBRARY)


def fused_mra_attention(query, key, value, mask, *, num_blocks: int, approx_mode: str = "full",
                        block_size: int = 32, initial_prior_first_n_blocks: int = 0,
                        initial_prior_diagonal_n_blocks: int = 0) -> torch.Tensor:
    """``mra_attention``'s signature, computed by the op."""
    return mra_attention_op(query, key, value, mask, num_blocks, approx_mode, block_size,
                            initial_prior_first_n_blocks, initial_prior_diagonal_n_blocks)


def library_takes(device_type: str, head_dim: int, block_size: int) -> bool:
    """Whether ``attention="auto"`` computes inputs of ``head_dim`` on a device type with the
    op: its library is built for the device type and takes the shape."""
    if not library_built(device_type):
        return False
    return device_type != "cuda" or (head_dim in CUDA_HEAD_DIMS and block_size == CUDA_BLOCK_SIZE)
