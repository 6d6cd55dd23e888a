"""Bad input to export and to OrtMraModel: one clear message, and no half-written output."""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, MraConfig, MraModel

from mra_export.cli import main
from mra_export.errors import InputError, UserError
from mra_export.export import export_model
from mra_export.patching import patch_model
from mra_export.runtime import OrtMraModel
from mra_export.runtime import ort as ort_module
from mra_export.runtime.plugin_reference import ReferencePluginModel

from .conftest import onnx_model


# How an export handles its folders does not depend on the flavour, and the plugin flavour
# exports in a seventh of the portable's time (it traces no attention): the folder tests use it.
FOLDER_TEST = dict(flavour="plugin", log=lambda message: None)


def no_leftovers(folder):
    return [p.name for p in folder.iterdir() if ".partial-" in p.name or ".previous-" in p.name]


def test_unknown_task(small_checkpoints, tmp_path):
    with pytest.raises(UserError, match="unknown task 'summarization'; choose one of: "
                                        "feature-extraction, fill-mask"):
        export_model(small_checkpoints["fill-mask"], tmp_path / "out", task="summarization")
    assert not (tmp_path / "out").exists()


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        export_model(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(UserError, match="does not exist"):
        export_model(tmp_path / "missing", tmp_path / "out")


def test_a_file_or_an_export_instead_of_a_checkpoint(exports, tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match="a-file is a file; pass the folder save_pretrained wrote"):
        export_model(tmp_path / "a-file", tmp_path / "out")
    with pytest.raises(UserError, match="is an export \\(it has export.json\\), not a checkpoint"):
        export_model(exports["fill-mask", "portable"], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_unreadable_tokenizer_files_are_said_not_shipped(small_checkpoints, tmp_path, capsys):
    checkpoint = shutil.copytree(small_checkpoints["fill-mask"], tmp_path / "model")
    (checkpoint / "tokenizer.json").write_text("garbage{")
    info = export_model(checkpoint, tmp_path / "out", **FOLDER_TEST)  # progress silenced
    assert info.tokenizer is False and not (tmp_path / "out" / "tokenizer.json").exists()
    warned = capsys.readouterr().err  # warnings still said, on stderr
    assert warned.startswith(f"warning: the tokenizer files in {checkpoint} cannot be read")


def test_a_tokenizer_longer_than_the_model_is_noted_at_export(small_checkpoints, tmp_path,
                                                               capsys):
    """build_checkpoint's tokenizer stops at max_position_embeddings (256): truncation=True
    already gives what the model takes, so there is nothing to note; a longer one is noted."""
    checkpoint = shutil.copytree(small_checkpoints["fill-mask"], tmp_path / "model")
    settings = json.loads((checkpoint / "tokenizer_config.json").read_text())
    assert settings["model_max_length"] == 256

    def export_notes():
        (checkpoint / "tokenizer_config.json").write_text(json.dumps(settings))
        assert main(["export", "--model", str(checkpoint), "--out", str(tmp_path / "out"),
                     "--flavour", "plugin"]) == 0
        return capsys.readouterr().err

    assert "note: the tokenizer" not in export_notes()
    for model_max_length, stops in [(512, "stops at 512 tokens (model_max_length)"),
                                     (None, "sets no model_max_length")]:
        settings["model_max_length"] = model_max_length
        if model_max_length is None:
            del settings["model_max_length"]
        assert (f"note: the tokenizer {stops}, the model at 256 (max_position_embeddings): pass "
                "max_length=256 when truncating" in export_notes())


def test_a_config_that_is_not_mra(tmp_path):
    BertConfig().save_pretrained(tmp_path / "bert")
    with pytest.raises(UserError, match="holds a 'bert' model, not MRA"):
        export_model(tmp_path / "bert", tmp_path / "out")


def test_a_corrupt_config(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read .*config.json"):
        export_model(tmp_path / "broken", tmp_path / "out")


def test_a_checkpoint_without_the_heads_weights(small_checkpoints, tmp_path):
    with pytest.raises(UserError, match="has no weights for .* of the fill-mask head; pass "
                                        "--task auto"):
        export_model(small_checkpoints["question-answering"], tmp_path / "out", task="fill-mask")


def edited_checkpoint(source, folder, **config_edits):
    """A copy of the checkpoint ``source`` whose config.json has ``config_edits``."""
    folder = shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_edits}))
    return folder


@pytest.mark.parametrize("edit,message", [
    (dict(hidden_act="foo"), "unknown hidden_act 'foo'"),
    (dict(num_attention_heads=3), "hidden_size 128 is not a multiple of num_attention_heads 3"),
    (dict(approx_mode="bogus"), "approx_mode must be 'full' or 'sparse', got 'bogus'"),
    (dict(block_per_row=0), "block_per_row=0 and max_position_embeddings=256 leave MRA no block "
                            "to select"),
    (dict(max_position_embeddings=16), "block_per_row=2 and max_position_embeddings=16 leave"),
    # transformers' own failures deep inside: a division by zero heads, an assertion on an empty
    # vocabulary, a TypeError on architectures, onnxruntime's on a negative epsilon
    (dict(num_attention_heads=0), "num_attention_heads must be a whole number >= 1, got 0"),
    (dict(vocab_size=0), "vocab_size must be a whole number >= 1, got 0"),
    (dict(type_vocab_size=0), "type_vocab_size must be a whole number >= 1, got 0"),
    (dict(num_hidden_layers=-1), "num_hidden_layers must be a whole number >= 0, got -1"),
    (dict(architectures=5), "architectures must be a list of class names, got 5"),
    (dict(layer_norm_eps=-1.0), "layer_norm_eps must be a number > 0, got -1.0"),
    # transformers' own type checks, whose messages span lines
    (dict(hidden_size="128"), "TypeError: Field 'hidden_size' expected int, got str"),
    (dict(max_position_embeddings=None), "TypeError: Field 'max_position_embeddings' expected int"),
    (dict(hidden_act=["gelu"]), "TypeError: Field 'hidden_act' expected str, got list"),
])
def test_a_config_mra_cannot_run_is_named_before_transformers_fails(small_checkpoints, tmp_path,
                                                                      edit, message):
    checkpoint = edited_checkpoint(small_checkpoints["fill-mask"], tmp_path / "model", **edit)
    with pytest.raises(UserError, match=f"model/config.json: {re.escape(message)}.*; fix it or pass "
                                        "another checkpoint") as raised:
        export_model(checkpoint, tmp_path / "out")
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "out").exists()


def test_weights_with_a_nan_are_named_not_reported_as_an_export_that_differs(small_checkpoints,
                                                                            tmp_path):
    checkpoint = shutil.copytree(small_checkpoints["fill-mask"], tmp_path / "model")
    weights = load_file(checkpoint / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"model's weight .* holds NaN or infinite values; the "
                                        "checkpoint is damaged: pass another"):
        export_model(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_weights_file_that_is_not_a_pickle_is_a_one_line_error(small_checkpoints, tmp_path):
    checkpoint = shutil.copytree(small_checkpoints["fill-mask"], tmp_path / "model")
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / "pytorch_model.bin").write_bytes(b"e" * 1100)  # text where a pickle should be
    with pytest.raises(UserError, match="cannot load MraForMaskedLM from .*model: .*; pass a folder "
                                        "with the weights save_pretrained wrote") as raised:
        export_model(checkpoint, tmp_path / "out")
    assert "\n" not in str(raised.value)
    (checkpoint / "pytorch_model.bin").write_bytes(b"garbage\n")  # a pickle torch refuses
    with pytest.raises(UserError, match="model: its .bin weights are not a pickle torch.load reads "
                                        r"safely \(weights_only: corrupt") as raised:
        export_model(checkpoint, tmp_path / "out")
    assert "weights_only=False" not in str(raised.value)  # unsafe advice, not ours to give


@pytest.mark.parametrize("edit,message", [
    (dict(num_hidden_layers=1), "the checkpoint holds mra.encoder.layer.1.* which a model of this "
                                "config has no place for"),
    (dict(num_hidden_layers=3), "the checkpoint has no mra.encoder.layer.2.*, which this config "
                                "needs"),
    (dict(intermediate_size=512), r"mra.encoder.layer.0.intermediate.dense.bias is \[256\] in "
                                  r"the checkpoint but \[512\] for the config"),
])
def test_a_config_that_does_not_fit_the_weights_is_named(small_checkpoints, tmp_path, edit,
                                                         message):
    """transformers drops unused weights and fills missing or mis-shaped ones at random, and
    says so only in its (muted) log."""
    checkpoint = edited_checkpoint(small_checkpoints["fill-mask"], tmp_path / "model", **edit)
    with pytest.raises(UserError, match=f"model/config.json does not fit the weights: {message}"
                                        ".*; fix config.json"):
        export_model(checkpoint, tmp_path / "out")


