"""ModelManager with the real loader: 202 with progress during a load, stored errors with backoff, idle unload."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest

from medgemma.config import Settings
from medgemma.errors import ModelFailed, ModelLoading
from medgemma.lifecycle import ModelManager, ModelState
from medgemma.loader import load_model


def wait_state(m: ModelManager, *states: ModelState, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while m.state not in states:
        assert time.monotonic() < deadline, f"still {m.state}"
        time.sleep(0.02)


def test_loading_answer_shows_progress(tiny_vlm):
    """Pause the real loader once it reports weight-loading progress, and look at the 202 a request gets then."""
    reached, release = threading.Event(), threading.Event()

    def paused_loader(settings, progress):
        def report(update):
            progress(update)
            if update.get("files_loaded"):
                reached.set()
                release.wait(30)

        return load_model(settings, report)

    m = ModelManager(Settings(model=str(tiny_vlm), loading_retry_after_s=3), loader=paused_loader)
    with pytest.raises(ModelLoading) as first:
        m.require()  # unloaded: this request starts the load
    assert first.value.status_code == 202
    assert first.value.headers["Retry-After"] == "3"
    assert reached.wait(60)
    with pytest.raises(ModelLoading) as during:
        m.require()
    body = during.value.body()
    assert body["status"] == "loading"
    assert body["error"] == "Model not loaded yet"
    progress = body["progress"]
    assert progress["phase"] == "loading weights"
    assert progress["files_loaded"] == progress["files_total"] == 1
    assert progress["bytes_loaded"] == progress["bytes_total"] > 0
    assert progress["fraction"] == 1.0
    assert progress["elapsed_seconds"] >= 0
    release.set()
    wait_state(m, ModelState.READY)
    assert m.require() is m.engine
    m.shutdown()


def test_failed_load_is_stored_then_retried_after_backoff(tmp_path):
    missing = tmp_path / "no-such-model"
    m = ModelManager(Settings(model=str(missing), load_retry_backoff_s=0.5))
    with pytest.raises(ModelLoading):
        m.require()
    wait_state(m, ModelState.FAILED)
    with pytest.raises(ModelFailed) as failed:
        m.require()
    body = failed.value.body()
    assert failed.value.status_code == 503
    assert body["status"] == "failed"
    assert body["error"].startswith("Model loading failed: ")
    assert str(missing) in body["loading_error"]
    assert "does not exist" in body["loading_error"]
    # What /health shows to anyone: class and message, without the path.
    assert m.error_summary == "FileNotFoundError: model directory <path> does not exist"
    time.sleep(0.6)
    with pytest.raises(ModelLoading):  # backoff over: this request starts a retry
        m.require()
    wait_state(m, ModelState.FAILED)
    assert m.loads == 2


def test_idle_unload_frees_the_model(tiny_text):
    m = ModelManager(Settings(model=str(tiny_text), idle_unload_s=0.3))
    m.start_loading()
    wait_state(m, ModelState.READY)
    model_ref = weakref.ref(m.loaded.model)
    wait_state(m, ModelState.UNLOADED, timeout=10)
    assert m.engine is None and m.loaded is None
    gc.collect()
    assert model_ref() is None, "the unloaded model is still referenced somewhere"
    with pytest.raises(ModelLoading):
        m.require()  # the next request reloads
    wait_state(m, ModelState.READY)
    assert m.loads == 2
    m.shutdown()


def _broken_copy(src, dst, how: str):
    import json
    import shutil

    shutil.copytree(src, dst)
    if how == "corrupt-safetensors":
        for f in dst.glob("*.safetensors"):
            f.write_bytes(b"\x00garbage, not a safetensors header" * 10)
    elif how == "unknown-architecture":
        cfg = json.loads((dst / "config.json").read_text())
        cfg["model_type"] = "definitely_not_a_model"
        (dst / "config.json").write_text(json.dumps(cfg))
    elif how == "missing-weights":
        for f in dst.glob("*.safetensors"):
            f.unlink()
    return dst


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("corrupt-safetensors", "could not load the weights"),
        ("unknown-architecture", "could not read the model config"),
        ("missing-weights", "could not load the weights"),
    ],
)
def test_broken_checkpoints_fail_with_a_stored_error(tiny_vlm, tmp_path, how, expected):
    broken = _broken_copy(tiny_vlm, tmp_path / "ckpt", how)
    m = ModelManager(Settings(model=str(broken), load_retry_backoff_s=60))
    m.start_loading()
    wait_state(m, ModelState.FAILED, ModelState.READY)
    assert m.state is ModelState.FAILED
    with pytest.raises(ModelFailed) as info:
        m.require()
    error = info.value.body()["loading_error"]
    assert expected in error
    assert str(broken) in error
    assert int(info.value.headers["Retry-After"]) > 50
