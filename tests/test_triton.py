"""`mra-export triton`: model repositories checked against Triton's schema, served by a real
tritonserver (nvidia-pytriton's, python backend) on 127.0.0.1, answering as OrtMraModel does.

One server per module: the six heads as python-backend models, three of them with the tokenizer
and the text ensemble (one text, a pair, a prompt and its choices). Triton's onnxruntime and
tensorrt backends are not in that server: their repositories are checked against the schema and
the graphs only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from transformers import AutoTokenizer
from tritonclient.grpc import model_config_pb2

from mra_export.checkpoints import TOKENIZER_FILES, load_config
from mra_export.cli import main
from mra_export.engines import build as build_module
from mra_export.engines import system as system_module
from mra_export.engines.manifest import SystemInfo
from mra_export.engines.spec import resolve_spec
from mra_export.errors import UserError
from mra_export.export.info import ExportInfo
from mra_export.runtime.ort import OrtMraModel
from mra_export.serving import load, schema
from mra_export.serving import triton as triton_module
from mra_export.serving.server import BINARY_VARIABLE, TritonServer

from .conftest import cut_short_and_resigned, load_tool

TASKS = ("feature-extraction", "fill-mask", "text-classification", "multiple-choice",
         "token-classification", "question-answering")
TEXT_TASKS = ("fill-mask", "question-answering", "multiple-choice")  # one of each text input
TOLERANCE = 1e-5
H200 = SystemInfo("10.8.0.43", "NVIDIA H200", "9.0")


def cli(*args) -> int:
    return main(["triton", *map(str, args)])


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    assert captured.err.startswith("mra-export triton: error: ")
    return captured.err


def written(repo) -> list[str]:
    return sorted(p.name for p in repo.iterdir()) if repo.exists() else []


def without_tokenizer(export, folder):
    """A copy of an export without its tokenizer files (its repository has no ensemble)."""
    shutil.copytree(export, folder, ignore=shutil.ignore_patterns(*TOKENIZER_FILES))
    return folder


def reference(export) -> OrtMraModel:
    return OrtMraModel.from_pretrained(export, "CPUExecutionProvider")


def assert_close(served: dict, expected, names):
    for name in names:
        want = np.asarray(expected[name])
        assert served[name].shape == want.shape, name
        assert np.abs(served[name] - want).max() <= TOLERANCE, name


def cut_to_length(served: dict, names, padded: int, length: int) -> dict:
    """Per-token outputs (a dim of the padded length after the batch) cut to ``length``."""
    def cut(array):
        axes = [axis for axis in range(1, array.ndim) if array.shape[axis] == padded]
        return array if not axes else np.take(array, range(length), axis=axes[0])
    return {name: cut(served[name]) for name in names}


# --- the server ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tritonserver():
    """The tritonserver of `make triton-server`, fetched here if missing; skipped only where it
    cannot be had (PyPI unreachable, no stub for this Python, libraries missing)."""
    if os.environ.get(BINARY_VARIABLE):
        return os.environ[BINARY_VARIABLE]
    fetch = load_tool("fetch_tritonserver")
    try:
        return fetch.fetch(fetch.DEFAULT_DEST)
    except fetch.FetchError as error:
        pytest.skip(f"no tritonserver here: {error}")


@pytest.fixture(scope="module")
def repository(exports, tmp_path_factory):
    """The six heads, python backend, as `mra-export triton` writes them. The folder is named
    `triton`, as the package torch imports: started from beside it, the stubs once imported it."""
    root = tmp_path_factory.mktemp("serving")
    repo = root / "triton"
    for task in TASKS:
        export = exports[task, "portable"]
        if task not in TEXT_TASKS:
            export = without_tokenizer(export, root / task)
        assert cli("--onnx", export, "--repo", repo, "--name", task, "--backend", "python") == 0
    return repo


@pytest.fixture(scope="module")
def server(repository, tritonserver):
    started_from = os.getcwd()
    os.chdir(repository.parent)
    try:
        running = TritonServer(repository, binary=tritonserver)
        running.start()
    finally:
        os.chdir(started_from)
    try:
        yield running
    finally:  # stopped even when a test fails
        running.stop()


def test_the_repository_is_laid_out_as_triton_reads_it(repository):
    names = {*TASKS, *(f"{t}_tokenizer" for t in TEXT_TASKS), *(f"{t}_text" for t in TEXT_TASKS)}
    assert set(written(repository)) == names
    for task in TASKS:
        version = repository / task / "1"
        assert {"model.py", "model.onnx", "export.json", "config.json"} <= set(written(version))
    assert (repository / "fill-mask_tokenizer" / "1" / "tokenizer.json").is_file()
    assert written(repository / "fill-mask_text" / "1") == []  # an ensemble's version is empty


def test_every_head_answers_as_ort_over_http_and_grpc(server, exports):
    for task in TASKS:
        model = reference(exports[task, "portable"])
        generator = np.random.default_rng(len(task))
        feed = load.random_feed(model.info.inputs, model.config.vocab_size, batch=2, length=40,
                                generator=generator, choices=task == "multiple-choice")
        expected = model(**feed)
        for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
            module = load.client_module(protocol)
            client = module.InferenceServerClient(url)
            try:
                served = load.infer(client, module, task, feed, model.info.outputs)
            finally:
                client.close()
            assert_close(served, expected, model.info.outputs)


def test_the_text_ensembles_tokenize_as_the_exports_tokenizer(server, exports):
    import tritonclient.http as http

    texts = {"fill-mask": {"text": [["Long documents need attention."], ["A question"]]},
             "question-answering": {"question": [["What picks the blocks?"]],
                                    "context": [["The low resolution scores pick the blocks."]]},
             "multiple-choice": {"prompt": [["Engines run on"], ["Exports run in"]],
                                 "choices": [["GPUs", "a spreadsheet"], ["onnxruntime", "x"]]}}
    client = http.InferenceServerClient(server.http_url)
    try:
        for task, strings in texts.items():
            model = reference(exports[task, "portable"])
            arrays = {name: np.array(rows, dtype=object) for name, rows in strings.items()}
            served = load.infer(client, http, f"{task}_text", arrays,
                                [*model.info.outputs, "input_ids"])
            tokenizer = AutoTokenizer.from_pretrained(exports[task, "portable"])
            columns = list(strings.values())
            if task == "multiple-choice":
                firsts = [p[0] for p in columns[0] for _ in columns[1][0]]
                seconds = [c for row in columns[1] for c in row]
                shape = (len(columns[0]), len(columns[1][0]), -1)
            else:
                firsts = [row[0] for row in columns[0]]
                seconds = [row[0] for row in columns[1]] if len(columns) > 1 else None
                shape = (len(firsts), -1)
            encoded = tokenizer(firsts, seconds, padding=True, return_tensors="np")
            feed = {name: encoded[name].reshape(shape) for name in model.info.inputs}
            # Padded to the block (32), which the model does itself: the ids past the longest
            # row are the pad token, and the answers on the real tokens are the unpadded ones.
            length = feed["input_ids"].shape[-1]
            padded = served["input_ids"]
            assert padded.shape[-1] == -(-length // 32) * 32 > length
            np.testing.assert_array_equal(padded[..., :length], feed["input_ids"])
            assert (padded[..., length:] == tokenizer.pad_token_id).all()
            assert_close(cut_to_length(served, model.info.outputs, padded.shape[-1], length),
                         model(**feed), model.info.outputs)
    finally:
        client.close()


def test_load_from_eight_clients_is_answered_whole_and_batched(server, exports):
    """8 clients x 50 requests of mixed lengths and batch sizes: no error, every answer OrtMraModel's,
    and fewer model runs than requests (the dynamic batcher merged some)."""
    task = "text-classification"
    model = reference(exports[task, "portable"])
    feeds = [load.mixed_feeds(model.info.inputs, model.config.vocab_size, 50, seed=client)
             for client in range(8)]
    before = load.batching_stats(server.grpc_url, task)
    result = load.run_load(server.grpc_url, task, feeds, model.info.outputs, keep_outputs=True)
    counts = load.batching_stats_since(server.grpc_url, task, before, requests=400)
    assert result.errors == []
    assert counts.requests == 400 and counts.inferences == result.samples
    assert counts.executions < counts.requests  # merged
    for client_feeds, answers in zip(feeds, result.outputs):
        assert len(answers) == len(client_feeds)
        for feed, served in zip(client_feeds, answers):
            assert_close(served, model(**feed), model.info.outputs)


def test_a_bad_request_gets_its_own_error_and_the_others_their_answers(server, exports):
    """Ids outside the vocabulary from one client among four: its requests fail with
    OrtMraModel's message, whether or not the batcher merged them with the others'."""
    task = "token-classification"
    model = reference(exports[task, "portable"])
    vocab = model.config.vocab_size
    good = [load.mixed_feeds(model.info.inputs, vocab, 5, seed=c, lengths=(16,), batches=(1, 2))
            for c in range(3)]
    bad = [{**feed, "input_ids": np.full_like(feed["input_ids"], vocab)} for feed in good[0]]
    result = load.run_load(server.grpc_url, task, [*good, bad], model.info.outputs,
                           keep_outputs=True)
    assert len(result.errors) == 5
    assert all(f"input_ids must be in [0, {vocab}) for this model" in e for e in result.errors)
    for feeds, answers in zip(good, result.outputs):
        assert len(answers) == len(feeds)
        for feed, served in zip(feeds, answers):
            assert_close(served, model(**feed), model.info.outputs)


def test_the_server_loaded_the_configs_as_written(server, repository):
    import tritonclient.http as http

    client = http.InferenceServerClient(server.http_url)
    try:
        for task in TASKS:
            loaded = client.get_model_config(task)
            written_config = schema.check_config_file(repository / task / "config.pbtxt")
            assert loaded["max_batch_size"] == written_config.max_batch_size == 8
            assert loaded["dynamic_batching"]["preferred_batch_size"] == [2, 4, 8]
            assert [i["name"] for i in loaded["input"]] == [i.name for i in written_config.input]
    finally:
        client.close()


def test_a_failing_block_still_stops_the_server(tritonserver, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="a test failed"):
        with TritonServer(tmp_path / "empty", binary=tritonserver) as running:
            assert running.ready()
            raise RuntimeError("a test failed")
    assert running.process.poll() is not None and not running.ready()


def test_the_server_command_refuses_a_missing_repository_or_log_folder_in_one_line(
        tmp_path, capsys, monkeypatch):
    """Checked before any server starts (none is needed here), and nothing left behind."""
    from mra_export.serving import server
    from mra_export.serving.server import main as serve

    def start(self, timeout=None):  # a check gone would serve until killed: fail instead
        raise AssertionError(f"a server was started for {self.repo}")

    monkeypatch.setattr(server.TritonServer, "start", start)

    temporary = set(Path(tempfile.gettempdir()).glob("tritonserver-*"))
    assert serve(["--repo", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == (f"error: model repository {tmp_path / 'nope'} is not a "
                                       "folder; make one with 'mra-export triton --repo REPO'\n")
    (tmp_path / "repo").mkdir()
    assert serve(["--repo", str(tmp_path / "repo"), "--log", str(tmp_path / "no" / "dir" / "log")]) == 2
    assert capsys.readouterr().err == (f"error: the log's folder {tmp_path / 'no' / 'dir'} does not "
                                       "exist; pass a --log in an existing folder\n")
    # An empty repository, or an export folder, which Triton would serve as "ready" with no model.
    assert serve(["--repo", str(tmp_path / "repo")]) == 2
    assert capsys.readouterr().err == (f"error: model repository {tmp_path / 'repo'} holds no model "
                                       "(no */config.pbtxt); pass the --repo that 'mra-export "
                                       "triton' wrote\n")
    for port, flag in (("-1", "--http-port"), ("70000", "--grpc-port")):
        assert serve(["--repo", str(tmp_path / "repo"), flag, port]) == 2
        assert capsys.readouterr().err == f"error: {flag} must be 0 (a free port) to 65535, got {port}\n"
    with pytest.raises(SystemExit):
        serve(["--repo", str(tmp_path / "repo"), "--port", "1"])
    assert capsys.readouterr().err == ("python -m mra_export.serving.server: error: unrecognized "
                                       "arguments: --port 1; see 'python -m "
                                       "mra_export.serving.server --help'\n")
    assert set(Path(tempfile.gettempdir()).glob("tritonserver-*")) == temporary


def test_a_repository_triton_refuses_is_one_line_naming_its_error(tritonserver, tmp_path):
    (tmp_path / "repo" / "broken").mkdir(parents=True)
    (tmp_path / "repo" / "broken" / "config.pbtxt").write_text("garbage {")
    with pytest.raises(UserError, match="tritonserver exited .* before it was ready: E.*failed to read "
                                        "text proto from .*broken/config.pbtxt.*; pass --log FILE to "
                                        "keep the whole log") as raised:
        with TritonServer(tmp_path / "repo", binary=tritonserver):
            pass
    assert "\n" not in str(raised.value)


def test_the_fetch_extracts_again_what_is_partial_or_for_another_python(tmp_path):
    fetch = load_tool("fetch_tritonserver")
    server = tmp_path / "server"
    (server / "bin").mkdir(parents=True)
    (server / "bin" / "tritonserver").write_bytes(b"x" * 10)
    stamp = {"wheel_sha256": fetch.WHEEL_SHA256, "python": fetch._python_version(),
             "files": {"bin/tritonserver": 10}}
    (server / fetch.STAMP).write_text(json.dumps(stamp))
    assert fetch._whole(server)
    (server / "bin" / "tritonserver").write_bytes(b"x" * 9)  # cut short
    assert not fetch._whole(server)
    (server / "bin" / "tritonserver").write_bytes(b"x" * 10)
    (server / fetch.STAMP).write_text(json.dumps({**stamp, "python": "3.8"}))  # another stub
    assert not fetch._whole(server)


def _pip_with_wheels(wheel_found, commands):
    """Stands in for subprocess.run in the stub environment's numpy install: records each
    command; ``--only-binary`` succeeds only where ``wheel_found``."""
    def run(command, **settings):
        commands.append(command)
        refused = "--only-binary" in command and not wheel_found
        return subprocess.CompletedProcess(command, 1 if refused else 0, "", "")
    return run


@pytest.mark.parametrize("wheel_found", [True, False], ids=["wheel", "no wheel (Python 3.13)"])
def test_the_stubs_numpy_is_a_wheel_or_a_source_build_said_before_it_starts(
        wheel_found, monkeypatch, capsys):
    """Python 3.13 has no numpy 1 wheel: pip built 1.26.4 from source for 6 minutes with nothing
    said (seen in `make test` on 3.13.0). A wheel is tried first; a source build is announced."""
    fetch = load_tool("fetch_tritonserver")
    commands = []
    monkeypatch.setattr(fetch.subprocess, "run", _pip_with_wheels(wheel_found, commands))
    fetch._install_stub_numpy(Path("stub-env/bin/python"))
    install = ["stub-env/bin/python", "-m", "pip", "install", "--quiet", fetch.STUB_NUMPY]
    said = capsys.readouterr().err
    if wheel_found:
        assert commands == [[*install, "--only-binary", ":all:"]] and said == ""
    else:
        assert commands == [[*install, "--only-binary", ":all:"], install]
        assert said == (f"fetch_tritonserver: pip found no {fetch.STUB_NUMPY} wheel for Python "
                        f"{fetch._python_version()}; building it from source for the python "
                        "backend's stub (minutes, once)\n")


def test_counts_after_a_load_wait_for_the_requests_triton_records_late(monkeypatch):
    """Triton can record a request's statistics after its answer reached the client: the read
    after a load waits for them (a CI run once counted 399 of 400), and gives up after its
    timeout rather than hang when requests never come."""
    reads = iter([399, 399, 400, 400])
    monkeypatch.setattr(load, "batching_stats",
                        lambda url, model, protocol="grpc": load.BatchingStats(next(reads), 0, 0))
    before = load.BatchingStats(0, 0, 0)
    assert load.batching_stats_since("url", "m", before, requests=400).requests == 400
    monkeypatch.setattr(load, "batching_stats",
                        lambda url, model, protocol="grpc": load.BatchingStats(399, 0, 0))
    counts = load.batching_stats_since("url", "m", before, requests=400, timeout=0.2)
    assert counts.requests == 399


def test_counts_after_a_load_are_every_count_less_those_before_it(monkeypatch):
    """The load test judges merging by executions < requests within its own window: each
    count (executions too) is since the read before the load, not since the model loaded
    (after 1000 requests in 1000 runs, 400 requests in 300 runs were merged)."""
    monkeypatch.setattr(load, "batching_stats",
                        lambda url, model, protocol="grpc": load.BatchingStats(1400, 3000, 1300))
    before = load.BatchingStats(1000, 2000, 1000)
    counts = load.batching_stats_since("url", "m", before, requests=400)
    assert counts == load.BatchingStats(requests=400, inferences=1000, executions=300)


# --- configs against the schema and the graph ----------------------------------------------------

def graph_dims(onnx_path, name):
    """A graph tensor's dimensions after the batch axis, -1 where dynamic."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    value = next(v for v in [*graph.input, *graph.output] if v.name == name)
    return [d.dim_value if d.HasField("dim_value") else -1
            for d in value.type.tensor_type.shape.dim][1:]