def test_an_export_into_the_folder_holding_its_checkpoint_is_refused(small_checkpoints, exports,
                                                                      tmp_path):
    earlier = shutil.copytree(exports["fill-mask", "portable"], tmp_path / "out")
    checkpoint = shutil.copytree(small_checkpoints["fill-mask"], earlier / "checkpoint")
    with pytest.raises(UserError, match="out/checkpoint is inside .*out, which this command would "
                                        "replace; choose another output folder"):
        export_model(checkpoint, earlier)
    assert (checkpoint / "model.safetensors").is_file()


def test_a_failed_export_removes_the_parent_folders_it_made(small_checkpoints, tmp_path):
    checkpoint = shutil.copytree(small_checkpoints["fill-mask"], tmp_path / "model")
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(UserError, match="cannot load MraForMaskedLM"):
        export_model(checkpoint, tmp_path / "new" / "deeper" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_an_output_gets_the_permissions_of_any_file_made_under_the_umask(small_checkpoints,
                                                                        tmp_path):
    """Outputs are staged in mkdtemp/mkstemp entries (0700/0600): once in place they must be as
    readable as a file or folder made the ordinary way (say, by a Triton server of another
    user)."""
    previous = os.umask(0o022)
    try:
        (tmp_path / "plain_folder").mkdir()
        (tmp_path / "plain_file").write_text("")
        export_model(small_checkpoints["fill-mask"], tmp_path / "out", **FOLDER_TEST)
    finally:
        os.umask(previous)
    ordinary = {True: (tmp_path / "plain_folder").stat().st_mode,
                False: (tmp_path / "plain_file").stat().st_mode}
    made = [tmp_path / "out", *(tmp_path / "out").rglob("*")]
    assert len(made) > 3 and all(path.stat().st_mode == ordinary[path.is_dir()] for path in made)


def test_an_output_path_through_dot_dot_is_the_folder_it_names(small_checkpoints, tmp_path):
    (tmp_path / "out").mkdir()
    export_model(small_checkpoints["fill-mask"], tmp_path / "out" / "sub" / "..", **FOLDER_TEST)
    assert (tmp_path / "out" / "export.json").is_file() and no_leftovers(tmp_path / "out") == []


def test_corrupt_weights(small_checkpoints, tmp_path):
    checkpoint = shutil.copytree(small_checkpoints["fill-mask"], tmp_path / "model")
    with open(checkpoint / "model.safetensors", "r+b") as stream:
        stream.truncate(50)
    with pytest.raises(UserError, match="cannot load MraForMaskedLM from .*model: Error while "
                                        "deserializing header.*; pass a folder with the weights"):
        export_model(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []


@pytest.mark.parametrize("error,shown", [
    (MemoryError(), "out of memory (MemoryError)"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                  "allocate memory: you tried to allocate 2359296 bytes."),
     "out of memory ([enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
     "allocate memory: you tried to allocate 2359296 bytes.)"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore advice"),
     "out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)"),
])
def test_running_out_of_memory_is_one_line(error, shown, monkeypatch, capsys):
    from mra_export import cli

    def exhausted(args):
        raise error

    monkeypatch.setattr(cli, "_export", exhausted)
    assert main(["export", "--model", "m", "--out", "o"]) == 2
    assert capsys.readouterr().err == (f"mra-export export: error: {shown}; use smaller sizes "
                                       "(lengths, batches, layers) or a machine with more memory\n")


def test_another_runtime_error_is_not_called_out_of_memory(monkeypatch):
    from mra_export import cli

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_export", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["export", "--model", "m", "--out", "o"])


def test_a_signal_ignored_at_start_stays_ignored_while_a_command_runs():
    """Under nohup SIGHUP is ignored, and a command must not turn it into a stop."""
    import signal

    from mra_export.cli import _cleanup_on_stop

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with _cleanup_on_stop():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) != signal.SIG_IGN  # still turned into a stop
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


@pytest.mark.parametrize("stop,status", [("SIGTERM", -15), ("SIGHUP", -1), ("SIGINT", 130)])
def test_a_stopped_export_leaves_nothing(small_checkpoints, tmp_path, stop, status):
    """kill, a closed terminal or Ctrl-C in the middle of an export: the partial folder goes
    with it. After its clean-up a SIGTERM still ends the process as killed by it (status -15
    here, 143 in a shell), a SIGHUP likewise."""
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "mra_export.cli", "export", "--model",
               str(small_checkpoints["fill-mask"]), "--out", str(tmp_path / "out")]
    process = subprocess.Popen(  # a background job inherits SIGINT ignored, nohup SIGHUP: the default
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGHUP)])
    try:
        deadline = time.time() + 120
        while not no_leftovers(tmp_path) and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert no_leftovers(tmp_path), "the export never started writing"
        process.send_signal(getattr(signal, stop))
        _, errors = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == status
    assert errors.strip().splitlines()[-1] == {"SIGTERM": "terminated", "SIGHUP": "hung up",
                                               "SIGINT": "interrupted"}[stop]
    assert list(tmp_path.iterdir()) == []


def test_the_signal_handlers_are_the_callers_again_after_a_command(tmp_path):
    import signal
    import threading

    before = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)]
    assert main(["bench", "--layers", "0", "--out", str(tmp_path / "b")]) == 2
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)] == before
    codes = []  # and a command can run outside the main thread (no handler there)
    thread = threading.Thread(target=lambda: codes.append(
        main(["bench", "--layers", "0", "--out", str(tmp_path / "b")])))
    thread.start()
    thread.join()
    assert codes == [2]


@pytest.mark.parametrize("command,out", [
    (["quantize", "--onnx", "{export}", "--out", "{export}/int8"], "{export}/int8"),
    (["triton", "--onnx", "{export}", "--repo", "{export}/repo", "--name", "m"], "{export}/repo/m"),
])
def test_an_output_inside_the_export_it_reads_is_refused(command, out, exports, tmp_path,
                                                         capsys):
    """A later export to that folder would delete it with the rest."""
    export = shutil.copytree(exports["text-classification", "portable"], tmp_path / "export")
    before = sorted(p.name for p in export.iterdir())
    assert main([word.format(export=export) for word in command]) == 2
    assert capsys.readouterr().err == (
        f"mra-export {command[0]}: error: {out.format(export=export)} is inside {export}, which "
        "the command that made it replaces whole when run again; choose an output folder "
        "outside it\n")
    assert sorted(p.name for p in export.iterdir()) == before


def test_the_records_of_outputs_read_as_inputs_are_those_of_exports_and_engines():
    """files.py names them itself (export/info.py and engines/manifest.py import it)."""
    from mra_export import files
    from mra_export.engines.manifest import EngineManifest
    from mra_export.export.info import ExportInfo

    assert files.INPUT_RECORDS == (ExportInfo.FILE_NAME, EngineManifest.FILE_NAME)


@pytest.mark.parametrize("writer", ["staged_folder", "folder_filled_in_place"])
def test_a_mount_point_is_refused_where_no_namespace_can_make_one(writer, tmp_path, monkeypatch):
    """test_a_mount_point_as_the_output_is_refused_before_any_work needs unprivileged user
    namespaces; this one holds the rule everywhere, a mount point as os.path.ismount finds it."""
    from mra_export import files

    volume = tmp_path / "volume"
    volume.mkdir()
    monkeypatch.setattr(files.os.path, "ismount", lambda path: os.fspath(path) == str(volume))
    with pytest.raises(UserError, match=f"{volume} is a mount point, which outputs cannot "
                                        "replace .*; pass a folder inside it"):
        with getattr(files, writer)(volume, "parity.json"):
            pass
    with getattr(files, writer)(volume / "out", "parity.json") as folder:
        (folder / "parity.json").write_text("inside")
    assert (volume / "out" / "parity.json").read_text() == "inside"


