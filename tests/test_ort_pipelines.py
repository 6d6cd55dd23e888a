"""transformers' pipeline() over an OrtMraModel gives what it gives over the PyTorch model."""

from __future__ import annotations

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
