"""Whole models, every head: the patched model against transformers' own model on the CPU."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import MraConfig, MraModel
from transformers.models.mra.modeling_mra import MraSelfAttention

from mra_export import patch_model
from mra_export.checkpoints import build_checkpoint, load_model
from mra_export.errors import UserError
from mra_export.patching import MraAttentionCore, PatchedMraSelfAttention, attention_cores
from mra_export.tasks import TASKS
from mra_export.transformers_reference import (cpu_kernels, padding_unsupported_reason,
                                                  transformers_model_outputs)

from .conftest import SMALL_MODEL, ragged_mask

TOLERANCE = 1e-4
# The whole-model comparisons below feed transformers padded samples.
PADDING_UNSUPPORTED = padding_unsupported_reason()
needs_padding_support = pytest.mark.skipif(PADDING_UNSUPPORTED is not None,
                                           reason=str(PADDING_UNSUPPORTED))


def model_inputs(task, batch, seq_len, lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 500, (batch, seq_len), generator=generator)
    mask = ragged_mask(batch, seq_len, lengths).long()
    inputs = {"input_ids": input_ids * mask + (1 - mask), "attention_mask": mask}  # pad id 1
    if task.has_choices:  # [batch, choices, seq]: two choices, the second shifted
        inputs = {name: torch.stack([t, t.roll(1, dims=-1)], 1) for name, t in inputs.items()}
    return inputs


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)


def one_sample(inputs, b):
    return {name: t[b:b + 1] for name, t in inputs.items()}


@needs_padding_support
@pytest.mark.parametrize("task_name", list(TASKS))
@pytest.mark.parametrize("seq_len,lengths", [(128, [128, 90]), (256, [256, 200, 33])])
def test_every_head_matches_transformers_one_sample_at_a_time(small_checkpoints, task_name,
                                                               seq_len, lengths):
    task = TASKS[task_name]
    reference, _ = load_model(small_checkpoints[task_name], task)
    patched = patch_model(load_model(small_checkpoints[task_name], task)[0])
    inputs = model_inputs(task, len(lengths), seq_len, lengths)
    ours = run(patched, inputs)
    theirs = transformers_model_outputs(reference, task, inputs)
    for output in task.outputs:
        assert ours[output].shape == theirs[output].shape
        assert (ours[output] - theirs[output]).abs().max().item() <= TOLERANCE, output


@needs_padding_support
def test_matches_transformers_own_topk_on_a_whole_model(small_checkpoints):
    # transformers untouched (its own torch.topk): num_blocks = 16 >= nb = 8 and no priors, so
    # the row maxima are all selected and no tie group is cut at this seed.
    task = TASKS["token-classification"]
    reference, _ = load_model(small_checkpoints[task.name], task)
    patched = patch_model(load_model(small_checkpoints[task.name], task)[0])
    inputs = model_inputs(task, 2, 256, [256, 170], seed=5)
    ours = run(patched, inputs)
    with cpu_kernels(spec_ties=False):
        theirs = torch.cat([run(reference, one_sample(inputs, b)).logits for b in range(2)])
    assert (ours.logits - theirs).abs().max().item() <= TOLERANCE


@needs_padding_support
def test_with_priors_and_sparse_mode(tmp_path):
    task = TASKS["question-answering"]
    folder = build_checkpoint(tmp_path, task, **{**SMALL_MODEL, "approx_mode": "sparse",
                                                 "initial_prior_first_n_blocks": 1,
                                                 "initial_prior_diagonal_n_blocks": 3})
    reference, _ = load_model(folder)
    patched = patch_model(load_model(folder)[0])
    inputs = model_inputs(task, 2, 224, [224, 100], seed=3)
    ours = run(patched, inputs)
    theirs = transformers_model_outputs(reference, task, inputs)
    for output in task.outputs:
        assert (ours[output] - theirs[output]).abs().max().item() <= TOLERANCE


def test_transformers_before_5_19_is_refused_as_a_reference_for_padded_inputs(
        small_checkpoints, monkeypatch):
    task = TASKS["feature-extraction"]
    reference, _ = load_model(small_checkpoints[task.name], task)
    monkeypatch.setattr("transformers.__version__", "5.17.0")
    padded = model_inputs(task, 2, 128, [128, 90])
    with pytest.raises(UserError, match=r"^transformers 5\.17\.0's MRA multiplies padded tokens "
                                        r"by -2\*\*31 .*pip install -U 'transformers>=5\.19\.0'$"):
        transformers_model_outputs(reference, task, padded)
    unpadded = model_inputs(task, 1, 128, [128])  # no padding: that transformers is still right
    theirs = transformers_model_outputs(reference, task, unpadded)
    ours = run(patch_model(load_model(small_checkpoints[task.name], task)[0]), unpadded)
    assert (ours.last_hidden_state - theirs["last_hidden_state"]).abs().max() <= TOLERANCE


def test_padding_support_starts_at_transformers_5_19():
    assert padding_unsupported_reason("5.18.0") is not None
    assert padding_unsupported_reason("5.0.0") is not None
    assert padding_unsupported_reason("5.19.0") is None
    assert padding_unsupported_reason("5.24.0") is None


@pytest.mark.parametrize("task_name", list(TASKS))
def test_ragged_batch_gives_each_sample_its_output_alone(small_checkpoints, task_name):
    task = TASKS[task_name]
    model = patch_model(load_model(small_checkpoints[task_name], task)[0])
    inputs = model_inputs(task, 3, 150, [150, 77, 5], seed=1)  # 150 is not a block multiple
    batched = run(model, inputs)
    for b in range(3):
        alone = run(model, one_sample(inputs, b))
        for output in task.outputs:
            assert (batched[output][b:b + 1] - alone[output]).abs().max() <= 1e-5


def test_every_length_from_1_to_max_position_embeddings(small_checkpoints):
    model = patch_model(load_model(small_checkpoints["feature-extraction"])[0])
    limit = model.config.max_position_embeddings
    for seq_len in range(1, limit + 1):
        hidden = run(model, model_inputs(TASKS["feature-extraction"], 1, seq_len, [seq_len]))
        assert hidden.last_hidden_state.shape == (1, seq_len, 128)
        assert torch.isfinite(hidden.last_hidden_state).all()


@pytest.mark.parametrize("task_name", list(TASKS))
def test_short_inputs_run_on_every_head(small_checkpoints, task_name):
    task = TASKS[task_name]
    model = patch_model(load_model(small_checkpoints[task_name], task)[0])
    for seq_len in (1, 2, 31, 33):
        outputs = run(model, model_inputs(task, 2, seq_len, [seq_len, 1]))
        assert all(torch.isfinite(outputs[name]).all() for name in task.outputs)


def test_lengths_past_max_position_embeddings_are_refused_clearly(small_checkpoints):
    model = patch_model(load_model(small_checkpoints["fill-mask"])[0])
    inputs = model_inputs(TASKS["fill-mask"], 1, 257, [257])
    with pytest.raises(ValueError, match="sequence length 257 is longer than the model's "
                                         "max_position_embeddings=256; truncate"):
        run(model, inputs)


def test_inputs_transformers_would_fail_on_deep_inside_are_named(small_checkpoints):
    from mra_export.errors import InputError

    model = patch_model(load_model(small_checkpoints["fill-mask"])[0])
    vocab = model.config.vocab_size
    ids = torch.ones(2, 20, dtype=torch.long)
    for inputs, message in [
        ({"input_ids": ids.numpy()}, "input_ids must be a torch.Tensor, got ndarray; use torch.as_tensor"),
        ({"input_ids": ids[0]}, r"input_ids must be \[batch, sequence\] with at least one token, got "
                                r"shape \[20\]"),
        ({"input_ids": ids[:, :0]}, r"at least one token, got shape \[2, 0\]"),
        ({"input_ids": ids.float()}, "input_ids must hold integers, got torch.float32"),
        ({"input_ids": ids.bool()}, r"input_ids must be int64 \(or int32\), got torch.bool; use .long\(\)"),
        ({"input_ids": ids.short()}, r"input_ids must be int64 \(or int32\), got torch.int16"),
        ({"input_ids": ids * vocab}, rf"input_ids must be in \[0, {vocab}\) for this model, got values {vocab}..{vocab}"),
        ({"input_ids": -ids}, rf"input_ids must be in \[0, {vocab}\).*got values -1..-1"),
        ({"input_ids": ids, "token_type_ids": ids * 5}, r"token_type_ids must be in \[0, 1\)"),
        ({"inputs_embeds": torch.zeros(2, 20)}, r"inputs_embeds must be \[batch, sequence, hidden\]"),
        ({"inputs_embeds": torch.zeros(2, 20, 100)},
         r"inputs_embeds must be \[batch, sequence, 128\] for this model \(its hidden_size\), "
         r"got shape \[2, 20, 100\]"),
        ({"input_ids": ids, "attention_mask": torch.ones(2, 20, 20)},
         r"attention_mask must be \[batch, sequence\] = \[2, 20\] \(MRA masks padding tokens "
         r"only\), got shape \[2, 20, 20\]"),
        ({"input_ids": ids, "attention_mask": torch.ones(2, 19)}, r"got shape \[2, 19\]"),
        ({"input_ids": ids, "attention_mask": [[1] * 20] * 2},
         "attention_mask must be a torch.Tensor, got list; use torch.as_tensor"),
        ({"input_ids": ids, "token_type_ids": ids[:, :19] * 0},
         r"token_type_ids must be \[batch, sequence\] = \[2, 20\] \(or \[1, 20\], \[20\]\), got "
         r"shape \[2, 19\]"),
        ({"input_ids": ids, "position_ids": torch.arange(20)[None] + 239},
         r"position_ids must be in \[0, 258\) for this model, got values 239..258"),
        ({"input_ids": ids, "position_ids": torch.arange(20.0)[None]},
         r"position_ids must be a torch.Tensor of int64 \(or int32\), got torch.float32"),
        ({"input_ids": ids, "token_type_ids": torch.zeros(2, 20, dtype=torch.bool)},
         r"token_type_ids must be a torch.Tensor of int64 \(or int32\), got torch.bool"),
        ({"input_ids": ids, "position_ids": torch.arange(19)}, r"position_ids must be .*got shape \[19\]"),
    ]:
        with pytest.raises(InputError, match=message):
            model(**inputs)
    with pytest.raises(InputError, match=r"got shape \[2, 21\]"):
        model(ids, torch.ones(2, 21))  # the mask given by position, as forward's second argument
    assert model(input_ids=ids[:0]).logits.shape == (0, 20, vocab)  # an empty batch, as in torch


def test_inputs_at_the_edges_of_what_transformers_takes_still_run(small_checkpoints):
    """What the checks above must let through: one row of token types or positions for the
    whole batch, [1, seq] or [seq] (the same outputs as that row repeated), int32 indices, the
    table's last position, a bool mask."""
    model = patch_model(load_model(small_checkpoints["fill-mask"])[0], attention="reference")
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    last_positions = torch.arange(20)[None] + model.config.max_position_embeddings + 2 - 20
    for inputs in ({"token_type_ids": torch.zeros(1, 20, dtype=torch.long)},
                   {"token_type_ids": torch.zeros(20, dtype=torch.int32)},
                   {"position_ids": last_positions},
                   {"position_ids": last_positions[0]},
                   {"position_ids": last_positions.expand(2, 20)},
                   {"attention_mask": torch.ones(2, 20, dtype=torch.bool)}):
        with torch.no_grad():
            got = model(input_ids=ids, **inputs).logits
            expected = model(input_ids=ids, **{name: value.expand(2, 20).clone()
                                               for name, value in inputs.items()}).logits
        assert torch.isfinite(got).all() and torch.equal(got, expected)


