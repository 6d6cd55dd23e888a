"""Make any transformers MRA model compute its attention with ``mra_attention``.

``patch_model`` swaps the class of every ``MraSelfAttention`` for ``PatchedMraSelfAttention`` and
gives it an ``MraAttentionCore`` holding the layer's settings. The weights, the state dict and
every other module stay as transformers made them. The core is its own module so that exporters
can find (and replace) each layer's attention by name.

Each core computes its attention one of three ways (``patch_model(model, attention=...)``):
``"reference"`` is ``mra_export.attention.mra_attention`` (PyTorch operations); ``"fused"`` is the
``mra_export::mra_attention`` op over the kernel library (``mra_export/fused.py``); ``"auto"``
takes the op where its library is built for the tensors' device and takes their shape, and the
reference elsewhere and while exporting (the portable graph is the reference's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.mra.modeling_mra import MraModel, MraPreTrainedModel, MraSelfAttention

from . import fused
from .attention import exporting, mra_attention, running_eagerly
from .errors import InputError, InputTypeError

# transformers zero-pads head dims under 32 to 32 (its CUDA kernels' warp size) before
# attention, so the scale becomes 1/sqrt(32); the patched model keeps that rule.
MIN_HEAD_DIM = 32
ATTENTION_CHOICES = ("auto", "fused", "reference")


class MraAttentionCore(nn.Module):
    """One layer's attention core: ``[B, H, S, D]`` query/key/value and a ``[B, S]`` mask."""

    def __init__(self, *, num_blocks: int, approx_mode: str, initial_prior_first_n_blocks: int,
                 initial_prior_diagonal_n_blocks: int, block_size: int = 32,
                 attention: str = "auto"):
        super().__init__()
        self.attention = attention  # one of ATTENTION_CHOICES
        self.num_blocks = num_blocks
        self.approx_mode = approx_mode
        self.initial_prior_first_n_blocks = initial_prior_first_n_blocks
        self.initial_prior_diagonal_n_blocks = initial_prior_diagonal_n_blocks
        self.block_size = block_size

    @classmethod
    def for_layer(cls, attention: MraSelfAttention) -> MraAttentionCore:
        return cls(num_blocks=attention.num_block, approx_mode=attention.approx_mode,
                   initial_prior_first_n_blocks=attention.initial_prior_first_n_blocks,
                   initial_prior_diagonal_n_blocks=attention.initial_prior_diagonal_n_blocks)

    def settings(self) -> dict:
        return dict(num_blocks=self.num_blocks, approx_mode=self.approx_mode,
                    block_size=self.block_size,
                    initial_prior_first_n_blocks=self.initial_prior_first_n_blocks,
                    initial_prior_diagonal_n_blocks=self.initial_prior_diagonal_n_blocks)

    def forward(self, query, key, value, attention_mask, use_op: bool | None = None):
        """``use_op``: ``self.runs_fused(query)``, where the caller has asked already."""
        if use_op is None:
            use_op = self.runs_fused(query)
        if use_op:
            return fused.fused_mra_attention(query, key, value, attention_mask, **self.settings())
        return mra_attention(query, key, value, attention_mask, **self.settings())

    def runs_fused(self, query: torch.Tensor) -> bool:
        return self.runs_fused_on(query.device.type, query.shape[-1])

    def runs_fused_on(self, device_type: str, head_dim: int) -> bool:
        """Whether this core computes ``[..., head_dim]`` queries on a device type with the op."""
        if self.attention == "fused":
            return True
        return (self.attention == "auto" and not exporting()
                and fused.library_takes(device_type, head_dim, self.block_size))

    def extra_repr(self) -> str:
        settings = {**self.settings(), "attention": self.attention}
        return ", ".join(f"{name}={value!r}" for name, value in settings.items())


