"""Model lifecycle: unloaded → loading → ready | failed, a background loader, retry backoff and idle unload.

The server must answer while a 27B model takes minutes to load, so loading runs on a background thread and every
request that needs the model gets an immediate answer instead of waiting:

* loading or unloaded → ``ModelLoading`` (HTTP 202 + Retry-After); a request while unloaded starts the load;
* failed → ``ModelFailed`` (HTTP 503 with the stored error) until ``load_retry_backoff_s`` has passed, then the next
  request starts a retry and gets 202;
* ready → the engine.

Nothing is queued while loading: clients poll, as the seed's scale-to-zero contract says.
"""

from __future__ import annotations

import enum
import gc
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from medgemma.config import Settings
from medgemma.engine import Engine
from medgemma.errors import ModelFailed, ModelLoading, public_error
from medgemma.loader import LoadedModel, load_model
from medgemma.lora import LoraSet

log = logging.getLogger(__name__)


class ModelState(enum.StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


Loader = Callable[[Settings, Callable[[dict[str, Any]], None]], LoadedModel]


class ModelManager:
    """Owns the loaded model and its engine; thread-safe."""

    def __init__(
        self,
        settings: Settings,
        *,
        loader: Loader = load_model,
        on_state: Callable[[ModelState], None] | None = None,
        on_finish: Callable[[Any], None] | None = None,
        on_stats: Callable[[Any], None] | None = None,
    ) -> None:
        self.settings = settings
        self._loader = loader
        self._on_state = on_state
        self._on_finish = on_finish
        self._on_stats = on_stats
        self._lock = threading.RLock()
        self.state = ModelState.UNLOADED
        self.loaded: LoadedModel | None = None
        self.engine: Engine | None = None
        self.lora: LoraSet | None = None  # the adapters of the loaded model (MEDGEMMA_LORA_ADAPTERS)
        self.error: str | None = None  # the full load error: logs, model routes, authenticated /health
        self.error_summary: str | None = None  # class and message without paths, short: anyone's /health
        self.failed_at: float | None = None
        self.load_started_at: float | None = None
        self.load_seconds: float | None = None
        self.loads = 0
        self.progress: dict[str, Any] = {}
        self.last_used = time.monotonic()
        self._stop = threading.Event()
        self._idle_thread: threading.Thread | None = None

    # -- state changes
    def _set(self, state: ModelState) -> None:
        self.state = state
        if self._on_state:
            self._on_state(state)

    def start_loading(self) -> bool:
        """Start a background load unless one is running or the model is ready. True if a load was started."""
        with self._lock:
            if self.state in (ModelState.LOADING, ModelState.READY):
                return False
            self._set(ModelState.LOADING)
            self.error = self.error_summary = None
            self.load_started_at = time.monotonic()
            self.progress = {"phase": "starting"}
            self.loads += 1
        threading.Thread(target=self._load, name="medgemma-loader", daemon=True).start()
        self._ensure_idle_watcher()
        return True

    def _report(self, update: dict[str, Any]) -> None:
        with self._lock:
            self.progress = {**self.progress, **update}
        if "files_loaded" in update:
            log.info(
                "loading weights: %s/%s files, %.1f/%.1f MB",
                update["files_loaded"],
                update["files_total"],
                update.get("bytes_loaded", 0) / 1e6,
                update.get("bytes_total", 0) / 1e6,
            )
        else:
            log.info("load phase: %s", update.get("phase"))

    def _load(self) -> None:
        try:
            loaded = self._loader(self.settings, self._report)
            lora = self._lora_set(loaded)
            engine = Engine(
                loaded,
                max_batch_size=self.settings.max_batch_size,
                max_queue=self.settings.max_queue,
                kv_cache_bytes=self.settings.kv_cache_mb * 2**20 or None,
                kv_block_size=self.settings.kv_block_size,
                prefill_chunk_tokens=self.settings.prefill_chunk_tokens,
                prefill_share=self.settings.prefill_share,
                decode_graphs=self.settings.cuda_graphs,
                on_finish=self._on_finish,
                on_stats=self._on_stats,
                lora=lora,
            )
            engine.start()
        except BaseException as exc:  # a load error of any kind must be stored, never crash the server
            message = f"{type(exc).__name__}: {exc}".strip()
            log.error("model loading failed: %s", message)
            with self._lock:
                self.error = message[:2000]
                self.error_summary = public_error(exc)
                self.failed_at = time.monotonic()
                self._set(ModelState.FAILED)
            return
        with self._lock:
            self.loaded, self.engine, self.lora = loaded, engine, lora
            self.load_seconds = time.monotonic() - (self.load_started_at or time.monotonic())
            self.last_used = time.monotonic()
            self.progress = {"phase": "ready"}
            self._set(ModelState.READY)
        log.info("model ready after %.1f s", self.load_seconds)
        if lora is not None:
            # The base serves from now on; adapters load one by one behind it, each failing alone.
            threading.Thread(target=self._load_adapters, args=(lora,), name="medgemma-lora", daemon=True).start()

    def _lora_set(self, loaded: LoadedModel) -> LoraSet | None:
        specs = self.settings.lora_adapter_specs
        if not specs:
            return None
        lora = LoraSet(
            loaded.model,
            max_adapters=self.settings.max_lora_adapters,
            max_rank=self.settings.max_lora_rank,
            token=self.settings.hf_token or None,
        )
        for name, source in specs:
            lora.register(name, source)
        return lora

    def _load_adapters(self, lora: LoraSet) -> None:
        for name in list(lora.adapters):
            if self.lora is not lora:  # the model was unloaded meanwhile: its adapters go with it
                return
            lora.load(name)

    def unload(self, reason: str = "requested", *, idle_for: float | None = None) -> bool:
        """Stop the engine and free the model's memory (GPU memory too). True if something was unloaded.

        With ``idle_for``, unload only if the model is still idle that long and has no work, checked under the lock
        that ``require`` takes, so a request that just passed the gate is never cut off."""
        with self._lock:
            if self.state is not ModelState.READY or self.engine is None:
                return False
            if idle_for is not None:
                stats = self.engine.stats()
                if stats.waiting or stats.running or time.monotonic() - self.last_used < idle_for:
                    return False
            engine, self.engine, self.loaded, self.lora = self.engine, None, None, None
            self._set(ModelState.UNLOADED)
        engine.stop(grace_s=0)
        del engine
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass
        log.info("model unloaded (%s)", reason)
        return True

    def shutdown(self, grace_s: float = 0.0) -> None:
        self._stop.set()
        with self._lock:
            engine = self.engine
        if engine is not None:
            engine.stop(grace_s=grace_s)

    # -- what requests see
    def require(self) -> Engine:
        """The engine, or the 202/503 answer a request gets instead. Starts a load when there is none."""
        with self._lock:
            if self.state is ModelState.READY and self.engine is not None:
                self.last_used = time.monotonic()
                return self.engine
            if self.state is ModelState.FAILED:
                waited = time.monotonic() - (self.failed_at or 0.0)
                remaining = self.settings.load_retry_backoff_s - waited
                if remaining > 0:
                    raise ModelFailed(self.error or "unknown error", retry_after=max(1, int(remaining + 0.999)))
            started = self.start_loading()
        raise self.loading_error(started)

    def loading_error(self, started: bool = False) -> ModelLoading:
        wait = self.settings.loading_retry_after_s
        what = "started loading" if started else "is loading"
        message = f"The model {what} in the background; retry in {wait} seconds"
        return ModelLoading(message, retry_after=wait, progress=self.progress_view())

    def progress_view(self) -> dict[str, Any]:
        with self._lock:
            view = dict(self.progress)
            if self.state is ModelState.LOADING and self.load_started_at is not None:
                view["elapsed_seconds"] = round(time.monotonic() - self.load_started_at, 1)
            total = view.get("bytes_total")
            if total:
                view["fraction"] = round(view.get("bytes_loaded", 0) / total, 3)
        return view

    # -- idle unload
    def _ensure_idle_watcher(self) -> None:
        if self.settings.idle_unload_s <= 0 or self._idle_thread is not None:
            return
        self._idle_thread = threading.Thread(target=self._watch_idle, name="medgemma-idle", daemon=True)
        self._idle_thread.start()

    def _watch_idle(self) -> None:
        period = max(0.05, min(5.0, self.settings.idle_unload_s / 4))
        while not self._stop.wait(period):
            with self._lock:
                engine = self.engine
                idle = time.monotonic() - self.last_used
            if engine is None:
                continue
            busy = engine.stats().waiting or engine.stats().running
            del engine  # hold no reference across unload(): it must be able to free the model
            if busy:
                with self._lock:
                    self.last_used = time.monotonic()
            elif idle >= self.settings.idle_unload_s:
                self.unload(reason=f"idle for {idle:.0f} s", idle_for=self.settings.idle_unload_s)