def test_patching_keeps_weights_and_is_idempotent(small_checkpoints):
    model = load_model(small_checkpoints["text-classification"])[0]
    before = {name: t.clone() for name, t in model.state_dict().items()}
    patch_model(patch_model(model))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    cores = attention_cores(model)
    assert len(cores) == model.config.num_hidden_layers
    assert all(isinstance(m, PatchedMraSelfAttention) for m in model.modules()
               if isinstance(m, MraSelfAttention))
    # transformers' num_blocks: min((max_pos // 32) * block_per_row, (max_pos // 32) ** 2)
    assert cores[0].settings() == dict(num_blocks=16, approx_mode="full", block_size=32,
                                       initial_prior_first_n_blocks=0,
                                       initial_prior_diagonal_n_blocks=0)


@pytest.mark.parametrize("saved_dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_checkpoint_loads_as_the_float32_model(small_checkpoints, tmp_path,
                                                                saved_dtype):
    """Parity's reference is the float32 model; transformers would keep these in their dtype."""
    source = load_model(small_checkpoints["text-classification"])[0]
    source.to(saved_dtype).save_pretrained(tmp_path / "half")
    loaded = patch_model(load_model(tmp_path / "half")[0])
    assert {t.dtype for t in loaded.state_dict().values() if t.is_floating_point()} == {
        torch.float32}
    expected = patch_model(source.float())  # the saved weights, widened: exact
    inputs = model_inputs(TASKS["text-classification"], 2, 70, [70, 41])
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected(**inputs).logits)


