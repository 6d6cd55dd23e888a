"""Local transformers checkpoints: loading them with clear errors, and the built-in default.

No hub access is assumed anywhere: the default checkpoint is a small seeded random MRA with a
byte-level BPE tokenizer trained locally, saved with ``save_pretrained`` like any other model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pickle
import re
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import AutoConfig, MraConfig, PreTrainedTokenizerFast

from .errors import UserError, first_line
from .files import is_json_int
from .tasks import TASKS, Task, get_task, task_for_config

# Small enough for CI, shaped like mra-base where it matters: head_dim 64 (transformers' CUDA
# kernels need a multiple of 64), 32-token blocks, 4 blocks per row, 512 positions.
DEFAULT_CONFIG = dict(
    hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
    max_position_embeddings=512, block_per_row=4, approx_mode="full", num_labels=3,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)
DEFAULT_SEED = 0
# The files a saved tokenizer may consist of (tokenizers' and transformers' names).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "vocab.txt", "sentencepiece.bpe.model", "spiece.model")
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids: pad = 1

_CORPUS = """\
Multi-resolution analysis approximates self-attention with a few exact blocks and coarse means.
The low resolution scores pick the blocks that matter; the rest are summarised by block averages.
Long documents need attention whose cost grows linearly with the number of tokens.
A transformer encoder reads a sentence, a question and a passage, and answers with a span.
Exported models run in onnxruntime on the CPU and as TensorRT engines on NVIDIA GPUs.
Every engine is checked against PyTorch before it ships: outputs, heads and layers.
"""


def load_config(folder: str | Path) -> MraConfig:
    """The MRA config of a local checkpoint folder, or a one-line error saying what is wrong."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file; pass the folder save_pretrained wrote")
    if not folder.is_dir():
        raise UserError(f"model folder {folder} does not exist; pass a local folder written by "
                        "save_pretrained")
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json; pass a folder written by save_pretrained")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except StrictDataclassError as error:  # a value of the wrong type; its last line names it
        raise UserError(f"{folder / 'config.json'}: {str(error).strip().splitlines()[-1].strip()}; "
                        "fix it or pass another checkpoint") from None
    except (OSError, ValueError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {folder / 'config.json'}: {first_line(error)}") from None
    if config.model_type != "mra":
        raise UserError(f"{folder} holds a {config.model_type!r} model, not MRA (model_type 'mra')")
    problem = _config_problem(config)
    if problem:
        raise UserError(f"{folder / 'config.json'}: {problem}; fix it or pass another checkpoint")
    return config


# The config's sizes, each a whole number at least this (None: MRA's own rule, below);
# transformers checks few of them, and fails deep inside on the rest: a division by zero heads,
# an assertion on an empty vocabulary.
SIZES = {"hidden_size": 1, "num_attention_heads": 1, "num_hidden_layers": 0, "intermediate_size": 1,
         "vocab_size": 1, "type_vocab_size": 1, "max_position_embeddings": None, "block_per_row": None}


def _config_problem(config: MraConfig) -> str | None:
    """What transformers would fail on deep inside (a KeyError for an unknown activation, a
    division by zero heads) or MRA cannot compute (no blocks to select)."""
    from transformers.activations import ACT2FN

    for name, least in SIZES.items():
        value = getattr(config, name, 1)
        if not is_json_int(value) or (least is not None and value < least):
            at_least = f" >= {least}" if least is not None else ""
            return f"{name} must be a whole number{at_least}, got {json.dumps(value)}"
    eps = getattr(config, "layer_norm_eps", 1e-5)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        return f"layer_norm_eps must be a number > 0, got {json.dumps(eps)}"
    architectures = getattr(config, "architectures", None)
    if architectures is not None and not (isinstance(architectures, list)
                                          and all(isinstance(a, str) for a in architectures)):
        return f"architectures must be a list of class names, got {json.dumps(architectures)}"
    if not isinstance(config.hidden_act, str) or config.hidden_act not in ACT2FN:
        return f"unknown hidden_act {config.hidden_act!r}"
    if config.hidden_size % config.num_attention_heads:
        return (f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                f"{config.num_attention_heads}")
    if config.approx_mode not in ("full", "sparse"):
        return f"approx_mode must be 'full' or 'sparse', got {config.approx_mode!r}"
    if config.block_per_row < 1 or config.max_position_embeddings < 32:
        return (f"block_per_row={config.block_per_row} and max_position_embeddings="
                f"{config.max_position_embeddings} leave MRA no block to select (it needs "
                "block_per_row >= 1 and max_position_embeddings >= 32)")
    return None


def has_tokenizer(folder: str | Path) -> bool:
    """Whether ``folder`` holds tokenizer files (transformers would otherwise make up a tokenizer
    of special tokens only from the config)."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


WRONG_HEAD_REMEDY = "pass --task auto or a checkpoint trained for that task"


@dataclasses.dataclass
class Checkpoint:
    """A local checkpoint folder read once for one task: its config, whether it ships tokenizer
    files, and its weights (``model``, loaded on first use: seconds for a large model, so a
    caller can refuse bad arguments first)."""

    folder: str | Path  # as given, so that errors name it as the user wrote it
    config: MraConfig
    task: Task
    has_tokenizer: bool
    remedy: str = WRONG_HEAD_REMEDY  # ends the error when the weights lack the task's head

    @functools.cached_property
    def model(self):
        """The weights as a float32 model in eval mode, whatever the checkpoint's dtype
        (parity's reference is the float32 model, and exports cast from it)."""
        try:
            model, loading = self.task.model_class.from_pretrained(
                self.folder, config=self.config, dtype=torch.float32, local_files_only=True,
                output_loading_info=True,  # transformers would keep an fp16 checkpoint in fp16
                ignore_mismatched_sizes=True)  # reported below, by name
        except (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError,
                LookupError, EOFError) as error:  # corrupt weights (torch's unpickler raises any
            # of these on bytes that are not a pickle: KeyError, IndexError, ...)
            raise UserError(f"cannot load {self.task.model_class_name} from {self.folder}: "
                            f"{_load_problem(error)}; pass a folder with the weights "
                            "save_pretrained wrote") from None
        _check_weights_fit(self.folder, self.task, loading, self.remedy)
        _check_weights_finite(self.folder, model)
        return model.eval()


def _load_problem(error: BaseException) -> str:
    """What went wrong loading the weights, in a line: torch's refusal of a pickle goes on to
    advise weights_only=False, which is unsafe and not this command's to take."""
    if isinstance(error, pickle.UnpicklingError) and "weights_only" in str(error):
        return ("its .bin weights are not a pickle torch.load reads safely (weights_only: "
                "corrupt, or not saved by torch.save)")
    return first_line(error)


def open_checkpoint(folder: str | Path, task: str | Task | None = "auto",
                    remedy: str = WRONG_HEAD_REMEDY) -> Checkpoint:
    """A local MRA checkpoint for ``task`` (a Task, a task name, or "auto"/None: its config's
    architectures); its config is read here, its weights when ``model`` is first used."""
    config = load_config(folder)
    if (Path(folder) / "export.json").is_file():
        raise UserError(f"{folder} is an export (it has export.json), not a checkpoint; pass the "
                        "checkpoint folder it was exported from (export.json's 'source')")
    if task is None or task == "auto":
        task = task_for_config(config)
    elif isinstance(task, str):
        task = get_task(task)
    return Checkpoint(folder, config, task, has_tokenizer(folder), remedy)


def load_model(folder: str | Path, task: Task | None = None, remedy: str = WRONG_HEAD_REMEDY):
    """The float32 eval-mode model of a local MRA checkpoint for ``task`` (default: its config's
    architectures), and that task."""
    checkpoint = open_checkpoint(folder, task, remedy)
    return checkpoint.model, checkpoint.task


def _check_weights_finite(folder, model) -> None:
    """A NaN or infinite weight makes every output NaN: say so here, not as an export that
    differs from PyTorch."""
    for name, parameter in model.named_parameters():
        if not torch.isfinite(parameter).all():
            raise UserError(f"{folder}'s weight {name} holds NaN or infinite values; the checkpoint "
                            "is damaged: pass another")


def _check_weights_fit(folder, task: Task, loading: dict, remedy: str) -> None:
    """What transformers would otherwise fill with random values or drop, silently."""
    config_json = Path(folder) / "config.json"
    mismatched = sorted(loading.get("mismatched_keys") or ())
    if mismatched:
        name, stored, wanted = mismatched[0]
        raise UserError(f"{config_json} does not fit the weights: {name} is {list(stored)} in the "
                        f"checkpoint but {list(wanted)} for the config; fix config.json")
    unused = _backbone(loading.get("unexpected_keys"))  # another head's weights are fine
    if unused:
        raise UserError(f"{config_json} does not fit the weights: the checkpoint holds {unused[0]}, "
                        "which a model of this config has no place for; fix config.json")
    missing = sorted(loading.get("missing_keys") or ())
    needed = _backbone(missing)
    if needed:
        raise UserError(f"{config_json} does not fit the weights: the checkpoint has no "
                        f"{needed[0]}, which this config needs; fix config.json")
    if missing:
        raise UserError(f"{folder} has no weights for {', '.join(missing[:3])}"
                        f"{' ...' if len(missing) > 3 else ''} of the {task.name} head; {remedy}")


def _backbone(keys) -> list[str]:
    """The encoder's and embeddings' weights among ``keys`` (not a task head's)."""
    return sorted(key for key in keys or () if re.search(r"(^|\.)(embeddings|encoder)\.", key))


def build_checkpoint(folder: str | Path, task: Task, seed: int = DEFAULT_SEED,
                     **config_overrides) -> Path:
    """Save a seeded random ``task`` model and the local tokenizer to ``folder``."""
    folder = Path(folder)
    tokenizer = default_tokenizer()
    settings = {**DEFAULT_CONFIG, "vocab_size": tokenizer.vocab_size, **config_overrides}
    config = MraConfig(**settings, architectures=[task.model_class_name])
    torch.manual_seed(seed)
    model = task.model_class(config).eval()
    model.save_pretrained(folder)
    tokenizer.model_max_length = config.max_position_embeddings  # what truncation=True keeps
    tokenizer.save_pretrained(folder)
    return folder


def build_default_checkpoints(root: str | Path, tasks=None) -> dict[str, Path]:
    """The built-in default checkpoint, one folder per task under ``root``."""
    root = Path(root)
    return {name: build_checkpoint(root / name, TASKS[name]) for name in (tasks or TASKS)}


def default_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A RoBERTa-style byte-level BPE tokenizer, trained here on a built-in text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # it prints blank lines when not on a tty
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>",
        cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
        model_max_length=DEFAULT_CONFIG["max_position_embeddings"])  # build_checkpoint sets it
