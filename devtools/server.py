"""Start a real ``bentoml serve service:MedGemma`` on a free port, for the tests, the benchmark and the soak.

One implementation of what all three need: the environment (a temporary ``BENTOML_HOME``, tracking off, offline
Hugging Face, unbuffered output), the server's output captured in a log file, readiness polling that fails fast
with the log's tail when the process dies, and a stop that leaves no process behind (``bentoml serve`` runs its
worker in a process of its own, so the whole process tree is remembered and killed if a graceful stop hangs).

    with serve({"MEDGEMMA_MODEL": str(checkpoint)}, tmp_path) as server:
        health = server.wait_for_model("medgemma-demo-tiny-it")
        httpx.post(f"{server.url}/medgemma-demo-tiny-it/v1/generate", json={"text": "hi"})

Polling uses ``trust_env=False``: a proxy from the environment must never see loopback traffic.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A port nobody listens on right now (the kernel's choice; another process could still take it first)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BentoServer:
    """One ``bentoml serve`` subprocess: ``start``, wait (``wait_ready`` / ``wait_for_model``), ``stop``.

    ``env`` is applied over the inherited environment and the defaults (``BENTOML_HOME`` under ``workdir``,
    ``BENTOML_DO_NOT_TRACK``, ``HF_HUB_OFFLINE``, ``PYTHONUNBUFFERED``). ``pass_port=False`` starts the server
    without ``-p`` and without the inherited ``BENTOML_PORT``/``BENTOML_CONFIG*``, still expecting it on ``port``:
    how the tests prove that configuration.yaml's port is applied by the service itself. ``new_session`` puts the
    server in a session of its own, so a Ctrl-C in the caller's terminal reaches only the caller (the benchmark
    then stops the server itself).
    """

    def __init__(
        self,
        workdir: Path,
        env: Mapping[str, str] | None = None,
        *,
        port: int | None = None,
        host: str = LOOPBACK,
        pass_port: bool = True,
        cwd: Path = ROOT,
        service: str = "service:MedGemma",
        new_session: bool = False,
    ) -> None:
        self.workdir = Path(workdir)
        self.host = host
        self.port = port or free_port(LOOPBACK if host in ("0.0.0.0", "::") else host)
        self.pass_port = pass_port
        self.cwd = cwd
        self.service = service
        self.new_session = new_session
        self.url = f"http://{LOOPBACK if host in ('0.0.0.0', '::') else host}:{self.port}"
        self.log_path = self.workdir / f"serve-{self.port}.log"
        inherited = {
            k: v for k, v in os.environ.items() if pass_port or not k.startswith(("BENTOML_PORT", "BENTOML_CONFIG"))
        }
        self.env = {
            **inherited,
            "BENTOML_HOME": str(self.workdir / "bentoml-home"),
            "BENTOML_DO_NOT_TRACK": "true",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self._tree: dict[int, psutil.Process] = {}

    # -- start and wait
    def command(self) -> list[str]:
        port = ["-p", str(self.port)] if self.pass_port else []
        return [sys.executable, "-m", "bentoml", "serve", self.service, *port, "--host", self.host]

    def start(self) -> BentoServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.new_session,
            )
        return self

    def _check_alive(self) -> None:
        if self.proc is None:
            raise RuntimeError("the server was not started")
        if self.proc.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {self.proc.returncode}:\n{self.log_tail()}")

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until ``/readyz`` answers 200 (the replica answers; the model may still be loading)."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2, trust_env=False).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"bentoml serve not ready after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.3)

    def wait_for_model(self, app: str, timeout: float = 120.0) -> dict[str, Any]:
        """Poll ``/{app}/v1/health`` until the model is ready or failed; return that health body."""
        return wait_for_model(self.url, app, timeout, alive=self._check_alive, log_tail=self.log_tail)

    # -- what it did
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 4000) -> str:
        return self.log()[-n:]

    def processes(self) -> list[psutil.Process]:
        """The server's process tree as it is now (``bentoml serve`` and its workers); remembered for ``stop``."""
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return []
        self._tree.update({p.pid: p for p in tree})
        return tree

    def rss_bytes(self) -> int:
        """Resident memory of the whole process tree."""
        total = 0
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    # -- stop
    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (the service drains and shuts down), then SIGKILL whatever of the tree is left."""
        if self.proc is None:
            return
        self.processes()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                print(f"bentoml serve did not stop in {timeout:.0f} s; killing it", file=sys.stderr)
        self.kill()

    def kill(self) -> None:
        """SIGKILL every process of this server's tree (psutil refuses pids that were reused meanwhile)."""
        if self.proc is None:
            return
        self.processes()
        for p in self._tree.values():
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


@contextlib.contextmanager
def serve(
    env: Mapping[str, str],
    workdir: Path,
    *,
    ready_timeout: float = 120.0,
    **options: Any,
) -> Iterator[BentoServer]:
    """Start a server (options as ``BentoServer``), yield it once ``/readyz`` answers, always stop it.

    BentoML picks its internal (circus/ZeroMQ) ports by probing for free ones and binding them later, so another
    process can take one in between; a start that fails with "Address already in use" is tried once more."""
    for attempt in (1, 2):
        server = BentoServer(workdir, env, **options).start()
        try:
            server.wait_ready(ready_timeout)
            break
        except RuntimeError:
            server.stop()
            if attempt == 1 and "Address already in use" in server.log():
                continue
            raise
    try:
        yield server
    finally:
        server.stop()


def wait_for_model(
    url: str,
    app: str,
    timeout: float = 120.0,
    *,
    alive: Callable[[], None] | None = None,
    log_tail: Callable[[], str] | None = None,
) -> dict[str, Any]:
    """Poll ``/{app}/v1/health`` until the model is ready or failed; return that health body.

    ``alive`` raises when the server process is gone (checked every round), ``log_tail`` adds the server's log to
    the timeout error.
    """
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while True:
        if alive is not None:
            alive()
        with contextlib.suppress(httpx.HTTPError, ValueError):
            r = httpx.get(f"{url}/{app}/v1/health", timeout=5, trust_env=False)
            if r.status_code == 200:
                body = r.json()
                if body.get("model_state") in ("ready", "failed"):
                    return body
        if time.monotonic() > deadline:
            tail = f":\n{log_tail()}" if log_tail is not None else ""
            raise RuntimeError(f"model not ready after {timeout:.0f} s (last health: {body}){tail}")
        time.sleep(0.2)
