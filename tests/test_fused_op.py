"""``mra_export::mra_attention`` (mra_export/fused.py): the kernel library as a PyTorch op, and
``patch_model(attention=...)``.

On the CPU the op runs the C++ twin; it is held to the PyTorch reference (itself checked against
transformers' mra2_attention) and, with every block selected, to float64 dense attention. The
CUDA cases are marked gpu and skip without a GPU.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mra_export import fused, native
from mra_export.attention import mra_attention
from mra_export.checkpoints import load_model
from mra_export.errors import InputError, UserError
from mra_export.kernel_check import compare_with_reference
from mra_export.patching import attention_cores, patch_model

from .conftest import random_qkv, ragged_mask
from .test_attention_dense import dense_attention_float64, normaliser_error_bound

TOLERANCE = 1e-5


@pytest.fixture(scope="module", autouse=True)
def built_twin():
    native.ensure_built(native.CPU_LIBRARY, "mra_attention_cpu")


def settings(num_blocks, mode="full", first=0, diagonal=0):
    return dict(num_blocks=num_blocks, approx_mode=mode, initial_prior_first_n_blocks=first,
                initial_prior_diagonal_n_blocks=diagonal)


@pytest.mark.parametrize("seq_len,num_blocks,mode,priors", [
    (1, 1, "full", (0, 0)), (100, 6, "full", (1, 0)), (257, 20, "sparse", (0, 3)),
    (300, 40, "full", (2, 5)), (640, 100, "sparse", (0, 0)),
])
def test_cpu_op_matches_the_reference(seq_len, num_blocks, mode, priors):
    q, k, v = random_qkv(3, 2, seq_len, 64, seed=seq_len)
    mask = ragged_mask(3, seq_len, [seq_len, seq_len // 2 + 1, 0])
    kw = settings(num_blocks, mode, *priors)
    ours = fused.fused_mra_attention(q, k, v, mask, **kw)
    assert ours.dtype == torch.float32 and ours.shape == q.shape
    assert (ours - mra_attention(q, k, v, mask, **kw)).abs().max().item() <= TOLERANCE
    assert torch.all(ours[2] == 0) and torch.all(ours[1, :, seq_len // 2 + 1:] == 0)


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_every_block_selected_equals_float64_dense_attention(head_dim, mode):
    seq_len = 200  # a partial last block
    q, k, v = random_qkv(2, 3, seq_len, head_dim, seed=head_dim)
    mask = ragged_mask(2, seq_len, [seq_len, 77])
    nb = math.ceil(seq_len / 32)
    ours = fused.fused_mra_attention(q, k, v, mask, **settings(nb * nb, mode))
    error = (ours.double() - dense_attention_float64(q, k, v, mask)).abs()
    assert (error <= normaliser_error_bound(q, k, v, mask)).all()


@pytest.mark.parametrize("dtype,relative", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_precision_is_computed_in_float32_and_returned_in_its_dtype(dtype, relative):
    q, k, v = (t.to(dtype) for t in random_qkv(2, 2, 300, 64, seed=5))
    mask = ragged_mask(2, 300, [300, 120])
    ours = fused.fused_mra_attention(q, k, v, mask, **settings(30))
    expected = mra_attention(q.float(), k.float(), v.float(), mask, **settings(30))
    assert ours.dtype == dtype
    assert (ours.float() - expected).abs().max() <= relative * expected.abs().max()


def test_results_do_not_depend_on_the_thread_count():
    q, k, v = random_qkv(2, 3, 1024, 64, seed=9)  # large enough to run on several threads
    mask = ragged_mask(2, 1024, [1024, 700])
    library = fused.kernel_library("cpu")
    outputs = []
    for threads in (1, 3):
        library.set_cpu_threads(threads)
        params = library.params(q, **settings(256))
        outputs.append(library.run(params, *native.c_inputs(q, k, v, mask))[0])
    library.set_cpu_threads(0)
    assert torch.equal(outputs[0], outputs[1])


def test_views_that_are_not_contiguous_or_aligned_are_taken():
    q, k, v = random_qkv(1, 2, 96, 64, seed=3)
    mask = torch.ones(1, 96)
    offset = torch.randn(1, 2, 96, 65)[..., 1:]  # neither contiguous nor 16-byte aligned
    offset.copy_(q)
    assert torch.equal(fused.fused_mra_attention(offset, k, v, mask, **settings(9)),
                       fused.fused_mra_attention(q, k, v, mask, **settings(9)))


def test_heads_of_a_projection_go_in_and_come_out_without_a_copy():
    """The patched model's Q, K, V are [B, S, H * D] projections viewed as [B, H, S, D]: the op
    hands them to the library as they lie (layout bshd) and returns the output the same way, so
    transposing it back to [B, S, H * D] is a view. Same numbers as contiguous inputs."""
    batch, heads, seq_len, head_dim = 2, 3, 130, 32
    projections = [t.transpose(1, 2).reshape(batch, seq_len, heads * head_dim)
                   for t in random_qkv(batch, heads, seq_len, head_dim, seed=12)]
    q, k, v = (t.view(batch, seq_len, heads, head_dim).transpose(1, 2) for t in projections)
    mask = ragged_mask(batch, seq_len, [130, 45])
    assert fused.memory_layout(q, k, v) == "bshd"
    output = fused.fused_mra_attention(q, k, v, mask, **settings(10))
    merged = output.transpose(1, 2).reshape(batch, seq_len, heads * head_dim)
    assert merged.data_ptr() == output.data_ptr() and merged.is_contiguous()
    contiguous = [t.contiguous() for t in (q, k, v)]
    assert fused.memory_layout(*contiguous) == "bhsd"
    assert torch.equal(output, fused.fused_mra_attention(*contiguous, mask, **settings(10)))
    assert (output - mra_attention(q, k, v, mask, **settings(10))).abs().max() <= TOLERANCE
    # The fake kernel (torch.compile, torch.export) gives the real output's strides.
    result = torch.library.opcheck(fused.mra_attention_op, (q, k, v, mask, 10, "full", 32, 0, 0),
                                   test_utils=("test_faketensor",))
    assert set(result.values()) == {"SUCCESS"}


def test_calls_of_one_shape_in_two_layouts_and_settings_each_get_their_own():
    """The op checks a shape's parameters once and keeps them (``_checked_params``): the same
    shape token-major and head-major, and with other settings, must not share them."""
    batch, heads, seq_len, head_dim = 2, 2, 96, 32
    token_major = [t.transpose(1, 2).contiguous().transpose(1, 2)
                   for t in random_qkv(batch, heads, seq_len, head_dim, seed=21)]
    head_major = [t.contiguous() for t in token_major]
    mask = ragged_mask(batch, seq_len, [96, 50])
    for kw in (settings(4), settings(9, "sparse"), settings(4), settings(9, "full", 1, 1)):
        expected = mra_attention(*head_major, mask, **kw)
        for tensors in (token_major, head_major, token_major):
            output = fused.fused_mra_attention(*tensors, mask, **kw)
            assert output.stride() == tensors[0].stride()
            assert (output - expected).abs().max() <= TOLERANCE


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 3, 5, 4), (2, 1, 5, 4), (2, 3, 1, 4),
                                   (1, 1, 1, 4), (2, 3, 5, 1)])
def test_the_eager_layout_check_agrees_with_the_fake_kernels(shape):
    """The op finds the layout sooner from exact strides (``_layout_of``); the fake kernel keeps
    ``memory_layout``. They must agree on every mix of layouts, size-1 dims included."""
    batch, heads, seq_len, head_dim = shape
    tensors = [torch.randn(batch, seq_len, heads, head_dim).transpose(1, 2),
               torch.randn(batch, seq_len, heads * head_dim).view(batch, seq_len, heads,
                                                                  head_dim).transpose(1, 2),
               torch.randn(batch + 1, seq_len, heads, head_dim)[1:].transpose(1, 2),
               torch.randn(batch, heads, seq_len, head_dim),
               torch.randn(batch, heads, seq_len, head_dim + 1)[..., :head_dim],
               torch.randn(seq_len, batch, heads, head_dim).permute(1, 2, 0, 3)]
    layouts = set()
    for q, k, v in itertools.product(tensors, repeat=3):
        layout = fused._layout_of(q, k, v)
        assert layout == fused.memory_layout(q, k, v)
        layouts.add(layout)
    # Both occur, save where a single vector makes every dense tensor token-major.
    assert layouts == ({"bshd"} if (batch, heads, seq_len) == (1, 1, 1) else {"bshd", "bhsd"})


def test_a_library_found_built_is_not_looked_for_again_and_a_missing_one_is(tmp_path,
                                                                           monkeypatch):
    monkeypatch.setenv(native.BUILD_DIR_VARIABLE, str(tmp_path))
    library = tmp_path / native.CPU_LIBRARY
    assert not fused.library_built("cpu")
    library.write_bytes(b"")  # built since (make plugins in another shell)
    assert fused.library_built("cpu")
    library.unlink()
    assert fused.library_built("cpu")  # found once: a stat per layer and call no longer
    monkeypatch.setenv(native.BUILD_DIR_VARIABLE, str(tmp_path / "elsewhere"))
    assert not fused.library_built("cpu")


def assert_gradients_are_the_references(q, k, v, mask, **attention_settings):
    grads = []
    for attention in (fused.fused_mra_attention, mra_attention):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        attention(*leaves, mask, **attention_settings).pow(2).sum().backward()
        grads.append([t.grad for t in leaves])
    for ours, expected in zip(*grads):
        assert ours is not None and (ours - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_gradients_are_the_references():
    q, k, v = random_qkv(2, 2, 130, 32, seed=4)
    assert_gradients_are_the_references(q, k, v, ragged_mask(2, 130, [130, 60]), **settings(10))


@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_gradients_with_priors_are_the_references(mode):
    """The backward pass recomputes the reference with the forward's settings: each prior must
    reach it as itself (first != diagonal here, so a swap would select other blocks)."""
    q, k, v = random_qkv(2, 2, 160, 32, seed=5)
    assert_gradients_are_the_references(q, k, v, ragged_mask(2, 160, [160, 90]),
                                        **settings(8, mode, first=1, diagonal=3))


def test_compile_and_export_trace_the_op_as_one_node():
    q, k, v = random_qkv(1, 2, 64, 32, seed=6)
    mask = torch.ones(1, 64, dtype=torch.int32)
    eager = fused.mra_attention_op(q, k, v, mask, 4, "full", 32, 0, 0)
    compiled = torch.compile(fused.mra_attention_op, fullgraph=True)
    assert torch.equal(compiled(q, k, v, mask, 4, "full", 32, 0, 0), eager)

    class Attention(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return fused.mra_attention_op(q, k, v, mask, 4, "full", 32, 0, 0)

    program = torch.export.export(Attention(), (q, k, v, mask))
    calls = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert calls == [torch.ops.mra_export.mra_attention.default]
    result = torch.library.opcheck(fused.mra_attention_op, (q, k, v, mask, 4, "full", 32, 0, 0))
    assert set(result.values()) == {"SUCCESS"}


@pytest.mark.parametrize("query_change,message", [
    (lambda q: q.half(), "must share one dtype of float32, float16 or bfloat16"),
    (lambda q: q[:, :, :10], "must share one .batch, heads, seq, head_dim. shape"),
])
def test_mismatched_inputs_are_one_line(query_change, message):
    q, k, v = random_qkv(1, 2, 64, 32, seed=7)
    with pytest.raises(InputError, match=message):
        fused.fused_mra_attention(query_change(q), k, v, torch.ones(1, 64), **settings(4))
    with pytest.raises(InputError, match=r"the mask must be \[batch, seq\] = \[1, 64\], got \[1, 63\]"):
        fused.fused_mra_attention(q, k, v, torch.ones(1, 63), **settings(4))


def test_patched_model_runs_the_op_when_built_and_the_reference_when_asked(small_checkpoints):
    checkpoint = small_checkpoints["fill-mask"]
    ids = torch.randint(0, 100, (2, 150), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 150, dtype=torch.long)
    mask[1, 90:] = 0
    outputs = {}
    for attention in ("auto", "fused", "reference"):
        model = patch_model(load_model(checkpoint)[0], attention=attention)
        query = torch.zeros(1, 2, 8, 64)
        assert all(core.runs_fused(query) == (attention != "reference")
                   for core in attention_cores(model))
        with torch.no_grad():
            outputs[attention] = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(outputs["auto"], outputs["fused"])
    assert (outputs["fused"] - outputs["reference"]).abs().max() <= TOLERANCE
    assert "attention='reference'" in repr(attention_cores(model)[0])


def test_fused_without_its_library_is_one_line_naming_make_plugins(small_checkpoints, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv("MRA_EXPORT_PLUGIN_BUILD", str(tmp_path))
    fused.kernel_library.cache_clear()
    try:
        model = load_model(small_checkpoints["fill-mask"])[0]
        with pytest.raises(UserError, match=r"libmra_attention_cpu.so, which is not built; run "
                                            "'make plugins'"):
            patch_model(model, attention="fused")
        patch_model(model)  # auto: the reference, since nothing is built
        assert not attention_cores(model)[0].runs_fused(torch.zeros(1, 1, 1, 64))
    finally:
        fused.kernel_library.cache_clear()
    with pytest.raises(ValueError, match="attention must be one of auto, fused, reference"):
        patch_model(model, attention="flash")


def test_a_library_built_for_other_gpus_is_one_line_naming_the_architectures():
    class Function:  # a ctypes function's stand-in: callable, with a restype to set
        def __init__(self, result: bytes):
            self.result, self.restype = result, None

        def __call__(self, *args):
            return self.result

    class Reported:  # what a CUDA library reports after a launch on a GPU it has no code for
        mraStatusString = Function(b"CUDA error (see mraLastCudaError)")
        mraLastCudaError = Function(b"no kernel image is available for execution on the device")

    library = native.MraLibrary.__new__(native.MraLibrary)
    library.path, library.lib = native.build_dir() / native.CUDA_LIBRARY, Reported()
    with pytest.raises(UserError, match=r"no kernel image .*rebuild it with 'make plugins "
                                        r"MRA_CUDA_ARCHITECTURES="):
        library.check(4)
    library.lib.mraLastCudaError = Function(b"an illegal memory access was encountered")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        library.check(4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3),
                                             (torch.bfloat16, 1e-2)])  # fp16/bf16: relative
def test_cuda_op_is_the_kernels_on_the_current_stream(dtype, tolerance):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    if not fused.library_built("cuda"):
        pytest.skip(f"{native.build_dir() / native.CUDA_LIBRARY} is not built (make plugins with nvcc)")
    q, k, v = (t.to("cuda", dtype) for t in random_qkv(2, 12, 1000, 64, seed=11))
    mask = ragged_mask(2, 1000, [1000, 613]).cuda()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        ours = fused.fused_mra_attention(q, k, v, mask, **settings(250))
        direct, selected = fused.kernel_library("cuda").attention(q, k, v, mask, **settings(250))
    stream.synchronize()
    assert torch.equal(ours, direct)
    comparison = compare_with_reference(direct.cpu(), selected.cpu(), q.cpu(), k.cpu(), v.cpu(),
                                        mask.cpu(), tolerance=tolerance,
                                        relative=dtype != torch.float32, **settings(250))
    assert comparison.passed, comparison


@pytest.mark.gpu
def test_cuda_op_is_captured_in_a_cuda_graph():
    if not (torch.cuda.is_available() and fused.library_built("cuda")):
        pytest.skip("no CUDA GPU or no libmra_attention_cuda.so here")
    q, k, v = (t.to("cuda", torch.float16) for t in random_qkv(1, 4, 512, 64, seed=12))
    mask = torch.ones(1, 512, device="cuda", dtype=torch.int32)
    eager = fused.mra_attention_op(q, k, v, mask, 64, "full", 32, 0, 0)  # warms the library up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused.mra_attention_op(q, k, v, mask, 64, "full", 32, 0, 0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
