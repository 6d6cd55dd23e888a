"""What ``triton.py`` records for a python model and the stub's side (``python_backend.py``)
reads back: parameter names and the tokenizer's string inputs. Light on purpose: each stub imports
it, and a tokenizer's stub needs neither torch nor onnxruntime."""

from __future__ import annotations

# config.pbtxt parameters of the python models (triton_model.py spells out the first two).
SYS_PATH, PYTHON = "mra_export_sys_path", "mra_export_python"
ROLE, TASK, INPUTS, MAX_LENGTH = ("mra_export_role", "mra_export_task", "mra_export_inputs",
                                  "mra_export_max_length")
# The ensemble's string inputs: one text, or the pair a task reads.
TEXT_INPUTS = {"question-answering": ("question", "context"),
               "multiple-choice": ("prompt", "choices")}
MANY_STRINGS = {"choices"}  # [batch, num_choices]; the others [batch, 1]


def text_inputs(task: str) -> tuple[str, ...]:
    return TEXT_INPUTS.get(task, ("text",))
