"""A real ``tritonserver`` (from the ``nvidia-pytriton`` wheel) for the integration tier and the benchmark.

The server runs in explicit model-control mode on loopback ports, with a repository the test owns. The three
gotchas of running the wheel's binary by hand (see ``shared/real-servers.md``) are handled here:

* the Python backend's stub is kept per Python version apart in the wheel: we build a backends directory of
  our own under a temporary directory, with the backend library and the stub of *this* interpreter;
* the stub's embedded interpreter finds its site-packages through ``PATH``: the virtual environment's ``bin``
  goes first (otherwise it takes the base interpreter's numpy 2 and every output comes back empty);
* ``LD_LIBRARY_PATH`` points at this interpreter's own ``LIBDIR``, so that the stub loads the libpython that
  matches our standard library (then at the wheel's bundled libraries, which the copied stub no longer finds
  through its relative rpath).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.helpers import free_port


def pytriton_dir() -> Path:
    """``<site-packages>/pytriton/tritonserver``; raises ImportError when the wheel is not installed."""
    import pytriton

    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def unavailable_reason() -> str | None:
    """Why no server can start here (None when it can): used as the skip reason of the Triton tests."""
    try:
        base = pytriton_dir()
        import tritonclient.grpc  # noqa: F401
        import tritonclient.http  # noqa: F401
    except ImportError as exc:
        return f"the Triton extra is not installed (pip install '.[triton]'): {exc}"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for needed in (base / "bin" / "tritonserver", base / "python_backend_stubs" / version,
                   base / "backends" / "python" / "libtriton_python.so"):
        if not needed.exists():
            return f"the nvidia-pytriton wheel lacks {needed}"
    return None


class TritonServer:
    """``tritonserver --model-control-mode explicit`` on ``repository``, on free loopback ports.

    Args:
        repository: the model repository (the adapter under test writes into it).
        workdir: where the backends directory and the server log go (a new temporary directory by default).
    """

    def __init__(self, repository: Path, workdir: Path | None = None) -> None:
        self.repository = Path(repository)
        self.repository.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="triton-"))
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "tritonserver.log"
        self._log = None
        self.backends = self._backends_dir()

    # -- set-up ----------------------------------------------------------------------------------------------
    def _backends_dir(self) -> Path:
        base = pytriton_dir()
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        target = self.workdir / "backends" / "python"
        target.mkdir(parents=True, exist_ok=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(base / "backends" / "python" / name, target / name)
        shutil.copy2(base / "python_backend_stubs" / version / "triton_python_backend_stub",
                     target / "triton_python_backend_stub")
        return target.parent

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", "")])
        # NOTE: the copied stub and backend lose their $ORIGIN-relative rpath to the wheel's bundled libraries
        # (libcudart and friends), so that directory goes on the path too, after this interpreter's LIBDIR.
        bundled = pytriton_dir().parents[1] / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in [sysconfig.get_config_var("LIBDIR"), str(bundled), env.get("LD_LIBRARY_PATH", "")] if p)
        env.pop("PYTHONPATH", None)  # ignored by the stub anyway; keep the server's view simple
        return env

    def command(self) -> list[str]:
        return [str(pytriton_dir() / "bin" / "tritonserver"),
                "--model-repository", str(self.repository),
                "--model-control-mode", "explicit",
                "--backend-directory", str(self.backends),
                "--http-address", "127.0.0.1", "--http-port", str(self.http_port),
                "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc_port),
                "--metrics-address", "127.0.0.1", "--metrics-port", str(self.metrics_port),
                "--allow-metrics", "true", "--allow-gpu-metrics", "false",
                "--strict-readiness", "true", "--exit-timeout-secs", "5", "--log-verbose", "0"]

    # -- lifecycle -------------------------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 90.0) -> "TritonServer":
        """Start the server (on the same ports as before, after a stop) and wait until it is ready."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.command(), env=self.env(), stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        """Poll ``/v2/health/ready`` until it answers 200; fail with the log's tail at the deadline."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.health("ready"):
                return
            time.sleep(0.2)
        raise TimeoutError(f"tritonserver not ready after {timeout}s:\n{self.log_tail()}")

    def health(self, which: str = "ready") -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/{which}", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            return resp.read().decode()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``) and wait until the process has exited."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, timeout: float = 90.0) -> "TritonServer":
        self.stop()
        return self.start(timeout)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
