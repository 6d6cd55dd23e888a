"""Engine specs, manifests and refusals, and the TensorRT-absent paths (no TensorRT needed).

The TensorRT build itself is replaced by an injected builder here; tests/test_tensorrt_engines.py
builds real engines where TensorRT and a GPU are present.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from mra_export.cli import main
from mra_export.engines import build as build_module
from mra_export.engines import plugin_library as plugin_library_module
from mra_export.engines.manifest import EngineManifest, SystemInfo
from mra_export.engines.plugin_library import register_plugin_library
from mra_export.engines.spec import load_spec_file, parse_shapes, resolve_spec
from mra_export.errors import MissingTensorRT, UserError
from mra_export.export.info import ExportInfo

H200 = SystemInfo("10.8.0.43", "NVIDIA H200", "9.0")
NO_TENSORRT = importlib.util.find_spec("tensorrt") is None


@pytest.fixture
def plugin_library(tmp_path):
    path = tmp_path / "libmra_attention_plugin.so"
    path.write_bytes(b"a plugin build")
    return path


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """Pretend to run on an H200 with TensorRT 10.8 (the build is injected by each test)."""
    monkeypatch.setattr(build_module, "current_system", lambda what="": H200)
    return H200


def fake_builder(spec, info, precision, profile, system):
    return f"engine:{precision}:{sorted(profile)}".encode()


def build(exports, tmp_path, plugin_library, **flags):
    spec = resolve_spec(onnx=str(exports["question-answering", "plugin"]), plugin=str(plugin_library),
                        out=str(tmp_path / "engine"), **flags)
    return build_module.build_engine(spec, command="test", log=lambda m: None, builder=fake_builder)


# --- specs ---------------------------------------------------------------------------------------

def test_shapes_flag():
    assert parse_shapes("batch=1/4/8,sequence=1/128/512") == {"batch": (1, 4, 8),
                                                              "sequence": (1, 128, 512)}
    for bad, message in [("batch=1/4", "cannot read"), ("width=1/2/3", "cannot read"),
                         ("batch=4/2/8", "1 <= MIN <= OPT <= MAX"), ("batch=0/1/2", "1 <= MIN")]:
        with pytest.raises(UserError, match=message):
            parse_shapes(bad)


def test_spec_file_and_flag_overrides(tmp_path):
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"onnx": "a/model.onnx", "out": "engines/a", "precision": "fp16",
                                     "shapes": {"batch": [1, 2, 4]}, "workspace_mb": 512}))
    spec = resolve_spec(spec_file, precision="fp32", shapes="sequence=1/64/256")
    assert spec.precision == "fp32" and spec.workspace_mb == 512
    assert spec.shapes == {"batch": (1, 2, 4), "sequence": (1, 64, 256)}
    assert str(spec.out) == "engines/a" and spec.plugin.name == "libmra_attention_plugin.so"


def test_flags_replace_a_specs_bad_values_instead_of_failing_on_them(tmp_path):
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"onnx": 5, "out": "engines/a", "precision": "int8",
                                     "attention_outputs": "yes", "workspace_mb": -1,
                                     "shapes": {"batch": [1, 2, 4], "sequence": [9, 1, 1]}}))
    with pytest.raises(UserError, match="sequence needs 1 <= MIN <= OPT <= MAX, got 9/1/1"):
        resolve_spec(spec_file, onnx="b/model.onnx", precision="fp16", attention_outputs=True,
                     workspace_mb=64)
    spec = resolve_spec(spec_file, onnx="b/model.onnx", precision="fp16", attention_outputs=True,
                        workspace_mb=64, shapes="sequence=1/64/256")
    assert (str(spec.onnx), spec.precision, spec.attention_outputs, spec.workspace_mb) == (
        "b/model.onnx", "fp16", True, 64)
    assert spec.shapes == {"batch": (1, 2, 4), "sequence": (1, 64, 256)}
    with pytest.raises(UserError, match="onnx must be a string, got 5"):  # not overridden
        resolve_spec(spec_file, shapes="sequence=1/64/256")


@pytest.mark.parametrize("content,message", [
    ("{oops", "is not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"onnx": "x", "speed": 1}', "unknown key speed"),
    ('{"onnx": "x", "shapes": {"batch": [1, 2]}}', r"batch must be \[MIN, OPT, MAX\]"),
    ('{"onnx": "x", "shapes": {"height": [1, 2, 3]}}', "unknown axis 'height'"),
    ('{"onnx": "x", "shapes": [1, 2, 3]}', "shapes must be an object"),
    ('{"onnx": 5, "out": "y"}', "onnx must be a string, got 5"),
    ('{"onnx": "x", "plugin": null}', "plugin must be a string, got null"),
    ('{"onnx": "x", "attention_outputs": "yes"}', 'attention_outputs must be true or false, got "yes"'),
    ('{"onnx": "x", "shapes": {"batch": [true, true, true]}}', r"batch must be \[MIN, OPT, MAX\] "
                                                              "integers, got"),
    ("\udcff", "is not valid JSON"),  # not text at all
])
def test_bad_spec_files(tmp_path, content, message):
    spec_file = tmp_path / "spec.json"
    spec_file.write_bytes(content.encode(errors="surrogateescape"))
    with pytest.raises(UserError, match=message):
        load_spec_file(spec_file)


def test_incomplete_or_invalid_specs(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_spec_file(tmp_path / "missing.json")
    with pytest.raises(UserError, match="is a folder; pass a spec file"):
        load_spec_file(tmp_path)
    with pytest.raises(UserError, match="workspace must be a positive number of MB, got True"):
        resolve_spec(onnx="x.onnx", out="y", workspace_mb=True)
    for none in (0, -1):  # 0 MB is no workspace, not "no limit"
        with pytest.raises(UserError, match=f"workspace must be a positive number of MB, "
                                            f"got {none}"):
            resolve_spec(onnx="x.onnx", out="y", workspace_mb=none)
    with pytest.raises(UserError, match="--shapes: batch is given twice; give each axis once"):
        parse_shapes("batch=1/1/1,batch=2/2/2")
    with pytest.raises(UserError, match="nothing to build"):
        resolve_spec(out="x")
    with pytest.raises(UserError, match="pass --out"):
        resolve_spec(onnx="x.onnx")
    with pytest.raises(UserError, match="precision must be one of fp32, fp16, bf16"):
        resolve_spec(onnx="x.onnx", out="y", precision="int8")


def test_profile_is_bounded_by_max_position_embeddings(exports):
    info = ExportInfo.load(exports["multiple-choice", "plugin"])
    spec = resolve_spec(onnx="x.onnx", out="y", shapes="batch=1/2/4,sequence=8/64/256")
    profile = spec.profile(info)
    assert profile["input_ids"] == ((1, 1, 8), (2, 2, 64), (4, 4, 256))  # batch, choices, seq
    with pytest.raises(UserError, match="sequence max 300 is past the model's "
                                        "max_position_embeddings=256"):
        resolve_spec(onnx="x.onnx", out="y", shapes="sequence=1/64/300").profile(info)


def test_the_default_profile_is_the_documented_one(exports):
    """engines/README.md: batch 1/1/8, sequence 1/128/max_position_embeddings, choices 1/2/4."""
    spec = resolve_spec(onnx="x.onnx", out="y")
    qa, choices = (ExportInfo.load(exports[task, "plugin"])
                   for task in ("question-answering", "multiple-choice"))
    limit = qa.max_sequence_length
    assert spec.profile(qa)["input_ids"] == ((1, 1), (1, 128), (8, limit))
    assert spec.profile(choices)["input_ids"] == (
        (1, 1, 1), (1, 2, 128), (8, 4, limit))  # batch, choices, sequence


# --- building (TensorRT injected) ----------------------------------------------------------------

def test_build_writes_engine_manifest_and_model_files(exports, tmp_path, plugin_library, fake_tensorrt):
    manifest = build(exports, tmp_path, plugin_library, shapes="batch=1/2/4")
    folder = tmp_path / "engine"
    assert (folder / "model.plan").read_bytes().startswith(b"engine:fp32")
    assert {"config.json", "tokenizer.json", "manifest.json"} <= {p.name for p in folder.iterdir()}
    saved = EngineManifest.load(folder)
    assert saved == manifest
    assert saved.tensorrt_version == "10.8.0.43" and saved.compute_capability == "9.0"
    assert saved.gpu_name == "NVIDIA H200" and saved.precision == "fp32"
    assert saved.profiles == [{name: {"min": [1, 1], "opt": [2, 128], "max": [4, 256]}
                               for name in ("input_ids", "attention_mask")}]
    assert set(saved.sha256) == {"onnx", "plugin", "engine"}
    assert saved.export["task"] == "question-answering" and saved.export["flavour"] == "plugin"
    assert saved.refusal(H200, folder) is None


def test_tensorrt_10_lowers_an_fp32_export_but_11_needs_the_types_in_the_onnx(
        exports, tmp_path, plugin_library, monkeypatch):
    monkeypatch.setattr(build_module, "current_system", lambda what="": H200)
    assert build(exports, tmp_path, plugin_library, precision="fp16").precision == "fp16"
    monkeypatch.setattr(build_module, "current_system",
                        lambda what="": SystemInfo("11.1.0", "NVIDIA H200", "9.0"))
    with pytest.raises(UserError, match="a fp16 engine needs a fp16 export here: TensorRT 11.1.0 "
                                        "builds the ONNX's own types.*--dtype fp16"):
        build(exports, tmp_path / "second", plugin_library, precision="fp16")


def test_a_failed_build_leaves_no_engine_folder(exports, tmp_path, plugin_library, fake_tensorrt):
    def crashing_builder(spec, *args):
        (spec.out.parent / "debris").write_text("")  # whatever a build might leave around ...
        raise UserError("TensorRT could not build the engine: injected")

    spec = resolve_spec(onnx=str(exports["fill-mask", "plugin"]), plugin=str(plugin_library),
                        out=str(tmp_path / "engine"))
    with pytest.raises(UserError, match="injected"):
        build_module.build_engine(spec, log=lambda m: None, builder=crashing_builder)
    assert not (tmp_path / "engine").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_a_build_into_the_folder_holding_its_export_is_refused(exports, tmp_path, plugin_library,
                                                                fake_tensorrt):
    build(exports, tmp_path, plugin_library)
    inside = shutil.copytree(exports["question-answering", "plugin"], tmp_path / "engine" / "onnx")
    spec = resolve_spec(onnx=str(inside), plugin=str(plugin_library), out=str(tmp_path / "engine"))
    with pytest.raises(UserError, match="engine/onnx is inside .*engine, which this command would "
                                        "replace"):
        build_module.build_engine(spec, log=lambda m: None, builder=fake_builder)
    assert (inside / "model.onnx").is_file()


@pytest.mark.parametrize("given", ["folder", "model.onnx"])
def test_a_build_into_the_export_it_reads_is_refused(given, exports, tmp_path, plugin_library,
                                                     fake_tensorrt):
    """A re-export would delete the engine with the rest of its export folder; the README's
    form names the export's model.onnx."""
    export = shutil.copytree(exports["question-answering", "plugin"], tmp_path / "export")
    onnx = export if given == "folder" else export / "model.onnx"
    spec = resolve_spec(onnx=str(onnx), plugin=str(plugin_library), out=str(export / "engine"))
    with pytest.raises(UserError, match=f"engine is inside {export}, which the command that made "
                                        "it replaces whole when run again"):
        build_module.build_engine(spec, log=lambda m: None, builder=fake_builder)
    assert not (export / "engine").exists()


