"""Shared fixtures: tiny demo checkpoints (built once per session) and real `bentoml serve` subprocesses."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where demo checkpoints live: MEDGEMMA_DEMO_DIR if set (CI caches it), else a session temp dir."""
    explicit = os.environ.get("MEDGEMMA_DEMO_DIR")
    return Path(explicit) if explicit else tmp_path_factory.mktemp("demo")


@pytest.fixture(scope="session")
def tiny_vlm(demo_root: Path) -> Path:
    from medgemma.demo import ensure_checkpoint

    return ensure_checkpoint("vlm", "tiny", root=demo_root)


@pytest.fixture(scope="session")
def tiny_text(demo_root: Path) -> Path:
    from medgemma.demo import ensure_checkpoint

    return ensure_checkpoint("text", "tiny", root=demo_root)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def bentoml_serve(
    env: dict[str, str],
    tmp_path: Path,
    *,
    port: int | None = None,
    pass_port: bool = True,
    ready_timeout: float = 120.0,
) -> Iterator[Server]:
    """Run `bentoml serve service:MedGemma` on a free port; yield once /readyz answers; always stop it.

    ``pass_port=False`` starts it without ``-p`` (and without BENTOML_CONFIG*), expecting it on ``port`` anyway:
    how the tests prove that configuration.yaml's port is applied by the service itself.
    """
    port = port or free_port()
    log_path = tmp_path / f"serve-{port}.log"
    inherited = {
        k: v for k, v in os.environ.items() if pass_port or not k.startswith(("BENTOML_PORT", "BENTOML_CONFIG"))
    }
    full_env = {
        **inherited,
        "BENTOML_HOME": str(tmp_path / "bentoml-home"),
        "BENTOML_DO_NOT_TRACK": "true",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bentoml",
                "serve",
                "service:MedGemma",
                *(["-p", str(port)] if pass_port else []),
                "--host",
                "127.0.0.1",
            ],
            cwd=ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    server = Server(url, proc, log_path)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {proc.returncode}:\n{server.log()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"bentoml serve not ready after {ready_timeout} s:\n{server.log()[-4000:]}")
            time.sleep(0.3)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def wait_for_model(url: str, app: str, timeout: float = 120.0) -> dict:
    """Poll /{app}/v1/health until the model is ready (or failed); return the last health body."""
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        body = httpx.get(f"{url}/{app}/v1/health", timeout=5).json()
        if body.get("model_state") in ("ready", "failed"):
            return body
        time.sleep(0.2)
    raise AssertionError(f"model not ready after {timeout} s: {body}")


# --- a real PACS (Debian's Orthanc + DICOMweb plugin), loaded once per session ----------------------------------------


def require_pacs() -> None:
    """Fail (CI) or skip (elsewhere) with the install command when Orthanc, its plugin or the dicomizer is missing."""
    from tests import pacs

    lacking = pacs.missing()
    if lacking:
        message = f"the PACS tests need {', '.join(lacking)} ({pacs.INSTALL})"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="session")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, object]]:
    """(Orthanc server, PacsData): the synthetic CT, MR, radiograph, report and slide, on a free loopback port."""
    require_pacs()
    from tests import pacs as pacs_lib

    work = tmp_path_factory.mktemp("orthanc")
    with pacs_lib.orthanc(work / "server") as server:
        yield server, pacs_lib.load_study_set(server, work / "data")