def test_an_output_through_a_link_to_a_folder_replaces_the_folder_and_keeps_the_link(
        small_checkpoints, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    export_model(small_checkpoints["text-classification"], tmp_path / "link", **FOLDER_TEST)
    assert (tmp_path / "link").is_symlink() and (target / "export.json").is_file()
    export_model(small_checkpoints["text-classification"], tmp_path / "link", **FOLDER_TEST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]
    assert (tmp_path / "link").is_symlink() and (target / "export.json").is_file()


def test_output_paths_through_a_dangling_link_are_one_line(small_checkpoints, tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    for out in (tmp_path / "link", tmp_path / "link" / "out"):
        with pytest.raises(UserError, match="cannot write to|exists and is not a folder"):
            export_model(small_checkpoints["fill-mask"], out, log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]


def test_export_replaces_only_an_earlier_export(small_checkpoints, tmp_path):
    """An existing folder is replaced only when it is an export (export.json): a user's folder,
    or the checkpoint itself, is refused and left as it was."""
    checkpoint = shutil.copytree(small_checkpoints["fill-mask"], tmp_path / "model")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for out in (tmp_path / "mine", checkpoint):
        before = sorted(p.name for p in out.iterdir())
        with pytest.raises(UserError, match=f"{out} already holds other files \\(no export.json"):
            export_model(checkpoint, out, log=lambda m: None)
        assert sorted(p.name for p in out.iterdir()) == before
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    export_model(checkpoint, tmp_path / "empty", **FOLDER_TEST)  # an empty folder is fine
    export_model(checkpoint, tmp_path / "empty", "feature-extraction", **FOLDER_TEST)
    assert json.loads((tmp_path / "empty" / "export.json").read_text())["task"] == "feature-extraction"


def test_unwritable_output_leaves_nothing(small_checkpoints, tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match="cannot write to .*a-file"):
        export_model(small_checkpoints["fill-mask"], tmp_path / "a-file" / "out")
    with pytest.raises(UserError, match="exists and is not a folder"):
        export_model(small_checkpoints["fill-mask"], tmp_path / "a-file")
    assert no_leftovers(tmp_path) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_folder_that_takes_no_new_entries_is_found_before_any_work(small_checkpoints):
    # os.access says yes to root here (and on read-only mounts); making a folder is what tells.
    with pytest.raises(UserError, match="cannot write to /proc: /proc is not a "
                                        "writable folder"):
        export_model(small_checkpoints["fill-mask"], "/proc/mra-out", log=lambda m: None)


def test_a_full_disk_during_an_export_is_one_line_and_leaves_nothing(small_checkpoints, tmp_path,
                                                                    monkeypatch, capsys):
    from mra_export.export import exporter

    def full_disk(onnx_model, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(exporter, "_save", full_disk)
    code = main(["export", "--model", str(small_checkpoints["fill-mask"]),
                 "--out", str(tmp_path / "out"), "--flavour", FOLDER_TEST["flavour"]])
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error and error.count("\n") == 1
    assert error.startswith("mra-export export: error: ") and error.rstrip().endswith(
        "model.onnx: No space left on device; free space there, or choose another output path")
    assert no_leftovers(tmp_path) == []


LEFT_ON_DISK = "left-on-the-disk:"


def small_disk_or_skip(folder) -> list[str]:
    """A command prefix that runs what follows with a 512 KiB tmpfs mounted at ``folder``, in
    a user and mount namespace of its own (no root needed), then lists what is left there."""
    import subprocess

    folder.mkdir()
    mount = f"mount -t tmpfs -o size=512k tmpfs {shlex.quote(str(folder))}"
    try:
        subprocess.run(["unshare", "-rm", "sh", "-c", mount], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"no tmpfs in a user namespace here (unshare -rm: {error})")
    run_then_list = (f'{mount} && "$@"; status=$?; echo {LEFT_ON_DISK}; '
                     f'ls -A {shlex.quote(str(folder))}; exit $status')
    return ["unshare", "-rm", "sh", "-c", run_then_list, "sh"]


def run_on_a_small_disk(command, small_checkpoints, exports, tmp_path):
    """The CLI run on ``command``'s words, whose {checkpoint}, {export} and {disk} name a
    question-answering checkpoint, its portable export and a 512 KiB tmpfs (small_disk_or_skip):
    ``(the finished process, those names)``. Question answering: it has no Gemm head, which
    onnxruntime's quantizer fails on before 1.32 (docs/transformers.md)."""
    import subprocess
    import sys

    names = dict(checkpoint=small_checkpoints["question-answering"], disk=tmp_path / "disk",
                 export=exports["question-answering", "portable"])
    prefix = small_disk_or_skip(names["disk"])
    run = subprocess.run([*prefix, sys.executable, "-m", "mra_export.cli",
                          *(word.format(**names) for word in command)],
                         capture_output=True, text=True, timeout=300)
    return run, names


@pytest.mark.parametrize("command,written", [  # the plugin flavour: FOLDER_TEST says why
    (["export", "--model", "{checkpoint}", "--out", "{disk}/out", "--flavour", "plugin"],
     "{disk}/out"),
    (["quantize", "--onnx", "{export}", "--out", "{disk}/out"], "{disk}/out/model.onnx"),
    (["triton", "--onnx", "{export}", "--repo", "{disk}/repo", "--name", "m"],
     "{disk}/repo/m/1/model.onnx"),
])
def test_a_disk_that_fills_up_is_one_line_naming_the_output_and_leaves_nothing(
        command, written, small_checkpoints, exports, tmp_path):
    """A real full disk: the output's own path (not its staging folder's, nor the file copied)
    and what to do, and nothing left on it."""
    run, names = run_on_a_small_disk(command, small_checkpoints, exports, tmp_path)
    error = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert error == (f"mra-export {command[0]}: error: {written.format(**names)}: No space left "
                     "on device; free space there, or choose another output path")
    assert run.stdout.split(LEFT_ON_DISK)[-1].split() == [], run.stdout


@pytest.mark.parametrize("command", [
    ["export", "--model", "{checkpoint}", "--out", "{disk}"],
    ["quantize", "--onnx", "{export}", "--out", "{disk}"],
    ["demo", "--out", "{disk}"],
    ["bench", "--lengths", "16", "--batches", "1", "--budget", "1", "--out", "{disk}"],
])
def test_a_mount_point_as_the_output_is_refused_before_any_work(command, small_checkpoints,
                                                               exports, tmp_path):
    """An empty volume (a container's) cannot be renamed away or into place: said up front,
    with what to pass instead, not after the work as a rename's EBUSY on a temporary name."""
    run, names = run_on_a_small_disk(command, small_checkpoints, exports, tmp_path)
    assert run.returncode == 2 and run.stderr == (
        f"mra-export {command[0]}: error: {names['disk']} is a mount point, which outputs cannot "
        "replace (they are written beside it and renamed into place); pass a folder inside it, "
        f"e.g. {names['disk'] / 'out'}\n")
    assert run.stdout.split(LEFT_ON_DISK)[-1].split() == [], run.stdout


def test_a_failed_export_keeps_the_previous_folder_and_no_partial_one(small_checkpoints, tmp_path,
                                                                       monkeypatch):
    from mra_export.export import exporter

    out = tmp_path / "out"
    export_model(small_checkpoints["text-classification"], out, **FOLDER_TEST)
    before = (out / "model.onnx").read_bytes()

    def broken_check(path):
        raise UserError("the exported model fails onnx.checker: injected")

    monkeypatch.setattr(exporter, "_check", broken_check)
    with pytest.raises(UserError, match="injected"):
        export_model(small_checkpoints["text-classification"], out, **FOLDER_TEST)
    assert (out / "model.onnx").read_bytes() == before
    assert no_leftovers(tmp_path) == []


def test_unsupported_opset_and_flavour(small_checkpoints, tmp_path):
    with pytest.raises(UserError, match="opset 13 is not supported; choose 18..23"):
        export_model(small_checkpoints["fill-mask"], tmp_path / "out", opset=13)
    with pytest.raises(UserError, match="unknown flavour 'tensorrt'"):
        export_model(small_checkpoints["fill-mask"], tmp_path / "out", flavour="tensorrt")


def one_layer_model(folder, hidden_size: int, heads: int):
    """A random one-layer MraModel of ``heads`` heads of ``hidden_size / heads``, saved."""
    config = MraConfig(vocab_size=50, hidden_size=hidden_size, num_attention_heads=heads,
                       num_hidden_layers=1, intermediate_size=64, max_position_embeddings=128)
    MraModel(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("hidden_size, heads, head_dim", [(96, 2, 48), (512, 2, 256)])
def test_plugin_exports_of_head_dims_the_cuda_kernels_lack_are_refused_first(
        tmp_path, hidden_size, heads, head_dim):
    """The plugin would refuse them only inside TensorRT's build; the export says so at once."""
    one_layer_model(tmp_path / "model", hidden_size, heads)
    with pytest.raises(UserError, match=f"CUDA kernels take head_dim 32, 64 or 128 .* this "
                                        f"model's is {head_dim}; export it with --flavour portable"):
        export_model(tmp_path / "model", tmp_path / "out", flavour="plugin")
    assert not (tmp_path / "out").exists()


def test_a_plugin_export_of_a_head_dim_under_32_is_made_and_runs(tmp_path):
    """The patched model pads head dims under 32 to 32, which the CUDA kernels take: a model of
    head_dim 16 exports to the plugin flavour, and its graph computes what the patched
    PyTorch model does."""
    torch.manual_seed(0)
    model = one_layer_model(tmp_path / "model", hidden_size=32, heads=2)
    export_model(model, tmp_path / "out", flavour="plugin", log=lambda m: None)
    ids = torch.randint(3, 50, (1, 40))
    patched = patch_model(MraModel.from_pretrained(model), attention="reference")
    with torch.no_grad():
        expected = patched(input_ids=ids).last_hidden_state  # transformers' MRA needs CUDA
    ours = ReferencePluginModel.from_pretrained(tmp_path / "out")(input_ids=ids.numpy())
    assert np.abs(np.asarray(ours["last_hidden_state"]) - expected.numpy()).max() <= 1e-4


class DataDependentBranch(torch.nn.Module):
    """Model code torch.export cannot trace: a branch on a tensor's value."""

    def forward(self, x):
        return x * 2 if x.sum() > 0 else x - 1


def test_a_model_torch_export_cannot_trace_is_named_in_one_line(capsys):
    """torch.onnx's own message only points at "the error above", which torch.export printed
    to stderr as the graph it traced: the root cause is named instead, and nothing printed."""
    from mra_export.export import tracing

    with pytest.raises(UserError) as raised:
        tracing.onnx_graph(DataDependentBranch(), {"x": torch.ones(2, 3)},
                           {"x": {0: torch.export.Dim("batch")}}, 20, ["y"])
    assert str(raised.value).startswith("torch.onnx.export failed: GuardOnDataDependentSymNode: "
                                        "Could not guard on data-dependent expression")
    assert "\n" not in str(raised.value)
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("version", ["0.5.0", "0.7.0"])
def test_an_onnxscript_older_than_exports_need_is_refused_before_tracing(version, monkeypatch):
    """Found in a venv at the old lower bounds: torch 2.13's exporter imports a module
    onnxscript 0.5 lacks, and 0.6.0 to 0.7.0 failed every portable export in the optimizer."""
    import onnxscript

    from mra_export.export import tracing

    def trace(*args, **kwargs):
        raise AssertionError("traced with an onnxscript too old")

    monkeypatch.setattr(onnxscript, "__version__", version)
    monkeypatch.setattr(torch.onnx, "export", trace)
    with pytest.raises(UserError) as raised:
        tracing.onnx_graph(torch.nn.Identity(), {"x": torch.ones(2)}, {}, 20, ["y"])
    assert str(raised.value) == (f"onnxscript {version} is older than exporting needs (0.7.1); "
                                 "pip install --upgrade 'onnxscript>=0.7.1'")


def test_the_onnxscript_floor_is_the_projects_bound():
    from mra_export.export.tracing import ONNXSCRIPT_FLOOR

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert f'"onnxscript>={ONNXSCRIPT_FLOOR}"' in pyproject


def test_the_cli_prints_one_line_and_exits_2(small_checkpoints, tmp_path, capsys):
    code = main(["export", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip().count("\n") == 0
    assert captured.err.startswith("mra-export export: error: model folder")
    assert "Traceback" not in captured.err


# --- OrtMraModel -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qa_model(exports):
    return OrtMraModel.from_pretrained(exports["question-answering", "portable"])


def ids(*shape, high=500):
    return torch.randint(5, high, shape)


@pytest.mark.parametrize("inputs,message", [
    (dict(input_ids=ids(2, 10).float()), "input_ids must hold integers, got float32"),
    (dict(input_ids=ids(10)), r"input_ids must be \[batch_size, sequence_length\], got shape \[10\]"),
    (dict(input_ids=ids(1, 2, 10)), r"must be \[batch_size, sequence_length\]"),
    (dict(attention_mask=torch.ones(2, 10)), "input_ids is required"),
    (dict(input_ids=ids(1, 257)), "sequence length 257 is longer than the model's "
                                  "max_position_embeddings=256; truncate"),
    (dict(input_ids=ids(2, 10), attention_mask=torch.ones(2, 9)), r"attention_mask has shape "
                                                                  r"\[2, 9\] but input_ids"),
    (dict(input_ids=ids(2, 10), position_ids=ids(2, 10)), "unexpected input position_ids"),
    (dict(input_ids=ids(2, 10) + 1000), r"input_ids must be in \[0, 512\)"),
    (dict(input_ids=torch.tensor([[0, 511, 512]])), r"input_ids must be in \[0, 512\) for this "
                                                    r"model, got values 0..512"),
    (dict(input_ids=torch.tensor([[-1, 511]])), r"got values -1..511"),
    (dict(input_ids=[[1, 2, 3], [1, 2]]), "input_ids is ragged; pad the batch"),
    (dict(input_ids=ids(0, 10)), "input_ids is empty"),
    (dict(input_ids=ids(2, 10), attention_mask=torch.full((2, 10), 0.5)),
     r"attention_mask must hold 0 and 1, got 0.5 \(float32\)"),
    (dict(input_ids=5), r"input_ids must be \[batch_size, sequence_length\], got shape \[\]"),
    (dict(input_ids=ids(2, 10).to_sparse()), r"input_ids is a torch.sparse_coo tensor; pass a "
                                             r"dense one \(.to_dense\(\)\)"),
    (dict(input_ids=ids(2, 10).to("meta")), "input_ids is a meta tensor, which holds no values"),
    (dict(input_ids=np.array([[2**63 + 5]], dtype=np.uint64)),
     "input_ids holds 9223372036854775813, past int64's range"),
    (dict(input_ids=[[5, 2**63]]), "input_ids holds 9223372036854775808, past int64's range"),
    (dict(input_ids=[[5, -2**70]]), "input_ids holds -1180591620717411303424, past int64's range"),
    (dict(input_ids={"input_ids": [[5, 6]]}), r"input_ids is a mapping \(a tokenizer's whole "
                                              r"output\?\); pass it unpacked: model\(\*\*encoding\)"),
    (dict(input_ids=ids(2, 10), output_attentions=True), "output_attentions is not available from "
                                                         "an exported model"),
    (dict(input_ids=ids(2, 10), output_hidden_states=True), "output_hidden_states is not available"),
    (dict(input_ids=ids(2, 10), token_type_ids=torch.ones(2, 10, dtype=torch.long)),
     "unexpected input token_type_ids"),
    (dict(input_ids=ids(2, 10), token_type_ids=torch.zeros(2, 9, dtype=torch.long)),
     "unexpected input token_type_ids"),
])
def test_ort_model_rejects_bad_input(qa_model, inputs, message):
    with pytest.raises(InputError, match=message):
        qa_model(**inputs)


def test_ort_model_accepts_numpy_torch_lists_and_float_masks(qa_model):
    tokens = ids(2, 12)
    as_torch = qa_model(input_ids=tokens, attention_mask=torch.ones(2, 12))
    as_numpy = qa_model(input_ids=tokens.numpy(), attention_mask=np.ones((2, 12), np.int32))
    as_list = qa_model(input_ids=tokens.tolist())
    assert type(as_torch).__name__ == "QuestionAnsweringModelOutput"
    assert isinstance(as_torch.start_logits, torch.Tensor)
    assert isinstance(as_numpy.start_logits, np.ndarray)
    assert np.array_equal(as_torch.start_logits.numpy(), as_numpy.start_logits)
    assert np.array_equal(as_list.end_logits, as_numpy.end_logits)  # default mask: all ones
    edges = qa_model(input_ids=[[0, 511]])  # the vocabulary's first and last ids
    assert edges.start_logits.shape == (1, 2) and np.isfinite(edges.start_logits).all()


def test_ort_model_takes_a_bfloat16_mask_as_its_0_1_values(qa_model):
    tokens, mask = ids(2, 12), torch.tensor([[1] * 12, [1] * 7 + [0] * 5])
    as_bf16 = qa_model(input_ids=tokens, attention_mask=mask.to(torch.bfloat16))
    assert torch.equal(as_bf16.start_logits, qa_model(input_ids=tokens, attention_mask=mask).start_logits)


def test_ort_model_to_a_dtype_or_device_it_cannot_take_is_one_line(qa_model):
    assert qa_model.to(torch.float32) is qa_model and qa_model.to("cpu") is qa_model
    with pytest.raises(UserError, match="this export computes in fp32, fixed when it was made; "
                                        "for torch.float16 export again with --dtype"):
        qa_model.to(torch.float16)
    with pytest.raises(UserError, match="unknown device 'bogus'; use 'cpu' or 'cuda'"):
        qa_model.to("bogus")
    with pytest.raises(UserError, match="CUDAExecutionProvider is not available"):
        qa_model.to(0)  # pipeline(device=0): the first GPU
    assert qa_model.providers == ["CPUExecutionProvider"]
    # torch's other forms: device and dtype together, by name, a tensor's; -1 as pipeline's CPU
    for args, kwargs in [(("cpu", torch.float32), {}), ((), {"device": "cpu", "dtype": torch.float32}),
                         ((torch.zeros(1),), {}), ((-1,), {}), ((), {"non_blocking": True})]:
        assert qa_model.to(*args, **kwargs) is qa_model
    with pytest.raises(UserError, match="for torch.float16 export again with --dtype"):
        qa_model.to("cpu", dtype=torch.float16)
    with pytest.raises(UserError, match="for torch.bfloat16 export again with --dtype"):
        qa_model.to(torch.zeros(1, dtype=torch.bfloat16))
    assert qa_model.providers == ["CPUExecutionProvider"]


def test_ort_model_takes_transformers_call_conventions(qa_model):
    """What a transformers user passes: return_dict=False gives the tuple, a tokenizer's all-zero
    token_type_ids are what a graph without that input uses anyway, False flags are no-ops."""
    tokens = ids(2, 12)
    expected = qa_model(input_ids=tokens)
    as_tuple = qa_model(input_ids=tokens, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    assert torch.equal(as_tuple[0], expected.start_logits) and torch.equal(as_tuple[1], expected.end_logits)
    same = qa_model(input_ids=tokens, token_type_ids=torch.zeros_like(tokens), return_dict=True,
                    output_attentions=False, output_hidden_states=False)
    assert torch.equal(same.start_logits, expected.start_logits)


@pytest.mark.parametrize("target", ["start_positions", "end_positions", "labels"])
def test_ort_model_says_it_computes_no_loss(qa_model, target):
    """An evaluation loop written for the PyTorch head passes its loss targets."""
    with pytest.raises(InputError, match=f"{target} is not taken by an exported model \\(its "
                                         "graph computes no loss\\); compute the loss from"):
        qa_model(input_ids=ids(2, 12), **{target: torch.tensor([1, 2])})


def test_ort_model_refuses_changed_or_corrupt_files(exports, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(exports["fill-mask", "portable"], folder)
    with open(folder / "model.onnx", "ab") as stream:
        stream.write(b"\0")
    with pytest.raises(UserError, match="does not match the sha256 in export.json"):
        OrtMraModel.from_pretrained(folder)
    with pytest.raises(UserError, match="onnxruntime cannot load"):
        OrtMraModel.from_pretrained(folder, verify=False)
    record = json.loads((folder / "export.json").read_text())
    for field, value in (("task", "bogus"), ("flavour", "weird"), ("dtype", "fp64")):
        (folder / "export.json").write_text(json.dumps({**record, field: value}))
        with pytest.raises(UserError, match=f"export.json is corrupt \\(unknown {field} '{value}'\\); "
                                            "export the model again"):
            OrtMraModel.from_pretrained(folder)
    (folder / "export.json").write_text("{")
    with pytest.raises(UserError, match="export.json is corrupt"):
        OrtMraModel.from_pretrained(folder)
    (folder / "export.json").write_bytes(b"\xb8\x00")
    with pytest.raises(UserError, match="export.json is corrupt \\('utf-8' codec can't decode"):
        OrtMraModel.from_pretrained(folder)
    (folder / "export.json").unlink()
    with pytest.raises(UserError, match="has no export.json"):
        OrtMraModel.from_pretrained(folder)


@pytest.mark.parametrize("edit,message", [
    (dict(sha256=None), r"sha256 is null, not dict\[str, str\]"),
    (dict(opset="20"), r'opset is "20", not int'),
    (dict(dynamic_axes={}), r"dynamic_axes of input_ids are \[\], not \['batch_size', "
                            r"'sequence_length'\]"),
    (dict(task="question-answering"), r"outputs \['logits'\] are not the question-answering "
                                      r"head's \['start_logits', 'end_logits'\]"),
    (dict(inputs={"input_ids": "int64"}), r"inputs \['input_ids'\] are not an MRA model's"),
    (dict(onnx_file="../../etc/hostname"), r"'../../etc/hostname' is not a file name in the export "
                                           r"folder"),
    (dict(sha256={}), "no sha256 for model.onnx"),
])
def test_an_edited_export_json_is_named_corrupt(exports, tmp_path, edit, message):
    folder = shutil.copytree(exports["fill-mask", "portable"], tmp_path / "copy")
    record = json.loads((folder / "export.json").read_text())
    (folder / "export.json").write_text(json.dumps({**record, **edit}))
    with pytest.raises(UserError, match=f"copy/export.json is corrupt \\({message}\\); export "
                                        "the model again"):
        OrtMraModel.from_pretrained(folder)


def test_an_export_json_whose_dtype_is_not_the_graphs_is_refused(exports, tmp_path):
    """Its dtype sets parity's tolerance: fp16's 2e-2 would pass an fp32 graph's 1e-3 errors."""
    folder = shutil.copytree(exports["fill-mask", "portable"], tmp_path / "copy")
    record = json.loads((folder / "export.json").read_text())
    (folder / "export.json").write_text(json.dumps({**record, "dtype": "fp16"}))
    with pytest.raises(UserError, match=r"copy/export.json says dtype fp16, but model.onnx outputs "
                                        r"tensor\(float\); export the model again"):
        OrtMraModel.from_pretrained(folder)


def test_an_export_json_of_another_export_is_refused(exports, tmp_path):
    folder = shutil.copytree(exports["fill-mask", "portable"], tmp_path / "copy")
    shutil.copy(exports["question-answering", "portable"] / "export.json", folder)
    with pytest.raises(UserError, match="copy/export.json does not describe model.onnx \\(its "
                                        "inputs are input_ids, attention_mask; outputs logits\\); "
                                        "export the model again"):
        OrtMraModel.from_pretrained(folder, verify=False)  # the other export's checksums


@pytest.mark.parametrize("name,value", [("max_position_embeddings", 1024),
                                        ("num_attention_heads", 1)])
def test_a_config_json_edited_away_from_the_graph_is_refused(exports, tmp_path, name, value):
    folder = shutil.copytree(exports["fill-mask", "portable"], tmp_path / "copy")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, name: value}))
    with pytest.raises(UserError, match=f"copy/config.json has {name}={value} but the graph was "
                                        f"exported with {config[name]}; restore"):
        OrtMraModel.from_pretrained(folder)


def test_an_onnxruntime_failure_while_running_is_one_line(exports, tmp_path):
    """A vocabulary enlarged in config.json passes the input check; the graph's own fails."""
    folder = shutil.copytree(exports["fill-mask", "portable"], tmp_path / "copy")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 5000}))
    model = OrtMraModel.from_pretrained(folder)
    with pytest.raises(UserError, match=r"^onnxruntime failed to run .*copy/model.onnx: "
                                        r"\[ONNXRuntimeError\].*Gather"):
        model(input_ids=[[4000, 5]])


def test_sessions_made_later_survive_a_change_of_directory(exports, monkeypatch):
    folder = exports["fill-mask", "portable"]
    monkeypatch.chdir(folder.parent)
    model = OrtMraModel.from_pretrained(folder.name)
    monkeypatch.chdir("/")
    arrays = {"input_ids": np.array([[5, 6, 7]]), "attention_mask": np.ones((1, 3), np.int64)}
    assert model.run_raw(arrays, extra_outputs=("attention_context.0",))["logits"].shape[:2] == (1, 3)


def test_a_file_that_is_not_a_library_is_one_line(tmp_path):
    from mra_export.native import MraLibrary

    (tmp_path / "libmra_attention_cpu.so").write_text("not a library")
    with pytest.raises(UserError, match="cannot load .*libmra_attention_cpu.so \\(.*\\); rebuild "
                                        "it with 'make plugins'"):
        MraLibrary(tmp_path / "libmra_attention_cpu.so")


@pytest.mark.parametrize("source", ["int mraNumBlocksPerRow(void) { return 0; }",  # before versions
                                    "int mraInterfaceVersion(void) { return 1; }"])
def test_a_library_of_another_version_is_one_line_naming_make_plugins(tmp_path, monkeypatch, source):
    """A library built before MraAttentionParams.layout reads the struct short and ignores the
    node's layout: its results would be wrong without a word, so every loader refuses it."""
    import subprocess

    from mra_export import native
    from mra_export.engines.plugin_library import register_plugin_library
    from mra_export.runtime.ort import op_library_path

    (tmp_path / "old.c").write_text(source + "\n")
    for name in (native.CPU_LIBRARY, native.ORT_OP_LIBRARY, native.PLUGIN_LIBRARY):
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(tmp_path / name), str(tmp_path / "old.c")],
                       check=True)
    monkeypatch.setenv("MRA_EXPORT_PLUGIN_BUILD", str(tmp_path))
    message = (f"{tmp_path}/%s was built from another version of mra-export \\(its C interface is "
               "version 1, this mra-export's is 2\\); rebuild it with 'make plugins'")
    with pytest.raises(UserError, match=message % native.CPU_LIBRARY):
        native.MraLibrary(tmp_path / native.CPU_LIBRARY)
    with pytest.raises(UserError, match=message % native.ORT_OP_LIBRARY):
        op_library_path()
    with pytest.raises(UserError, match=message % native.PLUGIN_LIBRARY):
        register_plugin_library(None, tmp_path / native.PLUGIN_LIBRARY)  # before TensorRT is asked


