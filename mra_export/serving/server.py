"""Triton Inference Server, as nvidia-pytriton's wheel ships it, serving a model repository on
127.0.0.1; for the tests, tools/triton_load.py and a user's python-backend repository.

    python -m mra_export.serving.server --repo REPO [--http-port 8000] [--grpc-port 8001]

``make triton-server`` (tools/fetch_tritonserver.py) puts the server under ``.triton/server``;
``MRA_EXPORT_TRITONSERVER`` names another ``tritonserver`` binary, whose ``../backends`` holds
the python backend. The server runs with this environment's ``bin`` first on ``PATH``: the python
backend's stub embeds Python, which takes ``python3`` on ``PATH`` as its program and so this
environment's site-packages (the stub imports numpy before any model.py runs); and with this
Python's ``libpython`` first on ``LD_LIBRARY_PATH``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import OneLineParser, UserError
from .schema import CONFIG_FILE

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BINARY = ROOT / ".triton" / "server" / "pytriton" / "tritonserver" / "bin" / "tritonserver"
BINARY_VARIABLE = "MRA_EXPORT_TRITONSERVER"
STUB_ENV = ROOT / ".triton" / "stub-env"
HOST = "127.0.0.1"  # never another address
MAX_PORT = 65535
READY_TIMEOUT_S = 180  # python models import torch and onnxruntime in each stub
EXIT_TIMEOUT_S = 5  # for unloading: nine python stubs took over 10 s on 2 busy cores, then exit


def server_binary() -> Path:
    binary = Path(os.environ.get(BINARY_VARIABLE) or DEFAULT_BINARY)
    if not binary.is_file():
        raise UserError(f"{binary} not found; run 'make triton-server' (tools/"
                        f"fetch_tritonserver.py) or set {BINARY_VARIABLE} to a tritonserver")
    return binary


def server_environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(STUB_ENV / "bin"), env.get("PATH", "")])
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir,
                                                               env.get("LD_LIBRARY_PATH")]))
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class TritonServer:
    """``tritonserver`` on ``HOST`` for ``repo``; a context manager that always stops it. Ports
    0 are chosen free. It runs in an empty temporary folder, removed when it stops: the stubs
    put their working folder first on sys.path, where a folder named like a package (a model
    repository called ``triton`` shadowed the package torch imports) breaks the models' imports.
    Its log goes to ``log_path``, by default into that folder."""

    def __init__(self, repo: str | Path, *, http_port: int = 0, grpc_port: int = 0,
                 log_path: str | Path | None = None, binary: str | Path | None = None):
        self.repo = Path(repo).absolute()
        if not self.repo.is_dir():
            raise UserError(f"model repository {repo} is not a folder; make one with "
                            "'mra-export triton --repo REPO'")
        for flag, port in (("--http-port", http_port), ("--grpc-port", grpc_port)):
            if not 0 <= port <= MAX_PORT:
                raise UserError(f"{flag} must be 0 (a free port) to {MAX_PORT}, got {port}")
        self._log_path = Path(log_path).absolute() if log_path else None
        if self._log_path is not None and not self._log_path.parent.is_dir():
            raise UserError(f"the log's folder {self._log_path.parent} does not exist; pass a "
                            "--log in an existing folder")
        self.binary = Path(binary) if binary else server_binary()
        self.http_port, self.grpc_port = http_port or free_port(), grpc_port or free_port()
        self.workdir: Path | None = None  # made by start, removed by stop
        self.process: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path | None:
        return self._log_path or (self.workdir and self.workdir / "server.log")

    @property
    def http_url(self) -> str:
        return f"{HOST}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    def command(self) -> list[str]:
        return [str(self.binary), f"--model-repository={self.repo}",
                f"--backend-directory={self.binary.parent.parent / 'backends'}",
                f"--http-address={HOST}", f"--http-port={self.http_port}",
                f"--grpc-address={HOST}", f"--grpc-port={self.grpc_port}",
                "--allow-metrics=false",  # its port would be one more to choose; stats suffice
                "--disable-auto-complete-config",  # serve config.pbtxt as written
                f"--exit-timeout-secs={EXIT_TIMEOUT_S}"]

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="tritonserver-"))
        try:
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(
                    self.command(), stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, env=server_environment(), cwd=self.workdir,
                    start_new_session=True)  # its stubs in its group
        except OSError as error:  # the log not writable, the binary not runnable
            self.stop()
            raise UserError(f"cannot start {self.binary} (log {self.log_path}): "
                            f"{error.strerror or error}") from None
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UserError(f"tritonserver exited ({self.process.returncode}) before it was "
                                f"ready: {self.log_error()}")
            if self.ready():
                return
            time.sleep(0.25)
        raise UserError(f"tritonserver was not ready after {timeout:.0f} s: {self.log_error()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready",
                                        timeout=2) as answer:
                return answer.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """SIGTERM, as Triton expects (it unloads its models and stops their stubs); the whole
        process group killed if it has not gone after its exit timeout."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(EXIT_TIMEOUT_S + 10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_error(self) -> str:
        """Triton's last error line (``E...``), not one of a machine with no GPU; else the log's
        last line: one line for a one-line error (the log itself goes with the server's folder
        unless --log keeps it)."""
        lines = []
        with contextlib.suppress(OSError):
            lines = self.log_path.read_text(errors="replace").splitlines()
        errors = [line for line in lines if line.startswith("E") and not any(
            gpu in line for gpu in ("CUDA", "CudaDriver"))]
        last = (errors or [line for line in lines if line.strip()] or ["its log is empty"])[-1]
        kept = ("; pass --log FILE to keep the whole log" if self._log_path is None
                else f"; the whole log: {self._log_path}")
        return last.strip()[:400] + kept

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m mra_export.serving.server",
                           description="Serve a model repository on 127.0.0.1 with the "
                           "tritonserver of 'make triton-server'.")
    parser.add_argument("--repo", required=True, help="the model repository (mra-export triton)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--log", help="the server's log file (default: a temporary file)")
    args = parser.parse_args(argv)
    # Ctrl-C, SIGTERM and a closed terminal all stop the server (it runs in a session of its
    # own, so that nothing but this process stops it): a plain SIGTERM would orphan it. A signal
    # ignored from the start (SIGHUP under nohup) stays ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for stopping in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(stopping) != signal.SIG_IGN:
            signal.signal(stopping, _raise_interrupt)
    try:
        server = TritonServer(args.repo, http_port=args.http_port, grpc_port=args.grpc_port,
                              log_path=args.log)
        _check_holds_a_model(server.repo, args.repo)
        with server:
            print(f"ready: http://{server.http_url} and grpc {server.grpc_url} (log: "
                  f"{server.log_path}); Ctrl-C stops it", flush=True)
            server.process.wait()
            print(f"tritonserver exited ({server.process.returncode}); its log ends:\n"
                  f"{server.log_tail()}", file=sys.stderr)
            return 1
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


def _check_holds_a_model(repo: Path, given: str) -> None:
    """Triton serves an empty repository (or an export folder) as ready, and every request then
    gets 404: refuse it before the server starts."""
    if not any(repo.glob(f"*/{CONFIG_FILE}")):
        raise UserError(f"model repository {given} holds no model (no */{CONFIG_FILE}); pass the "
                        "--repo that 'mra-export triton' wrote")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