def check_against_the_graph(config, export):
    """Names and types as export.json has them; dimensions as the graph has them."""
    info = ExportInfo.load(export)
    types = {"int64": "TYPE_INT64", "float32": "TYPE_FP32"}
    for tensors, declared in ((config.input, info.inputs), (config.output, info.outputs)):
        assert [t.name for t in tensors] == list(declared)
        for t in tensors:
            assert model_config_pb2.DataType.Name(t.data_type) == types[declared[t.name]]
            assert list(t.dims) == graph_dims(export / info.onnx_file, t.name), t.name


def instance_groups(config) -> list[tuple[int, str]]:
    return [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind))
            for g in config.instance_group]


def test_onnxruntime_repositories_fit_the_schema_and_the_graph(exports, tmp_path, capsys):
    repo = tmp_path / "repo"
    for task in TASKS:
        export = exports[task, "portable"]
        assert cli("--onnx", export, "--repo", repo, "--name", task, "--instances", 2,
                   "--max-batch-size", 16) == 0
        config = schema.check_config_file(repo / task / "config.pbtxt")
        assert config.backend == "onnxruntime" and config.max_batch_size == 16
        assert list(config.dynamic_batching.preferred_batch_size) == [2, 4, 8, 16]
        assert instance_groups(config) == [(2, "KIND_CPU")]
        check_against_the_graph(config, export)
        copied = repo / task / "1" / "model.onnx"
        assert copied.read_bytes() == (export / "model.onnx").read_bytes()
        assert not (repo / task / "1" / "model.py").exists()
    for task in TASKS:
        ensemble = schema.check_config_file(repo / f"{task}_text" / "config.pbtxt")
        # A batch of texts goes through whole: the --max-batch-size the model takes.
        assert ensemble.platform == "ensemble" and ensemble.max_batch_size == 16
        steps = ensemble.ensemble_scheduling.step
        assert [s.model_name for s in steps] == [f"{task}_tokenizer", task]
    assert "serve it: " in capsys.readouterr().out