def test_head_dims_under_32_are_padded_to_32_like_transformers():
    # head_dim 16 is zero-padded to 32, so the scale is 1/sqrt(32). With every block selected
    # (num_blocks = 16 = nb**2) the layer is exact softmax attention at that scale.
    config = MraConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                       intermediate_size=64, max_position_embeddings=128, block_per_row=4,
                       vocab_size=50)
    layer = patch_model(MraModel(config).eval()).encoder.layer[0].attention.self
    hidden = torch.randn(2, 128, 64)
    mask = ragged_mask(2, 128, [128, 70])
    with torch.no_grad():
        ours = layer(hidden, mask)[0]
        q, k, v = (proj(hidden).view(2, 128, 4, 16).transpose(1, 2).double()
                   for proj in (layer.query, layer.key, layer.value))
    logits = q @ k.transpose(-1, -2) / math.sqrt(32)
    logits = logits.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
    expected = (torch.softmax(logits, -1) @ v) * mask[:, None, :, None]
    expected = expected.transpose(1, 2).reshape(2, 128, 64)
    assert (ours.double() - expected).abs().max() <= 1e-5


def test_an_additive_4d_mask_is_read_like_a_2d_mask():
    config = MraConfig(hidden_size=64, num_attention_heads=1, num_hidden_layers=1,
                       intermediate_size=64, max_position_embeddings=128, vocab_size=50)
    layer = patch_model(MraModel(config).eval()).encoder.layer[0].attention.self
    hidden = torch.randn(2, 96, 64)
    mask = ragged_mask(2, 96, [96, 40])
    additive = ((1 - mask) * torch.finfo(torch.float32).min)[:, None, None, :].expand(2, 1, 96, 96)
    with torch.no_grad():
        assert torch.equal(layer(hidden, mask)[0], layer(hidden, additive)[0])
    assert isinstance(layer.mra_core, MraAttentionCore)


