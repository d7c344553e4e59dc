"""deploy_medgemma.sh: binds loopback unless told otherwise, and prints the address it really binds."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.e2e


def _listening(port: int) -> set[str]:
    return {
        c.laddr.ip
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
    }


@pytest.mark.parametrize(
    ("args", "bound", "printed"),
    [
        ([], "127.0.0.1", "http://127.0.0.1:{port}/medgemma-demo-tiny-it/v1/"),
        (["--host", "0.0.0.0"], "0.0.0.0", "listening on all interfaces (0.0.0.0, port {port})"),
    ],
)
def test_deploy_binds_and_prints_its_host(tiny_vlm: Path, tmp_path: Path, args, bound, printed):
    venv = Path(sys.executable).parent.parent
    if not (venv / "bin" / "activate").exists():
        pytest.skip("the deploy script activates a virtual environment; these tests do not run in one")
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "VENV": str(venv),  # the script activates this environment
        "PORT": str(port),
        "MEDGEMMA_DEMO_DIR": str(tiny_vlm.parent),
        "BENTOML_HOME": str(tmp_path / "bentoml-home"),
        "BENTOML_DO_NOT_TRACK": "true",
        "HF_HUB_OFFLINE": "1",
    }
    log = tmp_path / "deploy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["bash", str(ROOT / "deploy_medgemma.sh"), "--demo", "--no-install", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so the whole server stops with it
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2, trust_env=False).status_code == 200:
                    break
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        assert _listening(port) == {bound}
        head = log.read_text().splitlines()[:2]
        assert any(printed.format(port=port) in line for line in head), head
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
