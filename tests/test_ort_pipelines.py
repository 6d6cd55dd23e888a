"""transformers' pipeline() over an OrtMraModel gives what it gives over the PyTorch model."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime
import pytest
import torch
from transformers import AutoTokenizer, pipeline

from mra_export import patch_model
from mra_export.checkpoints import load_model
from mra_export.errors import UserError
from mra_export.runtime import OrtMraModel

# Batched by two, so that the shorter text of each pair is padded.
TEXTS = ["the cat sat on the <mask> all day long", "a <mask> day",
         "models export to onnx and <mask> engines", "<mask>"]
PIPELINE_TASKS = ["fill-mask", "text-classification", "token-classification",
                  "feature-extraction"]


def both_pipelines(task, small_checkpoints, exports):
    folder = exports[task, "portable"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference = patch_model(load_model(small_checkpoints[task])[0])
    return (pipeline(task, model=OrtMraModel.from_pretrained(folder), tokenizer=tokenizer),
            pipeline(task, model=reference, tokenizer=tokenizer))


def assert_same_results(ours, theirs, path="result"):
    """Equal structure, labels and tokens; scores and features within float32 noise."""
    if isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), path
        for index, (a, b) in enumerate(zip(ours, theirs)):
            assert_same_results(a, b, f"{path}[{index}]")
    elif isinstance(theirs, dict):
        assert ours.keys() == theirs.keys(), path
        for key in theirs:
            assert_same_results(ours[key], theirs[key], f"{path}.{key}")
    elif isinstance(theirs, (float, np.floating)):
        assert abs(float(ours) - float(theirs)) <= 1e-5, path
    else:
        assert ours == theirs, path


@pytest.mark.parametrize("task", PIPELINE_TASKS)
def test_pipelines_give_the_pytorch_models_results(task, small_checkpoints, exports):
    ours, theirs = both_pipelines(task, small_checkpoints, exports)
    texts = TEXTS if task == "fill-mask" else [t.replace("<mask>", "fine") for t in TEXTS]
    if task == "feature-extraction":  # nested lists of floats: compare as arrays
        for a, b in zip(ours(texts, batch_size=2), theirs(texts, batch_size=2)):
            np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4, rtol=0)
        return
    assert_same_results(ours(texts, batch_size=2), theirs(texts, batch_size=2))


class Records(logging.Handler):
    """The records a logger emits, past its filters (transformers' loggers do not propagate)."""

    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("task", ["text-classification", "token-classification"])
def test_pipelines_log_no_error_that_the_exported_model_is_unsupported(task, exports):
    """The two pipelines of the six tasks that check the model's class against their list of
    heads: no error for OrtMraModel, while another class still gets it."""
    logger = logging.getLogger("transformers.pipelines.base")
    records = Records()
    logger.addHandler(records)
    try:
        folder = exports[task, "portable"]
        pipeline(task, model=OrtMraModel.from_pretrained(folder),
                 tokenizer=AutoTokenizer.from_pretrained(folder))
        assert records.messages == []
        logger.error(f"The model 'AnotherModel' is not supported for {task}. Supported ...")
        assert records.messages == [f"The model 'AnotherModel' is not supported for {task}. "
                                    "Supported ..."]
    finally:
        logger.removeHandler(records)


def test_a_text_past_the_models_length_is_truncated_to_it(small_checkpoints, exports):
    """The checkpoints' tokenizers stop at max_position_embeddings (256 here), so truncation=True
    fits the model: a text of about 1000 tokens gives what its first 256 give."""
    ours, theirs = both_pipelines("text-classification", small_checkpoints, exports)
    assert ours.tokenizer.model_max_length == 256
    long_text = " ".join(["models export to onnx and fine engines"] * 150)
    assert len(ours.tokenizer(long_text)["input_ids"]) > 900
    assert_same_results(ours(long_text, truncation=True), theirs(long_text, truncation=True))


def test_the_model_takes_host_tensors_and_moves_only_where_onnxruntime_can(exports):
    model = OrtMraModel.from_pretrained(exports["text-classification", "portable"],
                                        provider="CPUExecutionProvider")
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert model.to("cpu") is model and model.eval() is model and not model.can_generate()
    with pytest.raises(UserError, match="onnxruntime computes on cpu or cuda, not on mps"):
        model.to("mps")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(UserError, match="CUDAExecutionProvider is not available in this "
                                            "onnxruntime .* install onnxruntime-gpu"):
            model.to("cuda")
        assert model.providers == ["CPUExecutionProvider"]  # unchanged after the refusal


def test_a_provider_that_will_not_start_leaves_the_model_as_it_was(exports, monkeypatch):
    from mra_export.runtime import ort as ort_module

    model = OrtMraModel.from_pretrained(exports["text-classification", "portable"],
                                        provider="CPUExecutionProvider")
    session = model.session
    monkeypatch.setattr(ort_module, "choose_providers", lambda *args: [ort_module.CUDA_FP32])

    def no_gpu(*args, **kwargs):
        raise RuntimeError("CUDA failure 100: no CUDA-capable device is detected")

    monkeypatch.setattr(ort_module.ort, "InferenceSession", no_gpu)
    with pytest.raises(UserError, match="onnxruntime cannot load .*no CUDA-capable device"):
        model.to("cuda")
    assert model.session is session and model.device == torch.device("cpu")
    assert model(input_ids=[[5, 6, 7]]).logits.shape == (1, model.config.num_labels)



def test_the_other_runtimes_say_where_they_compute(exports):
    from mra_export.runtime import TrtMraModel
    from mra_export.runtime.plugin_reference import ReferencePluginModel

    reference = ReferencePluginModel.from_pretrained(exports["fill-mask", "plugin"])
    assert reference.to("cpu") is reference and reference.device == torch.device("cpu")
    with pytest.raises(UserError, match="ReferencePluginModel computes on the CPU only, not on cuda"):
        reference.to("cuda:0")
    engine = object.__new__(TrtMraModel)  # no TensorRT here to load one
    assert engine.to("cuda:1") is engine
    with pytest.raises(UserError, match="a TensorRT engine computes on its GPU, not on cpu; use "
                                        "OrtMraModel with a portable export there"):
        engine.to("cpu")


def test_an_onnxruntime_value_reaches_torch_without_a_copy():
    """tensor_of: DLPack where the OrtValue has it (the same memory), the host otherwise."""
    from mra_export.runtime.ort import tensor_of

    array = np.arange(6, dtype=np.float16).reshape(2, 3)
    value = onnxruntime.OrtValue.ortvalue_from_numpy(array)
    tensor = tensor_of(value)
    assert tensor.dtype == torch.float16 and tensor.data_ptr() == value.data_ptr()
    np.testing.assert_array_equal(tensor.numpy(), array)

    class WithoutDlpack:  # an onnxruntime whose OrtValue predates DLPack
        def numpy(self):
            return array
    np.testing.assert_array_equal(tensor_of(WithoutDlpack()).numpy(), array)


def test_cuda_inputs_get_the_bound_outputs_as_tensors(exports, monkeypatch):
    """The wiring of the CUDA path, on the CPU: a session that says it runs on CUDA, bound on
    the CPU's memory instead; its outputs come as torch tensors, the values of run_raw's."""
    from mra_export.runtime import ort as ort_module
    from mra_export.runtime.model_io import ModelInputs

    model = OrtMraModel.from_pretrained(exports["fill-mask", "portable"],
                                        provider="CPUExecutionProvider")
    arrays = {"input_ids": np.array([[5, 6, 7, 8]]), "attention_mask": np.ones((1, 4), np.int64)}
    expected = model.run_raw(arrays)
    monkeypatch.setattr(model.session, "get_providers", lambda: [ort_module.CUDA, ort_module.CPU])
    binding = ort_module.device_binding
    monkeypatch.setattr(ort_module, "device_binding", lambda s, a: binding(s, a, "cpu"))
    outputs = model._run_for(ModelInputs(arrays, torch.device("cuda")))
    assert outputs.keys() == expected.keys()
    for name, tensor in outputs.items():
        assert isinstance(tensor, torch.Tensor)
        np.testing.assert_array_equal(tensor.numpy(), expected[name])
    on_host = model._run_for(ModelInputs(arrays, torch.device("cpu")))  # host tensors: run_raw
    assert all(isinstance(value, np.ndarray) for value in on_host.values())


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in onnxruntime.get_available_providers()
                    or not torch.cuda.is_available(),
                    reason="needs onnxruntime-gpu's CUDA provider and a CUDA build of torch")
def test_cuda_inputs_on_the_cuda_provider_give_outputs_on_the_gpu(tmp_path):
    # Its own export, not the session's twelve: tools/gpu_session.sh runs it on a lent GPU.
    from mra_export.checkpoints import build_checkpoint
    from mra_export.export import export_model
    from mra_export.tasks import TASKS

    from .conftest import SMALL_MODEL

    checkpoint = build_checkpoint(tmp_path / "checkpoint", TASKS["fill-mask"], **SMALL_MODEL)
    folder = tmp_path / "export"
    export_model(checkpoint, folder, task="fill-mask", log=lambda message: None)
    on_gpu = OrtMraModel.from_pretrained(folder, provider=("CUDAExecutionProvider",
                                                           {"use_tf32": "0"}))
    on_cpu = OrtMraModel.from_pretrained(folder, provider="CPUExecutionProvider")
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    logits = on_gpu(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits
    assert logits.device.type == "cuda"
    expected = on_cpu(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits.cpu(), expected, atol=1e-4, rtol=0)