def test_a_build_replaces_only_an_earlier_engine(exports, tmp_path, plugin_library, fake_tensorrt):
    build(exports, tmp_path, plugin_library)
    build(exports, tmp_path, plugin_library, precision="fp32")  # an engine folder: replaced
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "notes.txt").write_text("keep me")
    spec = resolve_spec(onnx=str(exports["question-answering", "plugin"]), plugin=str(plugin_library),
                        out=str(tmp_path / "elsewhere"))
    with pytest.raises(UserError, match="already holds other files \\(no manifest.json"):
        build_module.build_engine(spec, log=lambda m: None, builder=fake_builder)
    assert [p.name for p in (tmp_path / "elsewhere").iterdir()] == ["notes.txt"]


def test_build_refuses_portable_exports_and_missing_plugins(exports, tmp_path, plugin_library,
                                                           fake_tensorrt):
    spec = resolve_spec(onnx=str(exports["fill-mask", "portable"]), plugin=str(plugin_library),
                        out=str(tmp_path / "engine"))
    with pytest.raises(UserError, match="is a portable export; TensorRT engines are built from "
                                        "plugin-flavour exports"):
        build_module.build_engine(spec, builder=fake_builder)
    spec = resolve_spec(onnx=str(exports["fill-mask", "plugin"]), plugin=str(tmp_path / "none.so"),
                        out=str(tmp_path / "engine"))
    with pytest.raises(UserError, match="plugin library .*none.so not found; build it with 'make "
                                        "plugins TensorRT_ROOT"):
        build_module.build_engine(spec, builder=fake_builder)