@pytest.mark.parametrize("most,preferred", [(3, [2, 3]), (12, [2, 4, 8, 12])])
def test_the_batcher_prefers_powers_of_two_and_a_maximum_that_is_none(most, preferred, exports,
                                                                     tmp_path):
    """docs/triton.md: "preferred batch sizes 2, 4, ... and N, 1 ms queue delay"; the other tests
    use powers of two only, where N is among the powers anyway."""
    repo = tmp_path / "repo"
    assert cli("--onnx", exports["fill-mask", "portable"], "--repo", repo, "--name", "m",
               "--max-batch-size", most) == 0
    config = schema.check_config_file(repo / "m" / "config.pbtxt")
    assert list(config.dynamic_batching.preferred_batch_size) == preferred
    assert config.dynamic_batching.max_queue_delay_microseconds == 1000


def test_gpu_instances(exports, tmp_path):
    repo = tmp_path / "repo"
    assert cli("--onnx", exports["fill-mask", "portable"], "--repo", repo, "--name", "m",
               "--device", "gpu") == 0
    config = schema.check_config_file(repo / "m" / "config.pbtxt")
    assert instance_groups(config) == [(1, "KIND_GPU")]


def test_a_plugin_export_names_the_op_library_it_carries(exports, tmp_path, monkeypatch, capsys):
    build = tmp_path / "build"
    build.mkdir()
    monkeypatch.setenv("MRA_EXPORT_PLUGIN_BUILD", str(build))
    repo, export = tmp_path / "repo", exports["fill-mask", "plugin"]
    assert cli("--onnx", export, "--repo", repo) == 2
    error = one_line_error(capsys)
    assert "libmra_attention_ort.so is not built" in error and "run 'make plugins" in error
    assert written(tmp_path) == ["build"]

    (build / "libmra_attention_ort.so").write_bytes(b"the op library as built")
    assert cli("--onnx", export, "--repo", repo, "--name", "m") == 0
    config = schema.check_config_file(repo / "m" / "config.pbtxt")
    carried = repo / "m" / "libmra_attention_ort.so"
    assert list(config.model_operations.op_library_filename) == [str(carried)]
    assert carried.read_bytes() == b"the op library as built"
    check_against_the_graph(config, export)


