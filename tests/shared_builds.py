"""Folders the session fixtures build once per test run, also when pytest-xdist splits the run
over worker processes (`make test` runs one worker per core).

Each xdist worker runs a session of its own, so a session fixture would be built by every worker:
the exports alone cost each of two workers five minutes. Instead the workers share the run's
folder, and each build is claimed by the first worker to reach it. A worker that needs builds
claimed by another waits for them, after building the unclaimed ones, so two workers needing the
same fixture at once split its builds between them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

WAIT_LIMIT_S = 1800  # longer than any build; a worker killed mid-build leaves its claim behind
POLL_S = 0.5


def run_folder(tmp_path_factory) -> Path:
    """The folder every worker of this run shares: xdist gives each worker its own basetemp
    inside the run's (as its documentation's recipe for session fixtures uses)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_each_once(folder: Path, builds: dict[str, Callable[[Path], object]]) -> dict[str, Path]:
    """``{name: folder / name}``, each made by ``builds[name](folder / name)`` in exactly one of
    the run's workers. A build that failed in another worker fails here too, with its message."""
    for name, build in builds.items():
        if _claim(folder / name):
            _build(folder / name, build)
    for name in builds:
        _wait_for(folder / name)
    return {name: folder / name for name in builds}


def _claim(path: Path) -> bool:
    """Whether this worker is the first to claim ``path`` (an exclusive create, atomic across
    processes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(_marker(path, "claimed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _build(path: Path, build: Callable[[Path], object]) -> None:
    try:
        build(path)
    except BaseException as error:
        _marker(path, "failed").write_text(f"{type(error).__name__}: {error}")
        raise
    _marker(path, "done").touch()


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + WAIT_LIMIT_S
    while not _marker(path, "done").exists():
        if _marker(path, "failed").exists():
            raise RuntimeError(f"building {path} failed in another worker: "
                               f"{_marker(path, 'failed').read_text()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} was not built within {WAIT_LIMIT_S} s by the worker that "
                               "claimed it")
        time.sleep(POLL_S)


def _marker(path: Path, state: str) -> Path:
    return path.with_name(f"{path.name}.{state}")