def test_build_refuses_an_earlier_plugin_export_of_a_head_dim_the_kernels_lack(
        exports, tmp_path, plugin_library, fake_tensorrt):
    """Exports made before the exporter checked head_dim: refused before TensorRT parses them."""
    folder = tmp_path / "export"
    shutil.copytree(exports["fill-mask", "plugin"], folder)
    record = json.loads((folder / "export.json").read_text())
    record["attention"]["head_dim"] = 48
    (folder / "export.json").write_text(json.dumps(record))
    spec = resolve_spec(onnx=str(folder), plugin=str(plugin_library), out=str(tmp_path / "engine"))
    with pytest.raises(UserError, match="head_dim 32, 64 or 128 .* this model's is 48"):
        build_module.build_engine(spec, builder=fake_builder)
    assert not (tmp_path / "engine").exists()


# --- registering the plugin library with TensorRT ------------------------------------------------

class FakeRegistry:
    """TensorRT's plugin registry as far as loading libraries goes: ``load_library`` returns a
    handle, or None as TensorRT does when the library cannot be loaded or registered."""

    def __init__(self, handle="handle"):
        self.loaded, self.handle = [], handle

    def load_library(self, path):
        self.loaded.append(path)
        return self.handle


def fake_tensorrt_module(registry):
    return types.SimpleNamespace(get_plugin_registry=lambda: registry)