@pytest.fixture
def engine(exports, tmp_path, monkeypatch):
    """An engine folder from `mra-export build` (its TensorRT build injected), on an H200; the
    triton library beside its plugin library, as `make plugins` builds them."""
    plugin = tmp_path / "libmra_attention_plugin.so"
    plugin.write_bytes(b"a plugin build")
    (tmp_path / "libmra_attention_plugin_triton.so").write_bytes(b"a triton library build")
    monkeypatch.setattr(build_module, "current_system", lambda what="": H200)
    spec = resolve_spec(onnx=str(exports["question-answering", "plugin"]), plugin=str(plugin),
                        out=str(tmp_path / "engine"), shapes="batch=1/2/4,sequence=8/64/256")
    build_module.build_engine(spec, command="test", log=lambda m: None,
                              builder=lambda *args: b"a serialized engine")
    return spec.out


def test_an_engine_is_served_by_the_tensorrt_backend_with_its_plugin(engine, tmp_path,
                                                                    monkeypatch, capsys):
    monkeypatch.setattr(system_module, "current_system", lambda what="": H200)
    repo = tmp_path / "repo"
    assert cli("--engine", engine, "--repo", repo, "--name", "qa") == 0
    config = schema.check_config_file(repo / "qa" / "config.pbtxt")
    assert config.backend == "tensorrt" and config.max_batch_size == 4  # the profile's
    assert instance_groups(config) == [(1, "KIND_GPU")]
    assert [list(t.dims) for t in config.output] == [[-1], [-1]]
    assert (repo / "qa" / "1" / "model.plan").read_bytes() == b"a serialized engine"
    # Both libraries, side by side: the backend dlopens the triton library, which registers the
    # creator of the plugin library it loads from its own folder (the plugin itself would not).
    assert (repo / "qa" / "libmra_attention_plugin.so").read_bytes() == b"a plugin build"
    triton = repo / "qa" / "libmra_attention_plugin_triton.so"
    assert triton.read_bytes() == b"a triton library build"
    out = capsys.readouterr().out
    assert f"--backend-config=tensorrt,plugins={triton}" in out
    assert "plugins=" + str(repo / "qa" / "libmra_attention_plugin.so") not in out

    assert cli("--engine", engine, "--repo", repo, "--name", "qa", "--max-batch-size", 5) == 2
    assert "above the engine's profile (batch up to 4)" in one_line_error(capsys)
    assert cli("--engine", engine, "--repo", repo, "--device", "cpu") == 2
    assert "a TensorRT engine runs on its GPU" in one_line_error(capsys)


