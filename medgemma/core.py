"""The service's behaviour, independent of the transport: what generate, schema, health and models answer.

``service.py`` (BentoML APIs) and ``medgemma.routes`` (the mounted GET/OpenAI routes) both call this object, so
every route shares one validation path, one lifecycle gate and one error type (``ServiceError``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from medgemma import answer, discovery, google_api, inputs, openai_api, sources
from medgemma.config import Settings
from medgemma.engine import Engine, RequestHandle
from medgemma.errors import EngineUnavailable, ServiceError, error_body
from medgemma.lifecycle import ModelManager, ModelState
from medgemma.protocol import GenerationRequest, GenerationResult
from medgemma.schemas import GenerateRequest, parse_model
from medgemma.telemetry import Metrics, compute_metrics, note_access

log = logging.getLogger("medgemma.requests")

Disconnected = Callable[[], Awaitable[bool]]


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its batch slot was freed."""


class MedGemmaCore:
    def __init__(self, settings: Settings, *, manager: ModelManager | None = None) -> None:
        self.settings = settings
        self.started_at = time.time()
        self._started_mono = time.monotonic()
        self.manager = manager or ModelManager(
            settings, on_state=self._state_changed, on_finish=self._request_finished, on_stats=self._engine_stats
        )

    # -- lifecycle hooks
    def _state_changed(self, state: ModelState) -> None:
        try:
            metrics = Metrics.get()
            metrics.set_state(state.value)
            if state is ModelState.READY and self.manager.load_seconds is not None:
                metrics.load_duration.set(self.manager.load_seconds)
        except Exception:  # metrics must never break the lifecycle
            log.debug("metrics update failed", exc_info=True)

    def _request_finished(self, handle: RequestHandle) -> None:
        if handle.result is not None:
            Metrics.get().observe_result(handle.result)

    def _engine_stats(self, stats: Any) -> None:
        metrics = Metrics.get()
        metrics.waiting.set(stats.waiting)
        metrics.running.set(stats.running)
        metrics.set_kv(stats.kv)

    def count_response(self, route: str, status: int) -> None:
        """Called by the edge middleware once per answered request."""
        Metrics.get().requests.labels(route=route, status=str(status)).inc()

    def startup(self) -> None:
        self._state_changed(self.manager.state)
        if self.settings.load_on_startup:
            self.manager.start_loading()

    def shutdown(self, grace_s: float = 0.0) -> None:
        self.manager.shutdown(grace_s)

    # -- graceful drain (SIGTERM)
    draining = False

    def drain(self, then: Callable[[], None]) -> None:
        """Stop intake (model routes answer 503 + Retry-After), let in-flight requests finish for up to
        ``shutdown_grace_s``, cancel what is left, then call ``then`` (the server's own shutdown)."""
        if self.draining:
            then()
            return
        self.draining = True
        log.info(
            "draining: refusing new requests, waiting up to %.0f s for running ones", self.settings.shutdown_grace_s
        )

        def wait() -> None:
            time.sleep(0.2)  # requests already past the gate are being prepared: let them reach the engine
            deadline = time.monotonic() + self.settings.shutdown_grace_s
            while time.monotonic() < deadline and self.busy():
                time.sleep(0.05)
            left = self.busy()
            self.manager.shutdown(grace_s=0.0)
            log.info("drained; %d requests still running were cancelled", left)
            then()

        threading.Thread(target=wait, name="medgemma-drain", daemon=True).start()

    def busy(self) -> int:
        engine = self.manager.engine
        if engine is None:
            return 0
        st = engine.stats()
        return st.waiting + st.running

    @property
    def model_name(self) -> str:
        return discovery.public_model_name(self.manager.loaded, self.settings)

    # -- generation (shared by every API)
    async def submit(
        self,
        build: Callable[[Engine], GenerationRequest],
        *,
        stream: bool = True,
        adapter_param: str = "adapter",
    ) -> tuple[GenerationRequest, RequestHandle]:
        """Gate on the model's state, build the internal request off the event loop, and queue it."""
        if self.draining:
            raise EngineUnavailable("the server is shutting down; retry on another replica", retry_after=5)
        engine = self.manager.require()
        # Image decoding and the processor are CPU work: keep them off the event loop.
        req = await asyncio.to_thread(build, engine)
        if self.settings.lora_adapters:
            note_access("adapter", req.adapter or "base")
        try:
            prepared = await asyncio.to_thread(engine.prepare, req)
        except ServiceError as exc:
            if exc.param == "adapter":  # an adapter still loading or failed: name the field this API calls it
                exc.param = adapter_param
            raise
        return req, engine.submit(prepared, stream=stream)

    async def run(
        self,
        build: Callable[[Engine], GenerationRequest],
        disconnected: Disconnected | None = None,
        *,
        adapter_param: str = "adapter",
    ) -> tuple[GenerationRequest, GenerationResult]:
        req, handle = await self.submit(build, stream=False, adapter_param=adapter_param)
        return req, await wait_or_cancel(handle, disconnected)

    def seed_builder(self, req: GenerateRequest, request_id: str | None) -> Callable[[Engine], GenerationRequest]:
        def build(engine: Engine) -> GenerationRequest:
            return inputs.from_seed(req, self.settings, vision=engine.loaded.vision, request_id=request_id)

        return build

    def parse_seed(self, payload: GenerateRequest | dict[str, Any]) -> GenerateRequest:
        """A request the transport already validated (BentoML parses with ``GenerateRequest``) is used as it is;
        a plain dict (in-process callers) is validated here."""
        return payload if isinstance(payload, GenerateRequest) else parse_model(GenerateRequest, payload)

    async def generate(
        self,
        payload: GenerateRequest | dict[str, Any],
        *,
        request_id: str | None = None,
        disconnected: Disconnected | None = None,
    ) -> dict[str, Any]:
        started = time.perf_counter()
        req = self.parse_seed(payload)
        greq, result = await self.run(self.seed_builder(req, request_id), disconnected)
        self._log_result(greq, result, "generate")
        return self.seed_body(greq, result, started)

    async def generate_stream(
        self, payload: GenerateRequest | dict[str, Any], *, request_id: str | None = None
    ) -> AsyncIterator[str]:
        """Validate and queue first (so errors are proper HTTP answers), then return the SSE event stream."""
        started = time.perf_counter()
        req = self.parse_seed(payload)
        greq, handle = await self.submit(self.seed_builder(req, request_id))

        async def events() -> AsyncIterator[str]:
            channels = answer.AnswerStream(greq)

            def pieces(part: Any) -> list[str]:
                out = [sse({"status": "streaming", "thinking_delta": part.thinking})] if part.thinking else []
                return out + ([sse({"status": "streaming", "delta": part.answer})] if part.answer else [])

            try:
                async for delta in handle.stream():
                    if delta.text:
                        for event in pieces(channels.feed(delta.text)):
                            yield event
                for event in pieces(channels.finish()):
                    yield event
                assert handle.result is not None
                self._log_result(greq, handle.result, "generate(stream)")
                yield sse({**self.seed_body(greq, handle.result, started), "done": True})
            except ServiceError as exc:
                yield sse(exc.body())
            finally:
                handle.cancel()  # no-op when finished; frees the slot when the client went away

        return events()

    def seed_body(self, req: GenerationRequest, result: GenerationResult, started: float) -> dict[str, Any]:
        shaped = answer.answer_of(req, result)
        body: dict[str, Any] = {
            "status": "success",
            "model": self.model_name,
            "response": shaped.text,
            "parameters": req.params.seed_parameters(),
            "compute_metrics": compute_metrics(time.perf_counter() - started, result, adapter=req.adapter),
            "finish_reason": result.finish_reason,
            "request_id": req.request_id,
            **shaped.seed_fields(),  # thinking apart from the answer, boxes in pixels (medgemma.answer)
        }
        images = [im.info for im in req.images]
        if req.image_previews:
            images = [{**im.info, "preview": sources.preview(im.image)} for im in req.images]
        if images:
            body["images"] = images
        if req.image_sources:
            body["image_sources"] = req.image_sources
        return body

    def _log_result(self, req: GenerationRequest, result: GenerationResult, route: str) -> None:
        # Token counts and timings only: prompt and generated text are patient data (see settings.log_content).
        log.info(
            "request_id=%s route=%s adapter=%s finish=%s input_tokens=%d output_tokens=%d images=%d ttft_s=%.3f "
            "total_s=%.3f",
            req.request_id,
            route,
            req.adapter or "-",
            result.finish_reason,
            result.input_tokens,
            result.output_tokens,
            len(req.images),
            result.timings.time_to_first_token_s or 0.0,
            result.timings.total_s or 0.0,
        )
        if self.settings.log_content:
            log.warning(
                "request_id=%s LOG_CONTENT prompt=%r response=%r",
                req.request_id,
                [m.text for m in req.messages],
                result.text,
            )

    # -- OpenAI-compatible chat completions
    def openai_builder(
        self, req: openai_api.ChatCompletionRequest, request_id: str | None
    ) -> Callable[[Engine], GenerationRequest]:
        def build(engine: Engine) -> GenerationRequest:
            return openai_api.to_generation_request(
                req, self.settings, vision=engine.loaded.vision, request_id=request_id
            )

        return build

    def parse_openai(self, payload: Any) -> openai_api.ChatCompletionRequest:
        req = parse_model(openai_api.ChatCompletionRequest, payload)
        openai_api.adapter_of(req.model, self.settings)  # an unknown model is a 404 before any work
        return req

    async def chat_completion(
        self, payload: Any, *, request_id: str | None = None, disconnected: Disconnected | None = None
    ) -> dict[str, Any]:
        started = time.perf_counter()
        req = self.parse_openai(payload)
        greq, result = await self.run(self.openai_builder(req, request_id), disconnected, adapter_param="model")
        self._log_result(greq, result, "chat.completions")
        metrics = compute_metrics(time.perf_counter() - started, result, adapter=greq.adapter)
        return openai_api.completion(greq, result, req.model, metrics)

    async def chat_completion_stream(self, payload: Any, *, request_id: str | None = None) -> AsyncIterator[str]:
        """OpenAI SSE: a role chunk, content chunks, a finish chunk, an optional usage chunk, then `[DONE]`."""
        started = time.perf_counter()
        req = self.parse_openai(payload)
        greq, handle = await self.submit(self.openai_builder(req, request_id), adapter_param="model")
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        created = int(time.time())

        async def events() -> AsyncIterator[str]:
            channels = answer.AnswerStream(greq)

            def pieces(part: Any) -> list[str]:
                deltas = [{"reasoning_content": part.thinking}] if part.thinking else []
                deltas += [{"content": part.answer}] if part.answer else []
                return [sse(openai_api.chunk(greq, req.model, d, created=created)) for d in deltas]

            try:
                yield sse(openai_api.chunk(greq, req.model, {"role": "assistant", "content": ""}, created=created))
                async for delta in handle.stream():
                    if delta.text:
                        for event in pieces(channels.feed(delta.text)):
                            yield event
                for event in pieces(channels.finish()):
                    yield event
                result = handle.result
                assert result is not None
                self._log_result(greq, result, "chat.completions(stream)")
                finish = "length" if result.finish_reason == "length" else "stop"
                # The finish chunk carries what only the whole answer shows: boxes, whether a thought closed.
                extra = answer.answer_of(greq, result).openai_message_fields()
                extra.pop("reasoning_content", None)
                yield sse(openai_api.chunk(greq, req.model, extra, finish, created=created))
                if include_usage:
                    last = openai_api.chunk(greq, req.model, {}, created=created)
                    last["choices"] = []
                    last["usage"] = openai_api.usage(result)
                    last["compute_metrics"] = compute_metrics(
                        time.perf_counter() - started, result, adapter=greq.adapter
                    )
                    yield sse(last)
            except ServiceError as exc:
                yield sse(error_body(exc, openai=True))
            finally:
                handle.cancel()
            yield "data: [DONE]\n\n"

        return events()

    # -- Google's request format (POST /predict, Vertex AI)
    async def predict(
        self, payload: Any, *, request_id: str | None = None, disconnected: Disconnected | None = None
    ) -> dict[str, Any]:
        started = time.perf_counter()
        req, wrapped = google_api.parse(payload, self.settings)

        def build(engine: Engine) -> GenerationRequest:
            return google_api.to_generation_request(
                req, self.settings, vision=engine.loaded.vision, request_id=request_id
            )

        greq, result = await self.run(build, disconnected)
        self._log_result(greq, result, "predict")
        metrics = compute_metrics(time.perf_counter() - started, result)
        completion = openai_api.completion(greq, result, req.model or self.settings.route_prefix, metrics)
        return google_api.response(completion, wrapped)

    def ready_health(self) -> tuple[dict[str, Any], int]:
        """Vertex AI's health check: 200 once the model can answer, 503 while it loads or after a failed load."""
        body = self.health()
        if body["model_state"] == ModelState.READY.value and not self.draining:
            return body, 200
        reason = "the server is shutting down" if self.draining else f"the model is {body['model_state']}"
        return {**body, "status": "error", "error": f"not ready to serve: {reason}"}, 503

    # -- discovery, health, models
    def schema(self) -> dict[str, Any]:
        engine = self.manager.require()
        body = discovery.describe(engine.loaded, self.settings)
        if self.settings.lora_adapters:
            body["adapters"] = self.adapters()
        return body

    def adapters(self) -> list[dict[str, Any]]:
        """Every configured LoRA adapter: state, rank, target modules, memory, or its stored load error."""
        lora = self.manager.lora
        if lora is not None:
            return lora.listing()
        # No model loaded (yet): the adapters wait for it.
        state = "loading" if self.manager.state is ModelState.LOADING else self.manager.state.value
        return [{"name": n, "source": s, "state": state} for n, s in self.settings.lora_adapter_specs]

    def health(self, *, details: bool = False) -> dict[str, Any]:
        """Replica health. Anyone may read it (probes, status pages), so the model's source (often a filesystem
        path) and the full load error are added only with ``details`` (an authenticated caller); everyone gets the
        state and a short error summary without paths."""
        m = self.manager
        # One read of each: an idle unload may clear them on another thread while this runs.
        loaded, engine, state = m.loaded, m.engine, m.state
        body: dict[str, Any] = {
            "status": "draining" if self.draining else "healthy",
            "model": self.model_name,
            "model_state": state.value,
            "device": loaded.device if loaded else None,
            "model_memory_mb": round(loaded.model.get_memory_footprint() / 2**20, 2) if loaded else 0.0,
            "uptime_seconds": round(time.monotonic() - self._started_mono, 1),
            "loads": m.loads,
        }
        if state is ModelState.LOADING:
            body["progress"] = m.progress_view()
        if state is ModelState.FAILED:
            body["loading_error"] = m.error_summary
        if engine is not None:
            st = engine.stats()
            body["engine"] = {
                "waiting": st.waiting,
                "running": st.running,
                "max_batch_size": engine.max_batch_size,
                "kv_cache": st.kv,
            }
            if st.decode_graphs is not None:
                body["engine"]["decode_graphs"] = st.decode_graphs
        if m.load_seconds is not None:
            body["load_seconds"] = round(m.load_seconds, 2)
        if details:
            body["details"] = {"model_source": self.settings.model, "loading_error": m.error}
        if self.settings.lora_adapters:
            lora = m.lora
            body["adapters"] = self.adapters()
            body["adapter_memory_mb"] = round(lora.memory_bytes / 2**20, 3) if lora is not None else 0.0
        return body

    def models(self) -> dict[str, Any]:
        loaded, state = self.manager.loaded, self.manager.state
        entry: dict[str, Any] = {
            "id": self.settings.route_prefix,
            "object": "model",
            "created": int(self.started_at),
            "owned_by": "medgemma-bentoml",
            "source": self.settings.model,
            "state": state.value,
            "demo": bool(loaded.is_demo) if loaded else None,
        }
        if loaded is not None:
            entry["capabilities"] = ["text-to-text", "image-text-to-text"] if loaded.vision else ["text-to-text"]
        data = [entry]
        for adapter in self.adapters() if self.settings.lora_adapters else []:
            # vLLM's shape for LoRA adapters: the adapter's name as the model id, the base as its parent.
            lora = {k: v for k, v in adapter.items() if k not in ("name", "source", "state")}
            data.append(
                {
                    "id": adapter["name"],
                    "object": "model",
                    "created": int(self.started_at),
                    "owned_by": "medgemma-bentoml",
                    "root": adapter["source"],
                    "parent": self.settings.route_prefix,
                    "source": adapter["source"],
                    "state": adapter["state"],
                    "lora": lora,
                }
            )
        return {"object": "list", "data": data}


async def wait_or_cancel(handle: RequestHandle, disconnected: Disconnected | None) -> GenerationResult:
    """Await the result; if the client disconnects meanwhile, cancel the request (its slot frees within a step)."""
    if disconnected is None:
        return await handle.wait()
    task = asyncio.ensure_future(handle.wait())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.2)
            if done:
                return task.result()
            if await disconnected():
                handle.cancel()
                raise ClientGone()
    finally:
        if not task.done():
            handle.cancel()
            task.cancel()


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