@pytest.fixture
def fresh_registrations(monkeypatch):
    monkeypatch.setattr(plugin_library_module, "_loaded", {})


def test_the_plugin_library_is_loaded_into_the_registry_once_per_process(plugin_library,
                                                                         fresh_registrations):
    registry = FakeRegistry()
    register_plugin_library(fake_tensorrt_module(registry), plugin_library)
    register_plugin_library(fake_tensorrt_module(registry), str(plugin_library))
    # TensorRT refuses a second load of registered creators, so the second call must not make one.
    assert registry.loaded == [str(plugin_library.resolve())]


def test_a_plugin_library_tensorrt_cannot_load_is_one_line(plugin_library, tmp_path,
                                                           fresh_registrations):
    with pytest.raises(UserError, match=r"TensorRT could not load the plugin library .*"
                                        r"libmra_attention_plugin.so .*make plugins"):
        register_plugin_library(fake_tensorrt_module(FakeRegistry(handle=None)), plugin_library)
    with pytest.raises(UserError, match="plugin library .*none.so not found"):
        register_plugin_library(fake_tensorrt_module(FakeRegistry()), tmp_path / "none.so")


def test_the_build_registers_the_plugin_before_parsing_a_network_of_the_exports_types(
        exports, tmp_path, plugin_library, fresh_registrations, monkeypatch):
    """The parser finds MraAttention only in the registry: opening the library is not enough.
    The network keeps the export's types (strongly typed) unless TensorRT 10's flags lower it."""
    from polygraphy.backend import trt as polygraphy_trt

    registry = FakeRegistry()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt_module(registry))
    registered_when_parsed = []

    class ParserReached(Exception):
        pass

    def network_from_onnx_path(path, strongly_typed=False):
        registered_when_parsed.append((list(registry.loaded), strongly_typed))
        raise ParserReached

    monkeypatch.setattr(polygraphy_trt, "NetworkFromOnnxPath", network_from_onnx_path)
    spec = resolve_spec(onnx=str(exports["fill-mask", "plugin"]), plugin=str(plugin_library),
                        out=str(tmp_path / "engine"))
    info = ExportInfo.load(spec.export_folder)
    for precision in ("fp32", "fp16"):  # the export's own type; lowered by TensorRT 10's flags
        with pytest.raises(ParserReached):
            build_module.build_serialized_engine(spec, info, precision, spec.profile(info), H200)
    library = [str(plugin_library.resolve())]
    assert registered_when_parsed == [(library, True), (library, False)]