def test_the_command_starts_without_torch_and_takes_ctrl_c_while_it_loads(monkeypatch, capsys):
    import subprocess
    import sys

    from mra_export import cli

    loaded = subprocess.run([sys.executable, "-c", "import sys, mra_export.cli; "
                             "print('torch' in sys.modules)"], capture_output=True, text=True)
    assert loaded.stdout.strip() == "False"

    def ctrl_c_while_importing():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_parser", ctrl_c_while_importing)
    assert cli.main(["export", "--help"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


HEAVY_MODULES = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "onnx_ir")
EVERY_HELP = """
import contextlib, io, sys
from mra_export import cli
parser = cli._parser()
for argv in [["--help"], *([command, "--help"] for command in parser.commands), ["export"]]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            cli.main(argv)
        except SystemExit as stop:  # argparse's: 0 after help, 2 after a usage error
            assert stop.code == (2 if argv == ["export"] else 0), (argv, stop.code)
        else:
            raise AssertionError(f"{argv} ran a command instead of stopping in the parser")
print(len(parser.commands), sorted(name for name in sys.argv[1:] if name in sys.modules))
"""


def test_help_and_usage_errors_come_without_torch_or_onnx():
    """`mra-export --help`, each command's help and a missing required argument: none waits
    seconds for torch, transformers or onnx (the parser's choices live in light modules)."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", EVERY_HELP, *HEAVY_MODULES], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "7 []\n"  # the seven commands' help, and no heavy module loaded


def test_ort_model_provider_errors(exports):
    with pytest.raises(UserError, match="CUDAExecutionProvider is not available in this "
                                        "onnxruntime.*pip install -e '\\.\\[gpu\\]' in the mra-export checkout"):
        OrtMraModel.from_pretrained(exports["fill-mask", "portable"],
                                    provider="CUDAExecutionProvider")
    with pytest.raises(UserError, match="is a portable export"):
        ReferencePluginModel.from_pretrained(exports["fill-mask", "portable"])


@pytest.mark.parametrize("node,library", [("cpp", "libmra_attention_cpu"),
                                           ("plugin-emulated", "libmra_attention_plugin_emulated")])
def test_a_reference_node_whose_library_is_not_built_fails_at_load(exports, tmp_path, monkeypatch,
                                                                   node, library):
    from mra_export import native

    monkeypatch.setenv("MRA_EXPORT_PLUGIN_BUILD", str(tmp_path))  # an empty build folder
    for cls, name in ((native.MraLibrary, "cpu"), (native.PluginRunner, "emulated")):
        uncached = getattr(cls, name).__func__.__wrapped__  # past the libraries already loaded
        monkeypatch.setattr(cls, name, classmethod(uncached))
    with pytest.raises(UserError, match=f"{library}.* is not built; run 'make plugins'"):
        ReferencePluginModel.from_pretrained(exports["fill-mask", "plugin"], node=node)


@pytest.mark.parametrize("node", ["bogus", ["torch"], None])
def test_an_unknown_reference_node_is_named(node, exports):
    with pytest.raises(UserError, match=re.escape(f"unknown MraAttention implementation {node!r}; "
                                                  "choose one of: torch, cpp, plugin-emulated")):
        ReferencePluginModel.from_pretrained(exports["fill-mask", "plugin"], node=node)


def test_a_provider_or_folder_of_the_wrong_kind_is_named(exports):
    for provider in (5, ["CPUExecutionProvider", 5], [("CPUExecutionProvider", "options")]):
        with pytest.raises(UserError, match="provider must be an execution provider's name, a "
                                            "\\(name, options\\) pair, or a list of them"):
            OrtMraModel.from_pretrained(exports["fill-mask", "portable"], provider=provider)
    single_pair = OrtMraModel.from_pretrained(exports["fill-mask", "portable"],
                                              provider=("CPUExecutionProvider", {}))
    assert single_pair.providers == ["CPUExecutionProvider"]
    with pytest.raises(UserError, match="pass an export folder \\(made by mra-export export\\), got None"):
        OrtMraModel.from_pretrained(None)

    class PathLike:  # e.g. py.path.local: any os.PathLike is a folder
        def __fspath__(self):
            return str(exports["fill-mask", "portable"])

    assert OrtMraModel.from_pretrained(PathLike()).task == "fill-mask"
    with pytest.raises(TypeError, match="session_options must be an onnxruntime.SessionOptions, "
                                        "got str") as raised:
        OrtMraModel.from_pretrained(exports["fill-mask", "portable"], session_options="x")
    assert isinstance(raised.value, UserError)


@pytest.mark.parametrize("value", ["abc", "-3", "2.5", "\u00b2"])  # "²": a digit to str.isdigit
def test_a_thread_count_onnxruntime_cannot_take_is_one_line(value, monkeypatch):
    monkeypatch.setenv("MRA_EXPORT_ORT_THREADS", value)
    with pytest.raises(UserError, match=f"MRA_EXPORT_ORT_THREADS must be a number of threads "
                                        f"\\(0: one per core\\), got '{re.escape(value)}'"):
        ort_module.default_options()
    monkeypatch.setenv("MRA_EXPORT_ORT_THREADS", " 3 ")
    assert ort_module.default_options().intra_op_num_threads == 3


def test_up_to_four_threads_a_core_are_taken_and_one_more_is_refused(monkeypatch):
    """docs/usage.md: MRA_EXPORT_ORT_THREADS takes "0 to 4 per core"; the other tests use 3 and
    100000, far from that bound."""
    most = 4 * os.cpu_count()
    monkeypatch.setenv("MRA_EXPORT_ORT_THREADS", str(most))
    assert ort_module.default_options().intra_op_num_threads == most
    monkeypatch.setenv("MRA_EXPORT_ORT_THREADS", str(most + 1))
    with pytest.raises(UserError, match=f"set at most {most} "):
        ort_module.default_options()


def test_a_model_given_no_session_options_is_fully_optimised_without_memory_patterns(exports):
    """default_options' contract: every batch and length is a new shape for a model with dynamic
    axes, and onnxruntime (whose default has them on) would plan and keep a memory pattern for
    each."""
    model = OrtMraModel.from_pretrained(exports["fill-mask", "portable"],
                                        provider="CPUExecutionProvider")
    options = model.session.get_session_options()
    assert options.graph_optimization_level == ort_module.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.enable_mem_pattern is False
    assert ort_module.ort.SessionOptions().enable_mem_pattern  # so the line above is no default


@pytest.mark.parametrize("value,problem", [
    ("abc", " must be a number of threads (0: one per core), got 'abc'"),
    ("100000", f"=100000 is more threads than this machine's {os.cpu_count()} cores can use; set "
               f"at most {4 * os.cpu_count()} (0: one per core)"),
])
@pytest.mark.parametrize("command", ["parity", "bench"])
def test_a_bad_thread_count_stops_a_command_before_any_work(value, problem, command, exports,
                                                            small_checkpoints, tmp_path, capsys,
                                                            monkeypatch):
    """Not a failed backend in parity's table (exit 1), nor failed cells in a bench that exits 0:
    a usage error, said first."""
    monkeypatch.setenv("MRA_EXPORT_ORT_THREADS", value)
    arguments = {"parity": ["--model", str(small_checkpoints["fill-mask"]),
                            "--onnx", str(exports["fill-mask", "portable"])],
                 "bench": ["--lengths", "16", "--out", str(tmp_path / "bench")]}[command]
    assert main([command, *arguments]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        f"mra-export {command}: error: MRA_EXPORT_ORT_THREADS{problem}\n")
    assert list(tmp_path.iterdir()) == []


def test_providers_with_options_are_checked_by_name(monkeypatch):
    """parity asks for CUDA as ("CUDAExecutionProvider", {"use_tf32": "0"}), as onnxruntime takes
    it; so does the default, which takes onnxruntime's TensorRT provider only when named."""
    monkeypatch.setattr(ort_module.ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                 "CPUExecutionProvider"])
    cuda = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    assert ort_module.choose_providers(cuda) == cuda
    assert ort_module.choose_providers(None) == cuda  # the default, TF32 off
    monkeypatch.setattr(ort_module.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(UserError, match="TensorrtExecutionProvider is not available"):
        ort_module.choose_providers([("TensorrtExecutionProvider", {}), "CPUExecutionProvider"])


def test_providers_that_would_replay_a_captured_cuda_graph_are_refused(monkeypatch):
    """A captured CUDA graph replays its first run's addresses, and OrtMraModel binds new ones
    at every call: the results would be wrong, silently. Refused, whatever spells "on"."""
    monkeypatch.setattr(ort_module.ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                 "CPUExecutionProvider"])
    for on in ("1", 1, True, "True"):
        with pytest.raises(UserError, match="CUDAExecutionProvider's enable_cuda_graph: "
                                            "OrtMraModel binds new inputs and outputs at every "
                                            "call"):
            ort_module.choose_providers([("CUDAExecutionProvider", {"enable_cuda_graph": on})])
    with pytest.raises(UserError, match="TensorrtExecutionProvider's trt_cuda_graph_enable: "):
        ort_module.choose_providers(("TensorrtExecutionProvider", {"trt_cuda_graph_enable": "1"}))
    off = [("CUDAExecutionProvider", {"enable_cuda_graph": "0", "use_tf32": "0"})]
    assert ort_module.choose_providers(off) == off


