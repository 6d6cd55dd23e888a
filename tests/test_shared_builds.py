"""What lets `make test` run the suite on several pytest-xdist workers: the session fixtures'
builds shared by the workers (tests/shared_builds.py), and ``native.ensure_built`` building a
library once when several processes ask for it. Processes started from a forkserver stand in for
the workers: a plain fork of this multi-threaded process (torch's threads) can deadlock the child,
and Python 3.12 warns of it."""

from __future__ import annotations

import functools
import multiprocessing
import os
import subprocess
import time

import pytest

from mra_export import native

from .shared_builds import build_each_once

WORKERS = multiprocessing.get_context("forkserver")
BUILD_S = 0.3  # long enough for the other process to arrive while a build is under way


def _logged_build(path):
    time.sleep(BUILD_S)
    path.mkdir()
    (path / "built-by").write_text(str(os.getpid()))
    with open(path.parent / "log", "a") as log:
        log.write(f"{path.name}\n")


def _worker(folder, names, start, results):
    start.wait()
    folders = build_each_once(folder, {name: _logged_build for name in names})
    results.put({name: (path / "built-by").read_text() for name, path in folders.items()})


def _run_together(target, *args):
    """``target(*args, start, results)`` in two worker processes released together; returns what
    each put in ``results`` and the processes."""
    start, results = WORKERS.Barrier(2), WORKERS.Queue()
    processes = [WORKERS.Process(target=target, args=(*args, start, results)) for _ in range(2)]
    for process in processes:
        process.start()
    answers = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0, 0]
    return answers, processes


def test_two_workers_split_the_builds_and_build_each_once(tmp_path):
    names = [f"export-{n}" for n in range(6)]
    (first, second), processes = _run_together(_worker, tmp_path, names)
    assert sorted((tmp_path / "log").read_text().split()) == names  # each built once
    assert first == second and list(first) == names  # both got every folder
    assert set(first.values()) == {str(process.pid) for process in processes}  # both built


def _fails(path):
    raise OSError("No space left on device")


def test_a_build_that_failed_in_one_worker_fails_in_the_others_with_its_message(tmp_path):
    with pytest.raises(OSError, match="No space left"):
        build_each_once(tmp_path, {"export": _fails})
    # Another worker finds the build claimed, and failed instead of waiting for it.
    with pytest.raises(RuntimeError, match="OSError: No space left on device"):
        build_each_once(tmp_path, {"export": _fails})


def _fake_cmake(build_dir, command, **settings):
    """Stands in for CMake: a build that takes a while, logging which process ran it."""
    if "--build" in command:
        with open(build_dir / "log", "a") as log:
            log.write(f"{os.getpid()}\n")
        time.sleep(BUILD_S)
        (build_dir / "libfake.so").write_text("")
    return subprocess.CompletedProcess(command, 0, "", "")


def _ensure_built(build_dir, start, results):
    # A worker starts without the parent's patches: it installs the stand-in itself.
    os.environ[native.BUILD_DIR_VARIABLE] = str(build_dir)
    native.subprocess.run = functools.partial(_fake_cmake, build_dir)
    start.wait()
    results.put(str(native.ensure_built("libfake.so", "fake")))


def test_ensure_built_builds_once_for_processes_asking_together(tmp_path):
    answers, _ = _run_together(_ensure_built, tmp_path)
    assert answers == [str(tmp_path / "libfake.so")] * 2
    assert len((tmp_path / "log").read_text().split()) == 1