@pytest.mark.parametrize("export_dtype,precision,flags", [
    ("fp32", "fp32", (False, False)), ("fp32", "fp16", (True, False)),
    ("fp32", "bf16", (False, True)), ("fp16", "fp16", (False, False)),
    ("bf16", "bf16", (False, False))])
def test_precision_flags_go_only_to_a_network_lowered_from_fp32(
        exports, tmp_path, plugin_library, fresh_registrations, monkeypatch, export_dtype,
        precision, flags):
    """TensorRT refuses fp16/bf16 builder flags on a strongly typed network: they belong to an
    fp32 export lowered by TensorRT 10, never to an export already in the engine's type."""
    from polygraphy.backend import trt as polygraphy_trt

    class ConfigReached(Exception):
        pass

    def create_config(**options):
        seen.append((options["fp16"], options["bf16"]))
        raise ConfigReached

    seen = []
    tensorrt = types.SimpleNamespace(get_plugin_registry=lambda: FakeRegistry(),
                                     IProgressMonitor=object)
    monkeypatch.setitem(sys.modules, "tensorrt", tensorrt)
    monkeypatch.setattr(polygraphy_trt, "NetworkFromOnnxPath", lambda path, strongly_typed: path)
    monkeypatch.setattr(polygraphy_trt, "CreateConfig", create_config)
    spec = resolve_spec(onnx=str(exports["fill-mask", "plugin"]), plugin=str(plugin_library),
                        out=str(tmp_path / "engine"))
    info = dataclasses.replace(ExportInfo.load(spec.export_folder), dtype=export_dtype)
    with pytest.raises(ConfigReached):
        build_module.build_serialized_engine(spec, info, precision, spec.profile(info), H200)
    assert seen == [flags]


# --- refusing engines that do not fit ------------------------------------------------------------

@pytest.fixture
def built_engine(exports, tmp_path, plugin_library, fake_tensorrt):
    build(exports, tmp_path, plugin_library)
    return tmp_path / "engine"


@pytest.mark.parametrize("system,message", [
    (SystemInfo("10.9.0.34", "NVIDIA H200", "9.0"),
     "built with TensorRT 10.8.0.43, this machine has 10.9.0.34"),
    (SystemInfo("10.8.0.43", "NVIDIA L40S", "8.9"),
     r"built for compute capability 9.0 \(NVIDIA H200\), this GPU is 8.9 \(NVIDIA L40S\)"),
])
def test_refused_on_another_tensorrt_or_gpu(built_engine, system, message):
    refusal = EngineManifest.load(built_engine).refusal(system, built_engine)
    assert refusal is not None and "\n" not in refusal
    assert refusal.startswith(f"cannot use the engine in {built_engine}:")
    assert __import__("re").search(message, refusal)
    assert "Rebuild it on this machine: mra-export build --onnx" in refusal


