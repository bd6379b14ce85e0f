"""Run the `tritonserver` bundled in the nvidia-pytriton wheel on this machine (CPU, Python backend only).

For tests, benchmarks and trying a repository out; production serving uses NVIDIA's Triton container
(docs/triton.md). pytriton needs numpy<2, so it lives in a venv of its own (scripts/test.sh makes
.venv-triton): this module only starts that venv's binary as a child process, it never imports pytriton.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from ..errors import RWKVDeployError

VENV_ENV = "RWKV_TRITON_VENV"  # where the Triton venv is, when not ./.venv-triton


def triton_venv(path: str | Path | None = None) -> Path | None:
    """The venv holding nvidia-pytriton (argument, else $RWKV_TRITON_VENV, else ./.venv-triton), or None."""
    venv = Path(path or os.environ.get(VENV_ENV) or Path.cwd() / ".venv-triton").absolute()
    return venv if (venv / "bin" / "python").is_file() and _dist(venv) is not None else None


def _dist(venv: Path) -> Path | None:
    """pytriton's tritonserver folder inside the venv."""
    found = sorted(venv.glob("lib/python3*/site-packages/pytriton/tritonserver/bin/tritonserver"))
    return found[0].parent.parent if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalTriton:
    """tritonserver on 127.0.0.1 (free ports) serving `repository`; a context manager that always stops it.

        with LocalTriton(repo, venv) as server:
            server.http_url, server.grpc_url
    """

    def __init__(self, repository: str | Path, venv: str | Path | None = None, *, log_verbose: int = 0,
                 timeout: float = 120.0):
        self.repository, self.timeout, self.log_verbose = Path(repository).absolute(), timeout, log_verbose
        found = triton_venv(venv)
        if found is None:
            raise RWKVDeployError(f"no venv with nvidia-pytriton at {venv or os.environ.get(VENV_ENV) or '.venv-triton'}"
                                  " (scripts/test.sh creates .venv-triton)")
        self.venv, self.dist = found, _dist(found)
        self.proc: subprocess.Popen | None = None
        self.workdir: Path | None = None

    def _backends(self) -> Path:
        """A backend folder as tritonserver wants it: the Python backend's library with the stub built for the
        venv's Python (pytriton ships one stub per Python version beside it)."""
        version = self._python("import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
        stub = self.dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise RWKVDeployError(f"pytriton has no Python backend stub for Python {version} ({stub})")
        python = self.workdir / "backends" / "python"
        python.mkdir(parents=True)
        for f in (self.dist / "backends" / "python").iterdir():
            if f.is_file():
                os.symlink(f, python / f.name)
        shutil.copy(stub, python / stub.name)  # the backend looks for the stub beside its library
        return python.parent

    def _python(self, code: str) -> str:
        python = self.venv / "bin" / "python"
        try:
            r = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
        except OSError as e:
            raise RWKVDeployError(f"cannot run {python} ({e.strerror or e}); recreate the venv (scripts/test.sh)")
        if r.returncode != 0:
            raise RWKVDeployError(f"{python} failed (exit {r.returncode}): {r.stderr.strip()[-500:] or 'no output'}; "
                                  "recreate the venv (scripts/test.sh)")
        return r.stdout.strip()

    def _env(self) -> dict:
        env = dict(os.environ)
        # The stub embeds libpython: it must be the venv's own Python's (another 3.11 build may sit in /usr/lib),
        # and it finds the venv's site-packages through the `python` first on PATH.
        libdir = self._python("import sysconfig; print(sysconfig.get_config_var('LIBDIR'))")
        # The copied stub lost its relative rpath to the wheel's vendored libraries (libcudart...): name them.
        libs = self.dist.parent.parent / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(libs), env.get("LD_LIBRARY_PATH")) if p)
        env["PATH"] = os.pathsep.join((str(self.venv / "bin"), env.get("PATH", "")))
        env["VIRTUAL_ENV"] = str(self.venv)
        return env

    def start(self) -> "LocalTriton":
        try:  # any failure, from the first step on, removes the work folder (and the server, once started)
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="rwkv-triton-"))
        self.http_port, self.grpc_port = free_port(), free_port()
        self.http_url, self.grpc_url = f"127.0.0.1:{self.http_port}", f"127.0.0.1:{self.grpc_port}"
        self.log_path = self.workdir / "tritonserver.log"
        cmd = [str(self.dist / "bin" / "tritonserver"), f"--model-repository={self.repository}",
               f"--backend-directory={self._backends()}", f"--cache-directory={self.workdir / 'caches'}",
               "--http-address=127.0.0.1", f"--http-port={self.http_port}",
               "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
               "--allow-metrics=false", "--allow-sagemaker=false", "--allow-vertex-ai=false",
               f"--log-verbose={self.log_verbose}", "--exit-on-error=true", "--strict-readiness=true"]
        if shutil.which("setpriv"):  # Linux: the server gets SIGTERM if this process dies without stopping it
            cmd = ["setpriv", "--pdeathsig", "TERM", "--", *cmd]
        env = self._env()
        with open(self.log_path, "wb") as log:
            # its own process group: the Python backend's stub processes go with the server when it is stopped
            try:
                self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True, cwd=self.workdir)
            except OSError as e:
                raise RWKVDeployError(f"cannot start {cmd[0]} ({e.strerror or e}); recreate the venv (scripts/test.sh)")
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RWKVDeployError(f"tritonserver exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise RWKVDeployError(f"tritonserver was not ready after {self.timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM to the server's pid (it shuts its stubs down), SIGKILL to its process group if it hangs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group this class created for it
                self.proc.wait()
        if self.proc is not None:
            try:  # stubs left behind by a server that died: same group, ours
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> "LocalTriton":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