def test_an_engine_without_the_triton_library_is_one_line(engine, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(system_module, "current_system", lambda what="": H200)
    missing = tmp_path / "libmra_attention_plugin_triton.so"
    missing.unlink()
    assert cli("--engine", engine, "--repo", tmp_path / "repo") == 2
    error = one_line_error(capsys)
    assert f"{missing} is not built" in error and "run 'make plugins TensorRT_ROOT=" in error
    assert not (tmp_path / "repo").exists()


def test_an_engine_the_manifest_refuses_here_writes_nothing(engine, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(system_module, "current_system",
                        lambda what="": SystemInfo("10.9.0.34", "NVIDIA H200", "9.0"))
    assert cli("--engine", engine, "--repo", tmp_path / "repo") == 2
    error = one_line_error(capsys)
    assert f"cannot use the engine in {engine}: it was built with TensorRT 10.8.0.43" in error
    assert not (tmp_path / "repo").exists()


# --- the schema check ----------------------------------------------------------------------------

@pytest.mark.parametrize("text,problem", [
    ('name: "m"\nmax_batch_sise: 8\n', 'has no field named "max_batch_sise"'),
    ('name: "m"\nmax_batch_size: "eight"\n', 'Couldn\'t parse integer: "eight"'),
    ('input { name: "x" data_type: TYPE_INT65 dims: -1 }\n', "has no value named TYPE_INT65"),
    ('instance_group { kind: KIND_TPU }\n', "has no value named KIND_TPU"),
])
def test_a_config_triton_would_refuse_is_one_line(text, problem, tmp_path):
    path = tmp_path / "config.pbtxt"
    path.write_text(text)
    with pytest.raises(UserError) as raised:
        schema.check_config_file(path)
    message = str(raised.value)
    assert message.startswith(f"{path} does not fit Triton's model_config.proto: ")
    assert problem in message and "\n" not in message


@pytest.mark.parametrize("field,value,problem", [
    ("max_batch_sise", 8, 'has no field named "max_batch_sise"'),
    ("max_batch_size", "eight", "Failed to parse max_batch_size field"),
    ("sequence_batching", {}, 'multiple "scheduling_choice" oneof fields'),  # beside dynamic
])
def test_a_config_the_writer_got_wrong_fails_the_command_and_writes_nothing(
        field, value, problem, exports, tmp_path, monkeypatch, capsys):
    original = triton_module.model_config
    monkeypatch.setattr(triton_module, "model_config",
                        lambda *args: {**original(*args), field: value})
    repo = tmp_path / "repo"
    assert cli("--onnx", exports["fill-mask", "portable"], "--repo", repo, "--name", "m") == 2
    error = one_line_error(capsys)
    assert f"{repo / 'm' / 'config.pbtxt'} does not fit Triton's model_config.proto" in error
    assert problem in error
    assert not repo.exists()


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("edit,flags,message", [
    ({"dtype": "bf16"}, [], "this export is bfloat16: onnxruntime's CPU provider lacks bfloat16 "
                            "kernels for this graph; pass --device gpu"),
    ({"dtype": "int8", "quantization": {"nodes": ["a"]}}, ["--device", "gpu"],
     "this export is int8: onnxruntime computes its dynamically quantized MatMuls on the CPU only; "
     "pass --device cpu"),
])
def test_an_export_no_onnxruntime_runs_on_the_device_is_refused(edit, flags, message, exports,
                                                                tmp_path, capsys):
    """Triton's onnxruntime backend would fail to load it (the python backend's OrtMraModel
    refuses it the same way)."""
    export = shutil.copytree(exports["fill-mask", "portable"], tmp_path / "export")
    record = json.loads((export / "export.json").read_text())
    (export / "export.json").write_text(json.dumps({**record, **edit}))
    repo = tmp_path / "repo"
    assert cli("--onnx", export, "--repo", repo, "--name", "m", *flags) == 2
    assert message in one_line_error(capsys)
    assert not repo.exists()


@pytest.mark.parametrize("task,field", [("text-classification", "num_labels"),
                                        ("fill-mask", "vocab_size")])
def test_a_config_edited_away_from_the_graph_is_refused(task, field, exports, tmp_path, capsys):
    """config.pbtxt's fixed sizes come from config.json, which is not under checksum: one whose
    size is no longer the graph's would make Triton reject every answer."""
    export = shutil.copytree(exports[task, "portable"], tmp_path / "export")
    config = json.loads((export / "config.json").read_text())
    graph_size = graph_dims(export / "model.onnx", "logits")[-1]
    edited = {"num_labels": {"id2label": {str(i): f"L{i}" for i in range(graph_size + 1)},
                             "label2id": {f"L{i}": i for i in range(graph_size + 1)}},
              "vocab_size": {"vocab_size": graph_size + 1}}[field]
    (export / "config.json").write_text(json.dumps({**config, **edited}))
    repo = tmp_path / "repo"
    assert cli("--onnx", export, "--repo", repo, "--name", "m") == 2
    assert (f"config.json has {field}={graph_size + 1} but the graph's logits were exported "
            f"with {graph_size}; restore the export's config.json" in one_line_error(capsys))
    assert not repo.exists()


@pytest.mark.parametrize("kept", [0.5, 0.0])  # protobuf reads an empty file as a whole message
def test_a_graph_cut_short_and_resigned_is_one_line(kept, exports, tmp_path, capsys):
    resigned = cut_short_and_resigned(exports["fill-mask", "portable"], tmp_path / "resigned",
                                      kept)
    repo = tmp_path / "repo"
    assert cli("--onnx", resigned, "--repo", repo) == 2
    assert "resigned/model.onnx is not a readable ONNX graph" in one_line_error(capsys)
    assert not repo.exists()


def test_a_folder_without_its_record_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    repo = tmp_path / "repo"
    assert cli("--onnx", tmp_path / "empty", "--repo", repo) == 2
    assert "has no export.json; pass a folder made by 'mra-export export'" in one_line_error(capsys)
    assert cli("--engine", tmp_path / "empty", "--repo", repo) == 2
    assert "has no manifest.json; pass a folder made by 'mra-export build'" in one_line_error(capsys)
    assert cli("--onnx", tmp_path / "missing", "--repo", repo) == 2
    assert "is not a folder" in one_line_error(capsys)
    assert not repo.exists()


@pytest.mark.parametrize("flags,message", [
    (["--name", "my model"], "model name 'my model' is not one Triton serves"),
    (["--name", "../elsewhere"], "model name '../elsewhere' is not one Triton serves"),
    (["--name", ".hidden"], "model name '.hidden' is not one Triton serves"),
    (["--name", ""], "model name '' is not one Triton serves"),
    (["--max-batch-size", "0"], "--max-batch-size must be 1 to 2147483647 (Triton's int32), got 0"),
    (["--max-batch-size", "-4"], "--max-batch-size must be 1 to 2147483647 (Triton's int32), got -4"),
    (["--max-batch-size", "2147483648"], "--max-batch-size must be 1 to 2147483647 (Triton's "
                                         "int32), got 2147483648"),
    (["--instances", "0"], "--instances must be 1 to 2147483647 (Triton's int32), got 0"),
    (["--backend", "tensorrt"], "an export is served by the onnxruntime or python backend"),
])
def test_bad_flags_are_one_line_and_write_nothing(flags, message, exports, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert cli("--onnx", exports["fill-mask", "portable"], "--repo", repo, *flags) == 2
    assert message in one_line_error(capsys)
    assert not repo.exists()


def test_a_folder_this_command_did_not_write_is_left_alone(exports, tmp_path, capsys):
    repo = tmp_path / "repo"
    (repo / "m").mkdir(parents=True)
    (repo / "m" / "notes.txt").write_text("mine")
    assert cli("--onnx", exports["fill-mask", "portable"], "--repo", repo, "--name", "m") == 2
    assert "already holds other files" in one_line_error(capsys)
    assert written(repo) == ["m"] and written(repo / "m") == ["notes.txt"]
    # the ensemble's folder held by someone else: not even the model's folder is written
    (repo / "n_text").mkdir()
    (repo / "n_text" / "config.pbtxt").write_text("theirs")
    assert cli("--onnx", exports["fill-mask", "portable"], "--repo", repo, "--name", "n") == 2
    assert "n_text already holds other files" in one_line_error(capsys)
    assert written(repo) == ["m", "n_text"]


def test_another_models_ensemble_is_not_replaced_by_a_name_like_it(exports, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert cli("--onnx", exports["fill-mask", "portable"], "--repo", repo, "--name", "a") == 0
    before = (repo / "a_text" / "config.pbtxt").read_text()
    capsys.readouterr()
    assert cli("--onnx", exports["fill-mask", "portable"], "--repo", repo, "--name", "a_text") == 2
    assert (f"{repo / 'a_text'} belongs to model a of this repository (mra-export triton --name a); "
            "choose another --name") in one_line_error(capsys)
    assert (repo / "a_text" / "config.pbtxt").read_text() == before
    assert not (repo / "a_text_tokenizer").exists()


def test_an_earlier_repository_of_this_command_is_replaced(exports, tmp_path):
    repo = tmp_path / "repo"
    assert cli("--onnx", exports["fill-mask", "portable"], "--repo", repo, "--name", "m") == 0
    assert written(repo) == ["m", "m_text", "m_tokenizer"]
    plain = without_tokenizer(exports["text-classification", "portable"], tmp_path / "plain")
    assert cli("--onnx", plain, "--repo", repo, "--name", "m", "--max-batch-size", "1") == 0
    assert written(repo) == ["m"]  # the old tokenizer and ensemble fed another model
    config = schema.check_config_file(repo / "m" / "config.pbtxt")
    assert config.max_batch_size == 1 and not config.HasField("dynamic_batching")
    record = json.loads((repo / "m" / triton_module.MARKER).read_text())
    assert record["source"] == str(plain)


def test_a_source_without_a_tokenizer_removes_only_its_own_earlier_companions(exports, tmp_path):
    """The stale NAME_tokenizer and NAME_text are those this command wrote for NAME: a model
    served as m_text, or a folder made by hand, is not m's to remove."""
    repo = tmp_path / "repo"
    plain = without_tokenizer(exports["text-classification", "portable"], tmp_path / "plain")
    assert cli("--onnx", plain, "--repo", repo, "--name", "m_text") == 0
    (repo / "m_tokenizer").mkdir()
    (repo / "m_tokenizer" / "config.pbtxt").write_text("made by hand")
    assert cli("--onnx", plain, "--repo", repo, "--name", "m") == 0
    assert written(repo) == ["m", "m_text", "m_tokenizer"]
    assert (repo / "m_tokenizer" / "config.pbtxt").read_text() == "made by hand"
    assert json.loads((repo / "m_text" / triton_module.MARKER).read_text())["model"] == "m_text"


def test_the_tokenizer_model_truncates_at_the_models_length(exports):
    from mra_export.serving.parameters import MAX_LENGTH

    folder = exports["fill-mask", "portable"]
    config = triton_module.tokenizer_config(ExportInfo.load(folder), "m", 8)
    assert int(config["parameters"][MAX_LENGTH]["string_value"]) == \
        load_config(folder).max_position_embeddings


def test_the_tokenizer_model_never_pads_past_a_length_that_is_no_block_multiple(exports):
    """Rows are padded to a multiple of 32 only where the model's length is one: for a model of
    100 positions a long text is cut at 100, as its own tokenizer cuts it, not padded to 128."""
    from mra_export.serving.python_backend import TokenizerServer

    folder = exports["fill-mask", "portable"]
    tokenizer = TokenizerServer(folder, "fill-mask", ["input_ids", "attention_mask"], 100, None)
    text = "Long documents need attention whose cost grows linearly. " * 20
    served = tokenizer.tokenize(np.array([[text]], dtype=object))["input_ids"]
    expected = AutoTokenizer.from_pretrained(folder)([text], truncation=True, max_length=100,
                                                     return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(served, expected)


def test_a_python_model_refuses_a_stub_of_another_python():
    """model.py records the writer's Python: its site-packages hold compiled packages for that
    Python alone, so a stub of another one is refused with what to do, not left to crash."""
    from mra_export.serving import triton_model

    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    triton_model._check_python(running)
    with pytest.raises(RuntimeError, match=f"written by Python 2.7 .* the python backend's stub "
                                           f"runs Python {running}; serve it with a stub for "
                                           "Python 2.7"):
        triton_model._check_python("2.7")


def test_the_python_backend_declares_bfloat16_outputs_as_the_float32_it_returns(exports,
                                                                                  tmp_path):
    """OrtMraModel hands the python backend float32 for a bf16 graph's outputs; Triton's
    onnxruntime backend serves the graph's own bf16."""
    folder = exports["fill-mask", "portable"]
    bf16 = dataclasses.replace(ExportInfo.load(folder), dtype="bf16",
                               outputs={"logits": "bfloat16"})
    source = triton_module.Source(folder, bf16, load_config(folder), "python", [], None, 8, [])
    config = triton_module.model_config(source, "m", 8, 1, "gpu", tmp_path / "m")
    assert [t["data_type"] for t in config["output"]] == ["TYPE_FP32"]
    served_as_is = dataclasses.replace(source, backend="onnxruntime")
    config = triton_module.model_config(served_as_is, "m", 8, 1, "gpu", tmp_path / "m")
    assert [t["data_type"] for t in config["output"]] == ["TYPE_BF16"]