def test_refused_on_a_gpu_of_the_same_major_but_another_minor_capability(built_engine):
    """An engine holds kernels for one SM version: an A10's (8.6) does not fit an L40S (8.9)."""
    manifest = dataclasses.replace(EngineManifest.load(built_engine), compute_capability="8.6",
                                   gpu_name="NVIDIA A10")
    refusal = manifest.refusal(SystemInfo("10.8.0.43", "NVIDIA L40S", "8.9"), built_engine)
    assert refusal is not None and ("built for compute capability 8.6 (NVIDIA A10), this GPU is "
                                    "8.9 (NVIDIA L40S)") in refusal


def test_the_rebuild_command_builds_the_same_engine(exports, tmp_path, plugin_library, fake_tensorrt,
                                                   monkeypatch):
    """The command a refusal prints, run as given, builds the same profile, precision and outputs."""
    spec = resolve_spec(onnx=str(exports["multiple-choice", "plugin"]), plugin=str(plugin_library),
                        out=str(tmp_path / "my engines" / "engine"),  # a space: the command quotes it
                        shapes="batch=1/2/4,choices=2/2/3,sequence=8/64/256", attention_outputs=True)
    manifest = build_module.build_engine(spec, log=lambda m: None, builder=fake_builder)
    refusal = manifest.refusal(SystemInfo("10.9.0.34", "NVIDIA H200", "9.0"), spec.out)
    command = shlex.split(refusal.split("Rebuild it on this machine: ")[1])
    assert command[:2] == ["mra-export", "build"] and command[-2:] == ["--out", str(spec.out)]

    rebuilt = {}
    monkeypatch.setattr(build_module, "build_engine", lambda spec, command: rebuilt.setdefault("spec", spec))
    assert main(command[1:]) == 0
    assert rebuilt["spec"].precision == manifest.precision and rebuilt["spec"].attention_outputs
    info = ExportInfo.load(spec.export_folder)
    assert rebuilt["spec"].profile(info) == spec.profile(info)
    assert manifest.shapes_flag() == "batch=1/2/4,choices=2/2/3,sequence=8/64/256"


def test_parity_refuses_an_engine_for_another_machine_before_any_work(built_engine, monkeypatch,
                                                                     capsys):
    from mra_export import parity
    from mra_export.engines import system

    monkeypatch.setattr(parity, "tensorrt_available", lambda: True)
    monkeypatch.setattr(system, "current_system",
                        lambda what="": SystemInfo("10.8.0.43", "NVIDIA L40S", "8.9"))
    code = main(["parity", "--model", "not-loaded", "--engine", str(built_engine)])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.count("\n") == 1
    assert f"cannot use the engine in {built_engine}: it was built for compute capability 9.0" in captured.err


def test_refused_when_the_plugin_or_engine_changed(built_engine, plugin_library):
    manifest = EngineManifest.load(built_engine)
    plugin_library.write_bytes(b"another plugin build")
    assert "plugin library" in manifest.refusal(H200, built_engine)
    assert "changed since the build" in manifest.refusal(H200, built_engine)
    plugin_library.unlink()
    assert "is missing" in manifest.refusal(H200, built_engine)
    (built_engine / "model.plan").write_bytes(b"corrupt")
    assert "does not match its recorded sha256" in manifest.refusal(H200, built_engine)


class ReusingRunner:
    """Polygraphy's TrtRunner as far as results go: torch outputs (bfloat16 here, as a bf16
    engine gives them) in one host buffer per output, overwritten by the next call."""

    dtype = torch.bfloat16

    def __init__(self, engine, name):
        self.buffers, self.storage, self.is_active = {}, {}, False

    def activate(self):
        self.is_active = True

    def deactivate(self):
        self.is_active = False

    def infer(self, feed_dict):
        ids = feed_dict["input_ids"]
        assert isinstance(ids, torch.Tensor)  # so that Polygraphy returns torch outputs
        for name in ("start_logits", "end_logits"):  # a larger result gets a larger buffer
            if len(self.storage.get(name, ())) < ids.numel():
                self.storage[name] = torch.empty(max(ids.numel(), 4096), dtype=self.dtype)
            self.buffers[name] = self.storage[name][:ids.numel()].view(ids.shape).copy_(ids / 3)
        return self.buffers