class PatchedMraSelfAttention(MraSelfAttention):
    """``MraSelfAttention`` whose attention is ``mra_attention``, each sample with its own mask."""

    mra_core: MraAttentionCore

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        batch, seq_len, _ = hidden_states.shape
        query, key, value = (self._split_heads(projection(hidden_states))
                             for projection in (self.query, self.key, self.value))
        padding = max(0, MIN_HEAD_DIM - self.attention_head_size)
        if padding:
            query, key, value = (F.pad(t, (0, padding)) for t in (query, key, value))
        # The op's library reads an int32 mask: it gets one, and converts nothing.
        use_op = self.mra_core.runs_fused(query)
        mask_dtype = torch.int32 if use_op else torch.float32
        mask = _token_mask(attention_mask, batch, seq_len, hidden_states.device, mask_dtype)
        context = self.mra_core(query, key, value, mask, use_op)[..., : self.attention_head_size]
        context = context.transpose(1, 2).reshape(batch, seq_len, self.all_head_size)
        return (context,)

    def _split_heads(self, projected: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = projected.shape
        heads = projected.view(batch, seq_len, self.num_attention_heads, self.attention_head_size)
        return heads.transpose(1, 2)


def patch_model(model: MraPreTrainedModel, attention: str = "auto") -> MraPreTrainedModel:
    """Patch a transformers ``Mra*`` model in place (any of the six heads) and return it.

    The patched model runs on any device, gives each sample of a ragged batch the output it gets
    alone, and accepts every length from 1 to ``config.max_position_embeddings``. ``attention``:
    "auto" (the fused op where its library is built, else the reference), "fused" or
    "reference" (module docstring). Patching again only sets ``attention``.
    """
    if attention not in ATTENTION_CHOICES:
        raise InputError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got "
                         f"{attention!r}")
    if not isinstance(model, MraPreTrainedModel):
        raise InputTypeError("patch_model expects a transformers MRA model (MraModel or an "
                             f"MraFor* head), got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, MraSelfAttention)]
    if not layers:
        raise InputError(f"{type(model).__name__} has no MraSelfAttention layer to patch")
    if attention == "fused":
        _check_fused_built(model)
    for layer in layers:
        if not isinstance(layer, PatchedMraSelfAttention):
            layer.__class__ = PatchedMraSelfAttention
            layer.mra_core = MraAttentionCore.for_layer(layer)
        layer.mra_core.attention = attention
    for base in model.modules():
        if isinstance(base, MraModel):
            _check_inputs(base, model.config)
            _make_the_op_mask_once(base, model.config)
    return model


def _check_fused_built(model: nn.Module) -> None:
    """``attention="fused"`` on a device without its library: one line naming make plugins."""
    parameter = next(model.parameters(), None)
    device_type = parameter.device.type if parameter is not None else "cpu"
    if device_type != "meta":
        fused.kernel_library(device_type)  # raises UserError when not built


def attention_cores(model: nn.Module) -> list[MraAttentionCore]:
    """The attention cores of a patched model, in layer order."""
    return [m for m in model.modules() if isinstance(m, MraAttentionCore)]


def _token_mask(attention_mask, batch: int, seq_len: int, device,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``[batch, seq]`` mask of ``dtype``, 1 for real tokens, from what transformers passes
    down."""
    if attention_mask is None:
        return torch.ones(batch, seq_len, device=device, dtype=dtype)
    if attention_mask.dim() == 4 and attention_mask.is_floating_point():
        # An additive [B, 1, Q, K] mask: 0 where attended; revert it as transformers does.
        return (attention_mask[:, 0, -1, :] == 0).to(dtype)
    if attention_mask.dim() == 2:
        if attention_mask.dtype == dtype == torch.int32:
            return attention_mask  # the op's library reads any non-zero as a real token
        return (attention_mask != 0).to(dtype)
    raise InputError(f"attention_mask must be [batch, seq], got shape {tuple(attention_mask.shape)}")


# MraModel.forward's leading parameters, in order: a pre-hook sees them positional or by name.
FORWARD_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")
EMBEDDING_INDICES = (torch.int64, torch.int32)  # what nn.Embedding takes
# transformers offsets MRA's positions by 2 (RoBERTa's padding_idx + 1): its table has 2 rows more.
POSITION_OFFSET = 2


def _check_inputs(base: MraModel, config) -> None:
    """Clear errors for the inputs transformers would fail on deep inside (an embedding's
    IndexError, a shape error in the embeddings' sum), before the forward pass."""
    if getattr(base, "_mra_export_input_check", False):
        return

    def check(module, args, kwargs):
        given = {**dict(zip(FORWARD_INPUTS, args)), **kwargs}
        name = "input_ids" if given.get("input_ids") is not None else "inputs_embeds"
        tokens = given.get(name)
        if tokens is None:
            return  # transformers says to pass one of them
        _check_tokens(name, tokens, config)
        if exporting() or torch.compiler.is_compiling():
            return  # a comparison of symbolic sizes would become a guard of the trace
        batch, seq_len = tokens.shape[:2]
        _check_mask(given.get("attention_mask"), batch, seq_len)
        for extra, size in (("token_type_ids", config.type_vocab_size),
                            ("position_ids", config.max_position_embeddings + POSITION_OFFSET)):
            if given.get(extra) is not None:
                _check_per_token(extra, given[extra], batch, seq_len)
                _check_range(extra, given[extra], size)

    base.register_forward_pre_hook(check, with_kwargs=True)
    base._mra_export_input_check = True


def _check_tokens(name: str, tokens, config) -> None:
    """``input_ids`` [batch, seq] of integers in the vocabulary, or ``inputs_embeds``
    [batch, seq, hidden]; at most max_position_embeddings tokens."""
    if not isinstance(tokens, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(tokens).__name__}; use "
                             "torch.as_tensor (OrtMraModel takes numpy arrays and lists too)")
    axes = ["batch", "sequence"] + (["hidden"] if name == "inputs_embeds" else [])
    if tokens.dim() != len(axes) or tokens.shape[1] == 0:
        raise InputError(f"{name} must be [{', '.join(axes)}] with at least one token, got "
                         f"shape {list(tokens.shape)}")
    if tokens.shape[1] > config.max_position_embeddings:
        raise InputError(f"sequence length {tokens.shape[1]} is longer than the model's "
                         f"max_position_embeddings={config.max_position_embeddings}; "
                         "truncate the input, e.g. tokenizer(..., truncation=True, "
                         f"max_length={config.max_position_embeddings})")
    if name == "inputs_embeds" and tokens.shape[2] != config.hidden_size:
        raise InputError(f"inputs_embeds must be [batch, sequence, {config.hidden_size}] for this "
                         f"model (its hidden_size), got shape {list(tokens.shape)}")
    if name == "input_ids":
        if tokens.is_floating_point():
            raise InputError(f"input_ids must hold integers, got {tokens.dtype}")
        if tokens.dtype not in EMBEDDING_INDICES:  # bool, uint8, int16: nn.Embedding refuses them
            raise InputError(f"input_ids must be int64 (or int32), got {tokens.dtype}; use .long()")
        _check_range("input_ids", tokens, config.vocab_size)


def _check_mask(mask, batch: int, seq_len: int) -> None:
    """MRA masks keys by padding only: one [batch, seq] row of 0/1 a sample."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise InputTypeError(f"attention_mask must be a torch.Tensor, got {type(mask).__name__}; "
                             "use torch.as_tensor")
    if tuple(mask.shape) != (batch, seq_len):
        raise InputError(f"attention_mask must be [batch, sequence] = [{batch}, {seq_len}] (MRA "
                         f"masks padding tokens only), got shape {list(mask.shape)}")


def _check_per_token(name: str, values, batch: int, seq_len: int) -> None:
    """token_type_ids and position_ids: an embedding's indices for each token, [batch, seq],
    or one row for the whole batch ([1, seq] or [seq]), as transformers broadcasts them."""
    if not isinstance(values, torch.Tensor) or values.dtype not in EMBEDDING_INDICES:
        got = values.dtype if isinstance(values, torch.Tensor) else type(values).__name__
        raise InputError(f"{name} must be a torch.Tensor of int64 (or int32), got {got}")
    if tuple(values.shape) not in ((batch, seq_len), (1, seq_len), (seq_len,)):
        raise InputError(f"{name} must be [batch, sequence] = [{batch}, {seq_len}] (or [1, "
                         f"{seq_len}], [{seq_len}]), got shape {list(values.shape)}")


def _make_the_op_mask_once(base: MraModel, config) -> None:
    """Where every layer runs the op, the forward's ``[batch, seq]`` mask becomes the int32 mask
    its library reads once, before the layers, instead of in each: two small kernels a layer,
    each a launch of host time, which is much of a forward at batch 1 on a GPU. An optimisation
    only: a layer given another mask converts it itself."""
    if getattr(base, "_mra_export_op_mask", False):
        return
    cores = attention_cores(base)
    head_dim = max(MIN_HEAD_DIM, config.hidden_size // config.num_attention_heads)

    def make_mask(module, args, kwargs):
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        # None stays None: transformers warns of padding without a mask.
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.dtype == torch.int32:
            return None
        # A core's answer depends on its attention and block size only: one question for each
        # kind of core (one in a patched model), not one for each layer.
        kinds = {(core.attention, core.block_size): core for core in cores}.values()
        if not all(core.runs_fused_on(mask.device.type, head_dim) for core in kinds):
            return None
        mask = _token_mask(mask, *mask.shape, mask.device, torch.int32)
        if len(args) > 1:
            return (args[0], mask, *args[2:]), kwargs
        return args, {**kwargs, "attention_mask": mask}

    base.register_forward_pre_hook(make_mask, with_kwargs=True)
    base._mra_export_op_mask = True


def _check_range(name: str, tokens: torch.Tensor, size: int) -> None:
    # One device sync per forward pass: on a GPU an index past the embedding would otherwise be a
    # device-side assert that poisons the CUDA context.
    if running_eagerly() and tokens.numel() and tokens.device.type != "meta":
        low, high = (int(bound) for bound in torch.aminmax(tokens))
        if low < 0 or high >= size:
            raise InputError(f"{name} must be in [0, {size}) for this model, got values "
                             f"{low}..{high}")
