"""The six MRA heads under Hugging Face's task names, with their inputs and outputs.

transformers is imported when a task's classes are first asked for, not with this module: the
command line lists the tasks in its help, which should not wait seconds for torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    from transformers import PretrainedConfig
    from transformers.modeling_outputs import ModelOutput


PER_TOKEN = ("batch_size", "sequence_length")


@dataclass(frozen=True)
class Task:
    name: str  # Hugging Face's task name, as Optimum uses it
    model_class_name: str  # transformers' class of the head
    outputs: tuple[str, ...]  # named as transformers names them
    output_type_name: str  # its class in transformers.modeling_outputs
    output_axes: tuple[str, ...]  # the dynamic leading axes of every output
    has_choices: bool = False  # inputs are [batch, choices, seq]

    @property
    def model_class(self) -> type:
        import transformers

        return getattr(transformers, self.model_class_name)

    @property
    def output_type(self) -> type[ModelOutput]:
        from transformers import modeling_outputs

        return getattr(modeling_outputs, self.output_type_name)

    def input_names(self, config: PretrainedConfig) -> list[str]:
        names = ["input_ids", "attention_mask"]
        if uses_token_type_ids(config):
            names.append("token_type_ids")
        return names

    @property
    def input_axes(self) -> tuple[str, ...]:
        if self.has_choices:
            return ("batch_size", "num_choices", "sequence_length")
        return PER_TOKEN


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("feature-extraction", "MraModel", ("last_hidden_state",),
             "BaseModelOutputWithCrossAttentions", PER_TOKEN),
        Task("fill-mask", "MraForMaskedLM", ("logits",), "MaskedLMOutput", PER_TOKEN),
        Task("text-classification", "MraForSequenceClassification", ("logits",),
             "SequenceClassifierOutput", ("batch_size",)),
        Task("multiple-choice", "MraForMultipleChoice", ("logits",), "MultipleChoiceModelOutput",
             ("batch_size", "num_choices"), has_choices=True),
        Task("token-classification", "MraForTokenClassification", ("logits",),
             "TokenClassifierOutput", PER_TOKEN),
        Task("question-answering", "MraForQuestionAnswering", ("start_logits", "end_logits"),
             "QuestionAnsweringModelOutput", PER_TOKEN),
    )
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise UserError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}, "
                        "or 'auto' to read it from the config's architectures") from None


def task_for_config(config: PretrainedConfig) -> Task:
    """The task of a checkpoint, from ``config.architectures`` (``--task auto``)."""
    architectures = getattr(config, "architectures", None) or []
    for task in TASKS.values():
        if task.model_class_name in architectures:
            return task
    raise UserError(f"cannot tell the task from architectures={architectures}; pass --task "
                    f"with one of: {', '.join(TASKS)}")


def task_for_model(model) -> Task:
    for task in TASKS.values():
        if type(model) is task.model_class:
            return task
    raise UserError(f"{type(model).__name__} is not one of the six MRA heads "
                    f"({', '.join(t.model_class_name for t in TASKS.values())})")


def uses_token_type_ids(config: PretrainedConfig) -> bool:
    return getattr(config, "type_vocab_size", 1) > 1