def _record_masks(monkeypatch) -> list:
    """The masks each layer hands the op or the reference, in call order."""
    from mra_export import fused, patching

    seen = []

    def recording(original):
        def attend(query, key, value, mask, **settings):
            seen.append(mask)
            return original(query, key, value, mask, **settings)
        return attend

    monkeypatch.setattr(fused, "fused_mra_attention", recording(fused.fused_mra_attention))
    monkeypatch.setattr(patching, "mra_attention", recording(patching.mra_attention))
    return seen


def _two_layer_model(attention: str) -> MraModel:
    config = MraConfig(hidden_size=64, num_attention_heads=2, num_hidden_layers=2,
                       intermediate_size=64, max_position_embeddings=128, vocab_size=50)
    torch.manual_seed(0)
    return patch_model(MraModel(config).eval(), attention=attention)


@pytest.mark.parametrize("mask_given", ["keyword", "positional", "none"])
def test_the_op_gets_one_int32_mask_made_once_for_every_layer(monkeypatch, mask_given):
    """The op's library reads an int32 mask: made once before the layers (each layer made a
    float mask and the op converted it again, four small kernels a layer on a GPU), with the
    reference's output. Without a mask each layer makes its own (transformers warns of padding
    without a mask, so the model gets none from us)."""
    seen = _record_masks(monkeypatch)
    ids = torch.randint(5, 50, (2, 96), generator=torch.Generator().manual_seed(1))
    mask = ragged_mask(2, 96, [96, 40]).long() if mask_given != "none" else None
    positional = mask_given == "positional"
    args, kwargs = ((ids, mask), {}) if positional else ((ids,), {"attention_mask": mask})
    with torch.no_grad():
        fused_out = _two_layer_model("fused")(*args, **kwargs).last_hidden_state
        reference_out = _two_layer_model("reference")(*args, **kwargs).last_hidden_state
    op_masks, reference_masks = seen[:2], seen[2:]
    expected = (mask if mask is not None else torch.ones(2, 96)) != 0
    assert all(m.dtype == torch.int32 and torch.equal(m, expected.int()) for m in op_masks)
    assert (op_masks[0] is op_masks[1]) == (mask is not None)
    assert [m.dtype for m in reference_masks] == [torch.float32, torch.float32]
    assert torch.allclose(fused_out, reference_out, atol=TOLERANCE)


def test_a_model_whose_layers_differ_gives_each_the_mask_its_attention_reads(monkeypatch):
    """One layer set to the reference by hand (the mask hook asks one core of each kind): each
    layer still gets the mask its attention reads, and the model the reference's output."""
    seen = _record_masks(monkeypatch)
    ids = torch.randint(5, 50, (2, 96), generator=torch.Generator().manual_seed(2))
    mask = ragged_mask(2, 96, [96, 33]).long()
    model = _two_layer_model("fused")
    attention_cores(model)[1].attention = "reference"
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask).last_hidden_state
        reference = _two_layer_model("reference")(input_ids=ids,
                                                  attention_mask=mask).last_hidden_state
    assert [m.dtype for m in seen[:2]] == [torch.int32, torch.float32]
    assert all(torch.equal(m, (mask != 0).to(m.dtype)) for m in seen[:2])
    assert torch.allclose(mixed, reference, atol=TOLERANCE)