class ReusingFloat32Runner(ReusingRunner):
    """The same with float32 outputs (an fp32 or fp16 engine's), which need no widening."""

    dtype = torch.float32


@pytest.mark.parametrize("runner", [ReusingRunner, ReusingFloat32Runner])
def test_engine_results_are_copied_out_of_the_runners_buffers(built_engine, monkeypatch, runner):
    from polygraphy.backend import trt as polygraphy_trt

    from mra_export.runtime.trt import TrtMraModel

    monkeypatch.setattr(polygraphy_trt, "TrtRunner", runner)
    manifest = EngineManifest.load(built_engine)
    model = TrtMraModel(ExportInfo(**manifest.export), None, built_engine, manifest, engine=None)
    first_ids = np.array([[5, 6, 7]], dtype=np.int64)
    first = model.run_raw({"input_ids": first_ids, "attention_mask": np.ones_like(first_ids)})
    second_ids = np.array([[1, 2, 3, 4]], dtype=np.int64)
    model.run_raw({"input_ids": second_ids, "attention_mask": np.ones_like(second_ids)})
    expected = torch.from_numpy(first_ids / 3).to(runner.dtype).float().numpy()
    for name in ("start_logits", "end_logits"):
        assert first[name].dtype == np.float32  # bfloat16 widened: numpy has no bfloat16
        np.testing.assert_array_equal(first[name], expected)  # not the second call's values
    model.close()
    assert not model.runner.is_active


def test_inputs_at_the_profiles_bounds_run_and_one_past_them_is_refused(built_engine, monkeypatch):
    """TensorRT's profile ranges are inclusive: its min and max shapes run; one more is refused
    before the runner sees it."""
    from polygraphy.backend import trt as polygraphy_trt

    from mra_export.errors import InputError
    from mra_export.runtime.trt import TrtMraModel

    monkeypatch.setattr(polygraphy_trt, "TrtRunner", ReusingRunner)
    manifest = EngineManifest.load(built_engine)
    model = TrtMraModel(ExportInfo(**manifest.export), None, built_engine, manifest, engine=None)
    bounds = manifest.profiles[0]["input_ids"]
    for batch, length in (bounds["min"], bounds["max"]):
        ids = np.ones((batch, length), dtype=np.int64)
        outputs = model.run_raw({"input_ids": ids, "attention_mask": ids})
        assert outputs["end_logits"].shape == ids.shape
    batch, length = bounds["max"]
    for past in ((batch + 1, length), (batch, length + 1)):
        ids = np.ones(past, dtype=np.int64)
        with pytest.raises(InputError, match="outside this engine's profile"):
            model.run_raw({"input_ids": ids, "attention_mask": ids})
    model.close()


def test_corrupt_or_missing_manifest(tmp_path):
    with pytest.raises(UserError, match="has no manifest.json"):
        EngineManifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(UserError, match="manifest.json is corrupt"):
        EngineManifest.load(tmp_path)


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["sha256"].pop("plugin"), "no sha256 for the plugin"),
    (lambda m: m.update(profiles=[]), "profiles must be one profile of min, opt and max shapes"),
    (lambda m: m.update(profiles=m["profiles"] * 2),  # the engine has one; which would run?
     "profiles must be one profile of min, opt and max shapes"),
    (lambda m: m.update(export={}), "its export record: .*missing 16 required"),
    (lambda m: m["export"].update(task="fill-mask"), r"its export record: outputs \['start_logits', "
                                                     r"'end_logits'\] are not the fill-mask head's"),
    (lambda m: m.update(plugin_library=None), "plugin_library is null, not str"),
    (lambda m: m.update(compute_capability=9.0), "compute_capability is 9.0, not str"),
    (lambda m: m.update(engine_file="../model.plan"), "'../model.plan' is not a file name"),
])
def test_an_edited_manifest_is_named_corrupt(built_engine, edit, message):
    record = json.loads((built_engine / "manifest.json").read_text())
    edit(record)
    (built_engine / "manifest.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=f"engine/manifest.json is corrupt \\({message}.*\\); "
                                        "rebuild the engine"):
        EngineManifest.load(built_engine)


