"""Real TensorRT engines of every head, fp32 and fp16, against PyTorch (needs TensorRT, a GPU and
the plugin built with TensorRT's headers; skipped with the reason otherwise)."""

from __future__ import annotations

import pytest

from mra_export import native
from mra_export.checkpoints import build_default_checkpoints
from mra_export.engines.availability import tensorrt_unavailable_reason
from mra_export.engines.demo import build_demo_engines
from mra_export.export import export_model
from mra_export.parity import format_table, run_parity
from mra_export.runtime.trt import TrtMraModel
from mra_export.tasks import TASKS

pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    reason = tensorrt_unavailable_reason()
    if reason:
        pytest.skip(reason)
    if not (native.build_dir() / native.PLUGIN_LIBRARY).is_file():
        pytest.skip("the plugin is not built (make plugins TensorRT_ROOT=<TensorRT folder>)")
    root = tmp_path_factory.mktemp("tensorrt")
    checkpoints = build_default_checkpoints(root / "checkpoints")
    exports = {}
    for task, folder in checkpoints.items():
        exports[task] = root / "onnx" / f"{task}-plugin"
        export_model(folder, exports[task], task, "plugin", log=lambda m: None)
    return checkpoints, exports, build_demo_engines(checkpoints, exports, root, log=print)


@pytest.mark.parametrize("task_name", list(TASKS))
def test_every_head_in_fp32_and_fp16_matches_pytorch(engines, task_name):
    checkpoints, exports, folders = engines
    report = run_parity(checkpoints[task_name], [exports[task_name]], folders[task_name])
    print(format_table([report]))
    ran = [b for b in report.backends if b.backend.startswith("tensorrt")]
    assert [b.backend for b in ran] == ["tensorrt-fp32", "tensorrt-fp16"]
    assert report.passed


def test_trt_model_returns_the_task_output(engines):
    checkpoints, _, folders = engines
    model = TrtMraModel.from_engine(folders["question-answering"][0])
    outputs = model(input_ids=[[0, 5, 6, 7, 2]], attention_mask=[[1, 1, 1, 1, 1]])
    assert type(outputs).__name__ == "QuestionAnsweringModelOutput"
    assert outputs.start_logits.shape == (1, 5)
