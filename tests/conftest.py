"""Shared fixtures: tiny demo checkpoints (built once per session); real `bentoml serve` servers (devtools.server)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) does not put the checkout on sys.path
    sys.path.insert(0, str(ROOT))

from devtools.server import BentoServer, free_port, serve, wait_for_model  # noqa: E402

__all__ = ["Server", "bentoml_serve", "free_port", "wait_for_model"]


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


# One implementation for the tests, the benchmark and the soak (devtools/server.py). The names are re-exported here
# because the test modules import them from this file.
Server = BentoServer
bentoml_serve = serve
