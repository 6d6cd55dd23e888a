"""Polygraphy runners: the patched PyTorch model, and any exported model's runtime.

Each returns the task's outputs and, for the per-head diagnostic, every layer's attention
context ``attention_context.{layer}`` ([batch, heads, seq, head_dim], head dims under 32 padded to
32 as the attention core computes them).
"""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from ..export.graph_names import ATTENTION_CONTEXT
from ..patching import attention_cores
from ..runtime.base import ExportedModel
from ..runtime.plugin_reference import head_major
from ..tasks import Task


def input_metadata(names, rank: int) -> TensorMetadata:
    metadata = TensorMetadata()
    for name in names:
        metadata.add(name, dtype=np.int64, shape=(-1,) * rank)
    return metadata


class TorchRunner(BaseRunner):
    """The patched transformers model in PyTorch (the reference side of every comparison)."""

    def __init__(self, model, task: Task, input_names, name="pytorch"):
        super().__init__(name=name)
        self.model, self.task, self.input_names = model.eval(), task, list(input_names)
        self._contexts: dict[str, np.ndarray] = {}
        self._hooks = []

    def activate_impl(self):
        for layer, core in enumerate(attention_cores(self.model)):
            self._hooks.append(core.register_forward_hook(self._keep(layer)))

    def _keep(self, layer: int):
        def hook(module, args, output):
            # Kept as the core returns it, head dims under 32 padded to 32 (zeros there): the
            # exported graphs name this same tensor, before the model slices it back.
            self._contexts[ATTENTION_CONTEXT.format(layer=layer)] = output.numpy()
        return hook

    def get_input_metadata_impl(self):
        return input_metadata(self.input_names, 3 if self.task.has_choices else 2)

    def infer_impl(self, feed_dict):
        inputs = {name: torch.from_numpy(np.asarray(value)) for name, value in feed_dict.items()}
        start = time.perf_counter()
        with torch.no_grad():
            outputs = self.model(**inputs, return_dict=True)
        self.inference_time = time.perf_counter() - start
        result = OrderedDict((name, outputs[name].numpy()) for name in self.task.outputs)
        result.update(self._contexts)
        return result

    def deactivate_impl(self):
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


class ExportedModelRunner(BaseRunner):
    """An ``ExportedModel`` (onnxruntime, the plugin graph on the CPU reference, TensorRT),
    created on activation, asked for its outputs and (when it has them) attention contexts."""

    def __init__(self, load, task: Task, input_names, with_contexts: list[str], name: str):
        super().__init__(name=name)
        self._load, self.task, self.input_names = load, task, list(input_names)
        self.with_contexts = with_contexts
        self.model: ExportedModel | None = None

    def activate_impl(self):
        self.model = self._load()

    def get_input_metadata_impl(self):
        return input_metadata(self.input_names, 3 if self.task.has_choices else 2)

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        values = self.model.run_raw(dict(feed_dict), extra_outputs=self.with_contexts)
        self.inference_time = time.perf_counter() - start
        if self.with_contexts:  # in PyTorch's layout, "bhsd"
            layout = self.model.info.attention_context_layout
            values.update({name: head_major(values[name], layout) for name in self.with_contexts
                           if name in values})
        return OrderedDict((name, comparable(value)) for name, value in values.items())

    def deactivate_impl(self):
        self.model.close()
        self.model = None


def comparable(array: np.ndarray) -> np.ndarray:
    """bfloat16 arrays (ml_dtypes') as float32: Polygraphy's comparator knows numpy's types."""
    return array.astype(np.float32) if array.dtype.name == "bfloat16" else array