def test_a_bfloat16_export_is_refused_on_the_cpu_provider_alone(monkeypatch):
    monkeypatch.setattr(ort_module.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    for provider in (None, "CPUExecutionProvider"):
        with pytest.raises(UserError, match="this export is bfloat16: onnxruntime's CPU provider "
                                            "lacks bfloat16 kernels"):
            ort_module.choose_providers(provider, "bf16")
    monkeypatch.setattr(ort_module.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert ort_module.choose_providers(None, "bf16") == [ort_module.CUDA_FP32, "CPUExecutionProvider"]


def test_export_json_round_trips(exports):
    folder = exports["multiple-choice", "portable"]
    data = json.loads((folder / "export.json").read_text())
    assert data["dynamic_axes"]["input_ids"] == {"0": "batch_size", "1": "num_choices",
                                                 "2": "sequence_length"}
    assert data["dynamic_axes"]["logits"] == {"0": "batch_size", "1": "num_choices"}


def test_bfloat16_outputs_are_cast_to_float32_for_onnxruntime():
    """onnxruntime cannot hand a bfloat16 result to numpy; the cast graph gives its exact float32."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.BFLOAT16)], "bf16_output",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [4])])
    model = onnx_model(graph, {"": 17})
    x = np.array([1.0, 1 / 3, -2.7182817, 65504.25], dtype=np.float32)
    original = ort_module.ort.InferenceSession(model.SerializeToString(),
                                               providers=["CPUExecutionProvider"])
    # onnxruntime 1.20 says "No corresponding Numpy type for Tensor Type."
    with pytest.raises(Exception, match="bfloat16|No corresponding Numpy type"):
        original.run(None, {"x": x})
    ort_module.cast_outputs_to_float32(model.graph)
    session = ort_module.ort.InferenceSession(model.SerializeToString(),
                                              providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["y" + ort_module.AS_FLOAT32]
    (y,) = session.run(None, {"x": x})
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, torch.from_numpy(x).bfloat16().float().numpy())


def test_demo_into_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    assert main(["demo", "--out", str(tmp_path / "a-file")]) == 2
    assert main(["demo", "--out", str(tmp_path / "a-file" / "demo")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [f"mra-export demo: error: {tmp_path / 'a-file'} exists and is not a folder; "
                      "choose another output path",
                      f"mra-export demo: error: cannot write to {tmp_path / 'a-file'}: "
                      f"{tmp_path / 'a-file'} is not a writable folder; choose another output path"]


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_demo_and_bench_refuse_a_folder_of_other_files(tmp_path, capsys, command):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    assert main([command, "--out", str(tmp_path / "mine")]) == 2
    marker = {"demo": "parity.json", "bench": "bench.json"}[command]
    assert capsys.readouterr().err.strip() == (
        f"mra-export {command}: error: {tmp_path / 'mine'} already holds other files (no {marker}: "
        "not an earlier output to replace); choose a new or empty folder")
    assert [p.name for p in tmp_path.rglob("*")] == ["mine", "notes.txt"]


def test_demo_refuses_a_folder_whose_parity_json_is_a_users_report(tmp_path, capsys):
    """parity --report mine/parity.json beside the user's own files: not an earlier demo."""
    mine = tmp_path / "mine"
    (mine / "sst2").mkdir(parents=True)
    (mine / "sst2" / "model.onnx").write_text("a user's export")
    (mine / "parity.json").write_text("{}")
    assert main(["demo", "--out", str(mine)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mra-export demo: error: {mine} holds sst2, which an earlier output of this command does "
        "not (not one to replace); choose a new or empty folder")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "mine", "mine/parity.json", "mine/sst2", "mine/sst2/model.onnx"]


def an_earlier_demo(folder) -> Path:
    """``folder/demo`` as an earlier demo left it: its parity.json reads "old"."""
    earlier = folder / "demo"
    earlier.mkdir()
    (earlier / "parity.json").write_text("old")
    return earlier


def stop_after(monkeypatch, module, step: str) -> None:
    """``module.step`` does its work, then is stopped (Ctrl-C) before its caller goes on."""
    done = getattr(module, step)

    def stopped_after(*args):
        done(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(module, step, stopped_after)


def test_an_output_made_in_place_replaces_the_earlier_one(tmp_path):
    from mra_export.files import folder_filled_in_place

    earlier = an_earlier_demo(tmp_path)
    (earlier / "stale.txt").write_text("from the earlier run")
    with folder_filled_in_place(earlier, "parity.json") as folder:
        assert folder == earlier and [p.name for p in folder.iterdir()] == [".mra-export-writing"]
        (folder / "parity.json").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]
    assert [p.name for p in earlier.iterdir()] == ["parity.json"]
    assert (earlier / "parity.json").read_text() == "new"


def test_a_failed_demo_puts_the_earlier_one_back_and_leaves_nothing_else(tmp_path, monkeypatch):
    from mra_export import demo

    earlier = tmp_path / "demo"
    earlier.mkdir()
    (earlier / "parity.json").write_text("[]")

    def broken_export(*args, **kwargs):
        raise UserError("injected export failure")

    monkeypatch.setattr(demo, "export_model", broken_export)
    with pytest.raises(UserError, match="injected"):
        demo.run_demo(earlier, log=lambda m: None)  # after its checkpoints were written
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")] == [
        "demo", "demo/parity.json"]
    with pytest.raises(UserError, match="injected"):
        demo.run_demo(tmp_path / "new", log=lambda m: None)
    assert not (tmp_path / "new").exists() and no_leftovers(tmp_path) == []


KILLED_WRITER = """
import os, signal, sys
from mra_export import files
how, out = sys.argv[1], sys.argv[2]
def killed(*args):  # no clean-up runs: as the OOM killer or kill -9
    os.kill(os.getpid(), signal.SIGKILL)
if how == "file":  # between writing the temporary file and renaming it
    files.os.replace = killed
    files.atomic_write_text(out, "half")
writer = files.folder_filled_in_place if how == "in-place" else files.staged_folder
with writer(out, "parity.json") as folder:
    (folder / "parity.json").write_text("half")
    killed()
"""


def _killed_while_writing(how, out):
    """``how``: "in-place" (the demo's output), "staged" (export, build, bench) or "file"."""
    import subprocess
    import sys

    process = subprocess.run([sys.executable, "-c", KILLED_WRITER, how, str(out)],
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == -9, process.stderr


@pytest.mark.parametrize("how", ["in-place", "staged"])
def test_a_run_killed_outright_is_undone_by_the_next_one(tmp_path, how):
    """SIGKILL runs no clean-up: the next run for the same output clears what the killed one
    left (its half-made output, its staging folder) and restores the earlier output it had moved
    aside, so a failing next run leaves the earlier output and a passing one replaces it."""
    from mra_export.files import folder_filled_in_place, staged_folder

    writer = folder_filled_in_place if how == "in-place" else staged_folder
    earlier = an_earlier_demo(tmp_path)
    _killed_while_writing(how, earlier)
    hidden = {"in-place": ".demo.previous-", "staged": ".demo.partial-"}[how]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and left[0].startswith(hidden) and left[1] == "demo", left

    with pytest.raises(UserError, match="injected"):
        with writer(earlier, "parity.json"):
            raise UserError("injected")
    assert [p.relative_to(tmp_path).as_posix() for p in sorted(tmp_path.rglob("*"))] == [
        "demo", "demo/parity.json"]
    assert (earlier / "parity.json").read_text() == "old"

    _killed_while_writing(how, earlier)
    with writer(earlier, "parity.json") as folder:
        (folder / "parity.json").write_text("new")
    assert [p.relative_to(tmp_path).as_posix() for p in sorted(tmp_path.rglob("*"))] == [
        "demo", "demo/parity.json"]
    assert (earlier / "parity.json").read_text() == "new"


def test_a_stop_as_the_staging_folder_is_made_leaves_nothing(tmp_path, monkeypatch):
    """A SIGTERM or Ctrl-C (raised between any two bytecodes) just after mkdtemp made the
    staging folder, before staged_folder has its name: CI once caught that window
    (test_a_stopped_export_leaves_nothing, SIGTERM, on a busy machine)."""
    from mra_export import files

    stop_after(monkeypatch, files, "_temporary_folder")
    with pytest.raises(KeyboardInterrupt):
        with files.staged_folder(tmp_path / "out", "parity.json"):
            pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("how,step", [
    ("in-place", "_temporary_folder"),  # the folder the earlier output is moved into, made
    ("in-place", "_move_aside"),  # the earlier output moved there
    ("in-place", "_make_marked"),  # the output made, holding this run's marker
    ("staged", "_temporary_folder"),  # the staging folder made
    ("staged", "_move_aside"),  # the earlier output moved aside, the staging folder not yet in
])
def test_a_stop_between_a_writers_steps_leaves_the_earlier_output(tmp_path, monkeypatch, how,
                                                                   step):
    """A SIGTERM or Ctrl-C may come between any two bytecodes: just after each step that makes
    or moves a folder, before the writer has bound its name, the earlier output is put back at
    once and nothing else is left (not only by the next run)."""
    from mra_export import files

    earlier = an_earlier_demo(tmp_path)
    stop_after(monkeypatch, files, step)
    writer = files.folder_filled_in_place if how == "in-place" else files.staged_folder
    with pytest.raises(KeyboardInterrupt):
        with writer(earlier, "parity.json") as folder:
            (folder / "parity.json").write_text("new")
    assert [p.relative_to(tmp_path).as_posix() for p in sorted(tmp_path.rglob("*"))] == [
        "demo", "demo/parity.json"]
    assert (earlier / "parity.json").read_text() == "old"


def _as_the_next_process_sees_it(monkeypatch):
    """This process taken for dead, as a later command finds a killed one."""
    from mra_export import files

    monkeypatch.setattr(files, "_alive", lambda pid: pid != os.getpid())


def test_a_stop_as_a_finished_demo_removes_the_earlier_one_keeps_the_new_one(tmp_path,
                                                                             monkeypatch):
    """The output is whole before the earlier one is removed: it loses its marker first, so a
    stop (or a kill) during that removal leaves the new output, which no later run undoes."""
    from mra_export import files

    earlier = an_earlier_demo(tmp_path)

    def stopped(out, kind):
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "_remove_own_leftovers", stopped)
    with pytest.raises(KeyboardInterrupt):
        with files.folder_filled_in_place(earlier, "parity.json") as folder:
            (folder / "parity.json").write_text("new")
    assert [p.name for p in earlier.iterdir()] == ["parity.json"]
    assert (earlier / "parity.json").read_text() == "new"
    monkeypatch.undo()
    _as_the_next_process_sees_it(monkeypatch)
    with files.folder_filled_in_place(earlier, "parity.json") as folder:
        (folder / "parity.json").write_text("newer")
    assert [p.relative_to(tmp_path).as_posix() for p in sorted(tmp_path.rglob("*"))] == [
        "demo", "demo/parity.json"]
    assert (earlier / "parity.json").read_text() == "newer"


def test_a_kill_during_a_failed_demos_clean_up_keeps_the_earlier_one(tmp_path, monkeypatch):
    """The clean-up renames the half-made output away whole and puts the earlier one back before
    removing anything: killed while removing (rmtree goes in the file system's order, so the
    marker may go first), the earlier output is in place and the next run clears the rest."""
    from mra_export import files

    earlier = an_earlier_demo(tmp_path)

    def killed_halfway(path):
        (path / files.WRITING).unlink(missing_ok=True)
        raise SystemExit("killed")

    monkeypatch.setattr(files, "_remove", killed_halfway)
    with pytest.raises(SystemExit):
        with files.folder_filled_in_place(earlier, "parity.json") as folder:
            (folder / "half.bin").write_text("half")
            raise UserError("the demo failed")
    assert (earlier / "parity.json").read_text() == "old"
    monkeypatch.undo()
    _as_the_next_process_sees_it(monkeypatch)
    with pytest.raises(UserError, match="again"):
        with files.folder_filled_in_place(earlier, "parity.json"):
            raise UserError("failed again")
    assert [p.relative_to(tmp_path).as_posix() for p in sorted(tmp_path.rglob("*"))] == [
        "demo", "demo/parity.json"]
    assert (earlier / "parity.json").read_text() == "old"


def test_a_killed_first_run_leaves_nothing_after_the_next(tmp_path):
    from mra_export.files import folder_filled_in_place

    _killed_while_writing("in-place", tmp_path / "demo")
    assert (tmp_path / "demo" / ".mra-export-writing").is_file()  # the remains, marked
    with folder_filled_in_place(tmp_path / "demo", "parity.json") as folder:
        (folder / "parity.json").write_text("new")
    assert [p.relative_to(tmp_path).as_posix() for p in sorted(tmp_path.rglob("*"))] == [
        "demo", "demo/parity.json"]


def test_an_output_being_filled_by_a_live_run_is_refused(tmp_path):
    from mra_export.files import folder_filled_in_place

    with folder_filled_in_place(tmp_path / "demo", "parity.json"):
        with pytest.raises(UserError) as refused:
            with folder_filled_in_place(tmp_path / "demo", "parity.json"):
                pass
        assert str(refused.value) == (
            f"{tmp_path / 'demo'} is being written by another mra-export (process {os.getpid()}); "
            "wait for it to finish or choose another output path")
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_a_live_runs_staging_folder_is_left_alone_by_a_run_beside_it(tmp_path):
    """A run clears what killed runs left beside its output, not the staging folder of a run
    still filling it (here this process, alive): that run's output must still arrive whole."""
    from mra_export.files import staged_folder

    with staged_folder(tmp_path / "out", "export.json") as first:
        (first / "export.json").write_text("first")
        with staged_folder(tmp_path / "out", "export.json") as second:
            (second / "export.json").write_text("second")
        assert (first / "export.json").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (tmp_path / "out" / "export.json").read_text() == "first"


def test_a_report_write_killed_outright_leaves_no_temporary_file_after_the_next(tmp_path):
    _killed_while_writing("file", tmp_path / "report.json")
    assert len(list(tmp_path.iterdir())) == 1 and not (tmp_path / "report.json").exists()
    from mra_export.files import atomic_write_text

    atomic_write_text(tmp_path / "report.json", "{}")
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_graph_that_differs_from_pytorch_is_refused_and_leaves_nothing(small_checkpoints,
                                                                         tmp_path, monkeypatch):
    """The export's own check on onnxruntime: here onnxruntime is made to answer 1e-3 off."""
    import onnxruntime

    class OffSession(onnxruntime.InferenceSession):
        def run(self, *args, **kwargs):
            return [value + np.float32(1e-3) for value in super().run(*args, **kwargs)]

    monkeypatch.setattr(onnxruntime, "InferenceSession", OffSession)
    with pytest.raises(UserError, match=r"^the exported model differs from PyTorch by 0\.001 "
                                        r"\(tolerance 0\.0001\) on onnxruntime; please report"):
        export_model(small_checkpoints["text-classification"], tmp_path / "out",
                     log=lambda m: None)
    assert no_leftovers(tmp_path) == []
