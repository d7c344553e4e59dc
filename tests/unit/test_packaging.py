"""The Bento builds offline, its config matches the package, and the deployment config parses."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_bentofile_packages_match_pyproject():
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert sorted(bentofile["python"]["packages"]) == sorted(pyproject["project"]["dependencies"])
    assert bentofile["python"]["lock_packages"] is False  # offline builds
    assert bentofile["service"] == "service:MedGemma"


def test_deployment_config_parses():
    cfg = yaml.safe_load((ROOT / "deploy" / "bentocloud.yaml").read_text())
    svc = cfg["services"]["MedGemma"]
    assert svc["scaling"]["min_replicas"] == 0  # scale-to-zero
    assert svc["scaling"]["max_replicas"] >= 1
    assert svc["config_overrides"]["traffic"]["external_queue"] is True
    assert not any(e.get("name") == "HF_TOKEN" for e in cfg["envs"])  # the token is a secret, never a value
    from bentoml._internal.cloud.deployment import DeploymentConfigParameters  # noqa: F401  (exists offline)


def test_configuration_yaml_is_applied_by_the_service():
    from medgemma.config import load_bentoml_config

    section = load_bentoml_config(ROOT / "configuration.yaml")
    assert section["traffic"]["timeout"] == 600
    assert section["http"]["port"] == 3000


@pytest.mark.timeout(600)
def test_bentoml_build_offline(tmp_path):
    env = {
        **os.environ,
        "BENTOML_HOME": str(tmp_path / "home"),
        "BENTOML_DO_NOT_TRACK": "true",
        "MEDGEMMA_MODEL": "demo",
        "HF_HUB_OFFLINE": "1",
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `uv` from the venv
    proc = subprocess.run(  # noqa: PLW1510 - the return code is asserted with the output
        [sys.executable, "-m", "bentoml", "build", "."],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bentos = list((tmp_path / "home" / "bentos" / "medgemma").iterdir())
    bento = next(p for p in bentos if p.is_dir())
    for rel in (
        "src/service.py",
        "src/configuration.yaml",
        "src/medgemma/engine/scheduler.py",
        "env/docker/Dockerfile",
    ):
        assert (bento / rel).is_file(), rel
    assert not (bento / "src" / "tests").exists()
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "nvidia/cuda" in dockerfile
    assert "HF_TOKEN" not in (bento / "bento.yaml").read_text()
