"""A real TorchServe 0.12 for the tests (``shared/real-servers.md``): loopback ports, token authorization on.

TorchServe starts a Java frontend that forks one Python worker per model worker; it runs here in a session of its
own, so that :meth:`TorchServeServer.stop` takes the whole process group down. With token authorization on (the
default of 0.12) it writes ``key_file.json`` into its working directory: :attr:`key_file` is what the adapter's
``TORCHSERVE_KEY_FILE`` points at.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tests.helpers import free_port, wait_for


def unavailable_reason() -> str | None:
    """Why no TorchServe can start here (None when it can): the skip reason of the TorchServe tests."""
    if shutil.which("java") is None:
        return "TorchServe needs Java 17 (java is not on PATH)"
    bin_dir = Path(sys.executable).parent
    for tool in ("torchserve", "torch-model-archiver"):
        if not (bin_dir / tool).exists():
            return f"the torchserve extra is not installed (pip install '.[torchserve]'): no {tool}"
    try:
        import yaml  # noqa: F401  (TorchServe's Python worker needs it)
    except ImportError:
        return "pyyaml is missing (the torchserve extra installs it)"
    return None


class TorchServeServer:
    """``torchserve --foreground`` on ``model_store`` with generated ``config.properties`` on free ports."""

    def __init__(self, model_store: Path, workdir: Path | None = None) -> None:
        self.model_store = Path(model_store)
        self.model_store.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="torchserve-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.inference_port, self.management_port, self.metrics_port = free_port(), free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "torchserve.log"
        self._log = None
        # NOTE: TorchServe keeps its pid file (``torchserve --start`` refuses to run while the one it names is alive)
        # and its workers' unix sockets (``.ts.sock.9000`` ...) in the temp directory: two servers on one machine,
        # e.g. two test runs, collide there unless each has its own. Short, for the sockets' 108-byte path limit.
        self.tmpdir = Path(tempfile.mkdtemp(prefix="ts-tmp-"))

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.inference_port}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    @property
    def key_file(self) -> Path:
        return self.workdir / "key_file.json"

    def keys(self) -> dict[str, str]:
        """The tokens TorchServe wrote: ``{"management": ..., "inference": ...}``."""
        doc = json.loads(self.key_file.read_text())
        return {name: doc[name]["key"] for name in ("management", "inference")}

    def _config(self) -> Path:
        path = self.workdir / "config.properties"
        path.write_text("\n".join([
            f"inference_address={self.inference_url}", f"management_address={self.management_url}",
            f"metrics_address=http://127.0.0.1:{self.metrics_port}", "enable_model_api=true",
            "install_py_dep_per_model=false", "default_workers_per_model=1", "default_response_timeout=60",
            "disable_system_metrics=true"]) + "\n")
        return path

    def env(self) -> dict[str, str]:
        env = dict(os.environ, LOG_LOCATION=str(self.workdir / "logs"), METRICS_LOCATION=str(self.workdir / "logs"),
                   OMP_NUM_THREADS="1", TMPDIR=str(self.tmpdir), TEMP=str(self.tmpdir))
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def start(self, timeout: float = 120.0) -> "TorchServeServer":
        """Start the server (on the same ports after a stop) and wait until ``/ping`` answers and keys exist."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.key_file.unlink(missing_ok=True)  # a new start writes new tokens
        self._log = open(self.log_path, "a")
        argv = [str(Path(sys.executable).parent / "torchserve"), "--start", "--ncs", "--foreground",
                "--model-store", str(self.model_store), "--ts-config", str(self._config())]
        self.proc = subprocess.Popen(argv, env=self.env(), cwd=self.workdir, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        proc = self.proc
        try:
            wait_for(lambda: proc.poll() is not None or (self.key_file.is_file() and self.ping()), timeout,
                     "torchserve to answer /ping", interval=0.2)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}:\n{self.log_tail()}") from None
        if proc.poll() is not None:
            raise RuntimeError(f"torchserve exited with {proc.returncode}:\n{self.log_tail()}")
        return self

    def ping(self) -> bool:
        """``/ping`` answers 200 (with token authorization on, it too needs the inference token)."""
        try:
            headers = {"Authorization": f"Bearer {self.keys()['inference']}"} if self.key_file.is_file() else {}
        except (OSError, ValueError, KeyError):  # being written
            return False
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{self.inference_url}/ping", headers=headers),
                                        timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def management(self, method: str, path: str) -> tuple[int, object]:
        """One call to the management API with the management token; (status, decoded JSON body)."""
        request = urllib.request.Request(f"{self.management_url}{path}", method=method,
                                         headers={"Authorization": f"Bearer {self.keys()['management']}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            body = err.read()
            try:
                return err.code, json.loads(body or b"null")
            except ValueError:
                return err.code, body.decode(errors="replace")

    def registered(self) -> set[str]:
        status, body = self.management("GET", "/models")
        assert status == 200, body
        return {m["modelName"] for m in body["models"]}  # type: ignore[index]

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the process group (frontend and Python workers), SIGKILL after ``timeout``; wait for the exit."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.proc is not None:
            try:  # workers forked by the frontend share its group; make sure none outlives it
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Stop for good: the server, then its private temp directory."""
        self.stop()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def restart(self, timeout: float = 120.0) -> "TorchServeServer":
        self.stop()
        return self.start(timeout)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            text = ""
        return text[-chars:]