# --- where TensorRT is absent (as on CI) ---------------------------------------------------------

@pytest.mark.skipif(not NO_TENSORRT, reason="TensorRT is installed here")
@pytest.mark.parametrize("argv", [
    ["build", "--onnx", "x/model.onnx", "--out", "{tmp}/engine"],
    ["build", "--spec", "engines/specs/default-question-answering-fp16.json", "--out", "{tmp}/engine"],
    ["parity", "--model", "x", "--onnx", "y", "--engine", "{tmp}/engine"],
])
def test_tensorrt_commands_fail_fast_in_one_line(argv, tmp_path, capsys):
    code = main([part.format(tmp=tmp_path) for part in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "needs TensorRT, which is not installed here" in err
    assert "pip install -e '.[gpu]' in the mra-export checkout" in err
    assert not (tmp_path / "engine").exists()


@pytest.mark.skipif(not NO_TENSORRT, reason="TensorRT is installed here")
def test_trt_model_says_tensorrt_is_missing(tmp_path):
    from mra_export.runtime.trt import TrtMraModel

    with pytest.raises(MissingTensorRT, match="TrtMraModel needs TensorRT"):
        TrtMraModel.from_engine(tmp_path)


def test_version(capsys):
    from mra_export import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"mra-export {__version__}\n"


@pytest.mark.parametrize("command", ["build", "parity", "export", "demo", "bench"])
def test_help_works_everywhere(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: mra-export" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["export", "--model", "m", "--out", "o", "--opset", "abc"],
     "mra-export export: error: argument --opset: invalid int value: 'abc'; see 'mra-export export --help'"),
    (["build", "--precision", "int8"], "mra-export build: error: argument --precision: invalid choice: 'int8'"),
    (["bogus"], "mra-export: error: argument COMMAND: invalid choice: 'bogus'"),
    ([], "mra-export: error: the following arguments are required: COMMAND; see 'mra-export --help'"),
    (["parity", "--model", "m", "--onnx", "o", "--seed", "1"],
     "mra-export parity: error: unrecognized arguments: --seed 1; see 'mra-export parity --help'"),
    (["--verbose", "bench"], "mra-export: error: unrecognized arguments: --verbose; see "
                             "'mra-export --help'"),
])
def test_bad_options_are_one_line_without_argparses_usage_block(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(message), error


def test_python_m_mra_export_is_the_command_without_installing(tmp_path):
    """As on a lent GPU machine: the checkout on PYTHONPATH, run from elsewhere."""
    checkout = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-m", "mra_export", "bench", "--lengths", "0"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(checkout)})
    assert result.returncode == 2
    assert result.stderr.strip() == "mra-export bench: error: --lengths must be within 1..4096, got 0"


def test_a_tensorrt_package_that_does_not_load_is_one_line(monkeypatch):
    """As PyPI's tensorrt stub does on a machine without NVIDIA's libraries."""
    from mra_export.engines import availability

    class BrokenFinder:
        def find_spec(self, name, path=None, target=None):
            if name != "tensorrt":
                return None
            return importlib.util.spec_from_loader(name, BrokenLoader())

    class BrokenLoader:
        def create_module(self, spec):
            raise OSError("libnvinfer.so.10: cannot open shared object file: No such file or "
                          "directory\nsecond line")

        def exec_module(self, module):
            pass

    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr(sys, "meta_path", [BrokenFinder(), *sys.meta_path])
    with pytest.raises(UserError, match=r"^mra-export build needs TensorRT, whose Python package "
                                        r"is installed but does not load \(libnvinfer.so.10: "
                                        r"cannot open shared object file: No such file or "
                                        r"directory\); reinstall it .*pip install -e '\.\[gpu\]' in the "
                                        r"mra-export checkout$"):
        availability.require_tensorrt("mra-export build")
    # The demo and the bench then skip their TensorRT columns with that reason instead of failing.
    assert "installed but does not load" in availability.tensorrt_unavailable_reason()
