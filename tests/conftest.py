"""Shared fixtures: tiny demo checkpoints (built once per session); real `bentoml serve` servers (devtools.server)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
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
