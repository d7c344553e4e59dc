"""Continuous-batching generation engine for Gemma 3 (image+text and text-only). No BentoML in here.

Why our own loop: `generate()` serves one batch start to end, and transformers' continuous batching takes token
ids only (no pixel values), so neither batches image+text requests that arrive at different times. This engine:

* owns the model on one thread; callers ``prepare`` (chat template, processor, image tensors) on their own thread
  and ``submit`` into a bounded queue (full → ``Overloaded``, i.e. 429 with Retry-After);
* **prefills** newly admitted requests together (left-padded, with their pixel values and token-type ids, so image
  tokens keep their bidirectional attention), then **merges** their KV cache into the running batch by left-padding
  the shorter side;
* runs one shared **decode** step per token for every running sequence, each with its own sampling parameters
  (greedy rows stay exactly greedy), stop conditions and ``max_new_tokens``; a finished or cancelled row leaves the
  batch at once and its cache rows are dropped, so new requests join between steps instead of waiting for the batch.

Positions: every row gets position ids counted over its own real tokens, so a request sees the same RoPE positions
alone or batched; padding is masked. Sliding-window layers use a full cache with the sliding mask (contiguous real
tokens make cache distance equal token distance), which is what lets rows of different lengths share one cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from medgemma import reasoning, structured
from medgemma.demo import CHAT_TEMPLATE as GEMMA3_CHAT_TEMPLATE
from medgemma.errors import BadRequest, EngineUnavailable, InternalError, Overloaded, ServiceError
from medgemma.loader import LoadedModel
from medgemma.protocol import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    ImagePart,
    Message,
    SamplingParams,
    TextPart,
    Timings,
    TokenDelta,
)

log = logging.getLogger(__name__)


# --- requests as the engine sees them --------------------------------------------------------------------------------


@dataclass
class PreparedRequest:
    """Tensors for one request, made by ``Engine.prepare`` outside the engine thread."""

    request_id: str
    input_ids: torch.Tensor  # (L,)
    token_type_ids: torch.Tensor | None  # (L,) 1 where image soft tokens are
    pixel_values: torch.Tensor | None  # (n_images, 3, H, W)
    params: SamplingParams
    constraint: structured.RowConstraint | None = None  # [issue 12] compiled at prepare time, off the engine thread

    @property
    def n_input(self) -> int:
        return int(self.input_ids.shape[0])


_DONE = object()


class RequestHandle:
    """The caller's side of a submitted request: stream deltas, await the result, or cancel.

    Events cross from the engine thread to the caller: into an asyncio queue when the request was submitted from
    a running event loop, else into a thread-safe queue (benchmarks, tests, plain threads).
    """

    def __init__(self, prepared: PreparedRequest, *, stream: bool = True) -> None:
        self.prepared = prepared
        self.streaming = stream  # whether the caller reads per-token text events
        self.request_id = prepared.request_id
        self.submitted_at = time.perf_counter()
        self.cancelled = threading.Event()
        self.result: GenerationResult | None = None
        self.error: ServiceError | None = None
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            self._aq: asyncio.Queue[Any] | None = asyncio.Queue()
        except RuntimeError:
            self._loop = None
            self._aq = None
        self._tq: queue.Queue[Any] = queue.Queue()

    # engine side
    def _emit(self, item: Any) -> None:
        if self._loop is not None and self._aq is not None:
            with contextlib.suppress(RuntimeError):  # loop closed: nobody is listening any more
                self._loop.call_soon_threadsafe(self._aq.put_nowait, item)
        else:
            self._tq.put(item)

    def _finish(self, result: GenerationResult | None, error: ServiceError | None = None) -> None:
        self.result, self.error = result, error
        self._emit(_DONE)

    # caller side
    def cancel(self) -> None:
        """Ask the engine to drop this request; it leaves the batch before the next decode step."""
        self.cancelled.set()

    async def stream(self) -> AsyncIterator[TokenDelta]:
        """Yield text deltas as they are produced; raises the request's error, if any, at the end."""
        assert self._aq is not None, "stream() needs the request to be submitted from an event loop"
        try:
            while True:
                item = await self._aq.get()
                if item is _DONE:
                    break
                yield item
        finally:
            if self.result is None and self.error is None:
                self.cancel()  # the consumer went away (client disconnect): free the slot
        if self.error is not None:
            raise self.error

    async def wait(self) -> GenerationResult:
        async for _ in self.stream():
            pass
        assert self.result is not None
        return self.result

    def iter_sync(self, timeout: float | None = None) -> Iterator[TokenDelta]:
        while True:
            item = self._tq.get(timeout=timeout)
            if item is _DONE:
                break
            yield item
        if self.error is not None:
            raise self.error

    def wait_sync(self, timeout: float | None = None) -> GenerationResult:
        for _ in self.iter_sync(timeout):
            pass
        assert self.result is not None
        return self.result


# --- the running batch -----------------------------------------------------------------------------------------------


@dataclass
class _Row:
    handle: RequestHandle
    params: SamplingParams
    n_input: int
    prompt_ids: torch.Tensor
    generator: torch.Generator | None
    admitted_at: float
    generated: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    # incremental detokenization (prefix/read offsets, as TGI and vLLM do it)
    prefix_offset: int = 0
    read_offset: int = 0
    emitted: str = ""
    held: str = ""  # decoded text withheld because it may be the start of a stop string
    finish: FinishReason | None = None
    constraint: structured.RowConstraint | None = None  # [issue 12] this row's grammar state, if constrained


class _Batch:
    """KV cache + attention mask of the running rows, all left-padded to the same length.

    The cache object lives across decode steps (the model appends to it in place); it is rebuilt only when rows
    join (merge) or leave (keep), so a decode step copies the KV cache no more than the model itself does.
    """

    def __init__(self) -> None:
        self.rows: list[_Row] = []
        self.cache: Any = None  # transformers DynamicCache with full (non-sliding) layers
        self.mask: torch.Tensor | None = None  # (B, T) long

    @property
    def length(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def merge(self, rows: list[_Row], cache: Any, mask: torch.Tensor) -> None:
        if not self.rows:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            return
        assert self.mask is not None
        t_old, t_new = self.length, int(mask.shape[1])
        t = max(t_old, t_new)
        self.cache = _cache_from(
            (
                torch.cat([_lpad(k0, t - t_old), _lpad(k1, t - t_new)]),
                torch.cat([_lpad(v0, t - t_old), _lpad(v1, t - t_new)]),
            )
            for (k0, v0), (k1, v1) in zip(_layers_of(self.cache), _layers_of(cache), strict=True)
        )
        self.mask = torch.cat([_lpad_mask(self.mask, t - t_old), _lpad_mask(mask, t - t_new)])
        self.rows.extend(rows)

    def keep(self, keep: list[int]) -> None:
        """Drop the rows not in ``keep``, then the leading columns that are padding in every remaining row."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        assert self.mask is not None
        idx = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        first_real = int((mask.cumsum(1) == 0).sum(1).min())
        self.mask = mask[:, first_real:]
        self.cache = _cache_from(
            (k.index_select(0, idx)[:, :, first_real:], v.index_select(0, idx)[:, :, first_real:])
            for k, v in _layers_of(self.cache)
        )
        self.rows = [self.rows[i] for i in keep]


def _cache_from(layers: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=list(layers))


def _lpad(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if n == 0 else torch.nn.functional.pad(x, (0, 0, n, 0))


def _lpad_mask(m: torch.Tensor, n: int) -> torch.Tensor:
    return m if n == 0 else torch.nn.functional.pad(m, (n, 0))


def _layers_of(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


# --- the engine ------------------------------------------------------------------------------------------------------


@dataclass
class EngineStats:
    waiting: int
    running: int
    steps: int
    requests_finished: int


class Engine:
    """Owns a loaded model; batches every submitted request through shared forward passes."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_batch_size: int = 16,
        max_queue: int = 256,
        prefill_token_budget: int = 16384,
        on_finish: Callable[[RequestHandle], None] | None = None,
        on_stats: Callable[[EngineStats], None] | None = None,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = loaded.tokenizer
        self.device = torch.device(loaded.device)
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.prefill_token_budget = prefill_token_budget
        self.on_finish = on_finish
        self.on_stats = on_stats
        self._published: tuple[int, int] = (-1, -1)
        self.eos_ids = set(_eos_ids(loaded))
        self.context_length = _context_length(loaded.config)
        self.pad_id = _pad_id(loaded)
        # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name is a deprecated alias
        # there, and the only name before): use whichever this version's forward declares.
        forward_params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in forward_params else "past_key_values"
        # A checkpoint without a chat template (some conversions drop it) gets Gemma 3's turn format.
        has_template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        self.chat_template: str | None = None if has_template else GEMMA3_CHAT_TEMPLATE
        self._reserved_tokens = _reserved_tokens(self.processor, self.tokenizer)
        # [issue 12] text keeps the thinking tags even if a tokenizer marks them special (the core splits them off);
        # constrained decoding compiles per request in `prepare` and masks per row in `_advance`.
        self._detokenize = reasoning.tag_preserving_decoder(self.tokenizer)
        self.grammars = structured.GrammarCompiler(
            self.tokenizer, vocab_size=_vocab_size(loaded.config), eos_ids=sorted(self.eos_ids)
        )
        self._waiting: deque[RequestHandle] = deque()
        self._cv = threading.Condition()
        self._batch = _Batch()
        self._stopping = False
        self._draining = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.finished = 0
        self.fault_injector: Callable[[str], None] | None = None  # tests inject faults ("prefill"/"decode")

    # -- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="medgemma-engine", daemon=True)
        self._thread.start()

    def stop(self, grace_s: float = 0.0) -> None:
        """Stop taking requests; let running ones finish for ``grace_s``, then cancel the rest."""
        with self._cv:
            self._draining = True
            self._cv.notify_all()
        deadline = time.monotonic() + grace_s
        while grace_s > 0 and time.monotonic() < deadline and (self._waiting or self._batch.rows):
            time.sleep(0.02)
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def stats(self) -> EngineStats:
        return EngineStats(len(self._waiting), len(self._batch.rows), self.steps, self.finished)

    def _publish(self) -> None:
        """Report waiting/running counts (Prometheus gauges) when they change."""
        if self.on_stats is None:
            return
        now = (len(self._waiting), len(self._batch.rows))
        if now != self._published:
            self._published = now
            with contextlib.suppress(Exception):
                self.on_stats(self.stats())

    # -- caller side
    def prepare(self, req: GenerationRequest) -> PreparedRequest:
        """Chat template + processor → tensors. Runs on the caller's thread; raises BadRequest for bad prompts."""
        images = [p.image for p in req.images]
        self._check_reserved_tokens(req)
        chat = _to_chat(req.messages, vision=self.loaded.vision)
        try:
            prompt = self.processor.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=True, chat_template=self.chat_template
            )
        except Exception as exc:  # the template raises for conversations it cannot render
            raise BadRequest(f"the model's chat template rejected the conversation: {_public(exc)}") from None
        try:
            if images:
                enc = self.processor(text=prompt, images=images, return_tensors="pt", add_special_tokens=False)
            else:
                enc = (self.tokenizer if not self.loaded.vision else self.processor)(
                    text=prompt, return_tensors="pt", add_special_tokens=False
                )
        except ValueError as exc:  # the processor refuses prompts whose image markers do not match the images
            raise BadRequest(f"the prompt could not be prepared: {_public(exc)}", param="messages") from None
        input_ids = enc["input_ids"][0]
        n_input = int(input_ids.shape[0])
        total = n_input + req.params.max_new_tokens
        if self.context_length and n_input >= self.context_length:
            raise BadRequest(
                f"the prompt is {n_input} tokens, which does not fit the model's context of {self.context_length} "
                "tokens; shorten the text or send fewer images",
                param="messages",
            )
        if self.context_length and total > self.context_length:
            raise BadRequest(
                f"the prompt is {n_input} tokens and max_new_tokens is {req.params.max_new_tokens}: together "
                f"{total}, above the model's context of {self.context_length} tokens",
                param="max_new_tokens",
            )
        tti = enc.get("token_type_ids")
        return PreparedRequest(
            request_id=req.request_id,
            input_ids=input_ids,
            token_type_ids=tti[0] if tti is not None and images else None,
            pixel_values=enc.get("pixel_values") if images else None,
            params=req.params,
            constraint=self.grammars.compile(req.constraint) if req.constraint is not None else None,  # [issue 12]
        )

    def _check_reserved_tokens(self, req: GenerationRequest) -> None:
        """Text may not contain the model's control tokens (turn and image markers): typed into a prompt they would
        forge turns or image slots, and image markers make the processor or the vision merge fail."""
        reserved = self._reserved_tokens
        for i, m in enumerate(req.messages):
            for part in m.parts:
                if isinstance(part, TextPart) and "<" in part.text:
                    found = next((t for t in reserved if t in part.text), None)
                    if found is not None:
                        raise BadRequest(
                            f"messages[{i}]: the text contains the reserved token {found!r}; remove it",
                            param=f"messages[{i}]",
                        )

    def submit(self, prepared: PreparedRequest, *, stream: bool = True) -> RequestHandle:
        """Queue a prepared request. ``stream=False`` skips per-token text events (only the result is wanted)."""
        handle = RequestHandle(prepared, stream=stream)
        with self._cv:
            if self._draining or self._stopping:
                raise EngineUnavailable("the server is shutting down; retry on another replica", retry_after=5)
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(
                    f"the generation queue is full ({self.max_queue} waiting); retry shortly", retry_after=2
                )
            self._waiting.append(handle)
            self._cv.notify_all()
            self._publish()
        return handle

    # -- engine thread
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not self._batch.rows:
                    self._cv.wait(timeout=0.5)
                if self._stopping:
                    break
                admitted = self._admit()
            self._publish()
            try:
                if admitted:
                    self._prefill(admitted)
                if self._batch.rows:
                    self._drop_cancelled()
                if self._batch.rows:
                    self._decode()
            except Exception:  # pragma: no cover - the per-phase handlers catch what they can explain
                log.exception("engine step failed")
                self._fail_all(InternalError())
            self._publish()
        self._fail_all(EngineUnavailable("the server is shutting down; retry on another replica", retry_after=5))
        with self._cv:
            while self._waiting:
                self._waiting.popleft()._finish(
                    None,
                    EngineUnavailable("the server is shutting down; retry on another replica", retry_after=5),
                )

    def _admit(self) -> list[RequestHandle]:
        room = self.max_batch_size - len(self._batch.rows)
        out: list[RequestHandle] = []
        longest = 0
        while self._waiting and len(out) < room:
            h = self._waiting[0]
            if h.cancelled.is_set():
                self._waiting.popleft()
                self._complete_cancelled(h)
                continue
            longest_next = max(longest, h.prepared.n_input)
            if out and longest_next * (len(out) + 1) > self.prefill_token_budget:
                break
            out.append(self._waiting.popleft())
            longest = longest_next
        return out

    def _prefill(self, handles: list[RequestHandle]) -> None:
        try:
            self._prefill_group(handles)
        except Exception as exc:
            _free_memory()
            if len(handles) > 1:
                # One bad request must not fail its batch mates: retry each alone, so only the culprit fails.
                log.warning(
                    "batched prefill failed (%s); retrying %d requests one by one",
                    type(exc).__name__,
                    len(handles),
                )
                for h in handles:
                    try:
                        self._prefill_group([h])
                    except Exception as exc1:
                        _free_memory()
                        h._finish(None, _as_service_error(exc1))
                        self.finished += 1
            else:
                handles[0]._finish(None, _as_service_error(exc))
                self.finished += 1

    def _prefill_group(self, handles: list[RequestHandle]) -> None:
        if self.fault_injector:
            self.fault_injector("prefill")
        now = time.perf_counter()
        preps = [h.prepared for h in handles]
        length = max(p.n_input for p in preps)
        b = len(preps)
        input_ids = torch.full((b, length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, length), dtype=torch.long)
        tti = torch.zeros((b, length), dtype=torch.long)
        pixels: list[torch.Tensor] = []
        for i, p in enumerate(preps):
            input_ids[i, length - p.n_input :] = p.input_ids
            mask[i, length - p.n_input :] = 1
            if p.token_type_ids is not None:
                tti[i, length - p.n_input :] = p.token_type_ids
            if p.pixel_values is not None:
                pixels.append(p.pixel_values)
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {}
        if pixels:
            kwargs["pixel_values"] = torch.cat(pixels).to(self.device, self.model.dtype)
        if self.loaded.vision:
            kwargs["token_type_ids"] = tti.to(self.device)
        from transformers import DynamicCache

        cache = DynamicCache()
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=position_ids.to(self.device),
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: cache},
            **kwargs,
        )
        logits = out.logits[:, -1, :].float()
        rows = []
        for h, p in zip(handles, preps, strict=True):
            gen = None
            if p.params.do_sample:
                gen = torch.Generator(device=self.device)
                if p.params.seed is not None:
                    gen.manual_seed(p.params.seed)
                else:
                    gen.seed()
            rows.append(
                _Row(
                    handle=h,
                    params=p.params,
                    n_input=p.n_input,
                    prompt_ids=p.input_ids,
                    generator=gen,
                    admitted_at=now,
                    constraint=p.constraint,  # [issue 12]
                )
            )
            h.prepared.pixel_values = None  # free image tensors early
        self._batch.merge(rows, cache, mask.to(self.device))
        first = len(self._batch.rows) - len(rows)
        self._advance(list(range(first, len(self._batch.rows))), logits)

    def _decode(self) -> None:
        batch = self._batch
        assert batch.mask is not None
        last = torch.tensor([[r.generated[-1]] for r in batch.rows], device=self.device)
        position_ids = batch.mask.sum(1, keepdim=True)  # next position = number of real tokens so far
        mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)
        try:
            if self.fault_injector:
                self.fault_injector("decode")
            out = self.model(
                input_ids=last,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kw: batch.cache},
            )
        except Exception as exc:
            _free_memory()
            log.error("decode step failed for %d requests: %s", len(batch.rows), type(exc).__name__)
            self._fail_all(_as_service_error(exc))
            return
        batch.mask = mask  # the model appended this step's keys and values to batch.cache in place
        self.steps += 1
        self._advance(list(range(len(batch.rows))), out.logits[:, -1, :].float())

    def _advance(self, row_idx: list[int], logits: torch.Tensor) -> None:
        """Pick the next token of each row in ``row_idx`` (logits row i ↔ row_idx[i]), emit text, retire rows."""
        rows = [self._batch.rows[i] for i in row_idx]
        structured.apply_token_masks(self.grammars, [r.constraint for r in rows], logits)  # [issue 12] in place
        tokens = _sample(rows, logits)
        now = time.perf_counter()
        for row, tok in zip(rows, tokens, strict=True):
            if row.first_token_at is None:
                row.first_token_at = now
            if tok in self.eos_ids:
                row.finish = "stop"
                continue
            row.generated.append(tok)
            if row.constraint is not None:  # [issue 12] a complete constraint ends the row
                row.constraint.accept(tok)
                if row.constraint.is_terminated():
                    row.finish = "stop"
            if (
                row.handle.streaming or row.params.stop
            ):  # nobody reads deltas of a plain request: decode once at the end
                self._emit_text(row)
            if row.finish is None and len(row.generated) >= row.params.max_new_tokens:
                row.finish = "length"
        done = [i for i, r in enumerate(self._batch.rows) if r.finish is not None or r.handle.cancelled.is_set()]
        if done:
            for i in done:
                self._complete(self._batch.rows[i])
            self._batch.keep([i for i in range(len(self._batch.rows)) if i not in set(done)])

    def _drop_cancelled(self) -> None:
        cancelled = [i for i, r in enumerate(self._batch.rows) if r.handle.cancelled.is_set()]
        if cancelled:
            for i in cancelled:
                self._complete(self._batch.rows[i])
            self._batch.keep([i for i in range(len(self._batch.rows)) if i not in set(cancelled)])

    def _emit_text(self, row: _Row) -> None:
        ids = row.generated
        prefix = self._detokenize(ids[row.prefix_offset : row.read_offset])  # [issue 12] tag-preserving decode
        full = self._detokenize(ids[row.prefix_offset :])
        if full.endswith("\ufffd") and len(ids) - row.read_offset < 4:
            return  # maybe a multi-byte character still arriving (UTF-8 needs at most 4 byte tokens): wait
        if len(full) <= len(prefix):
            return
        delta = full[len(prefix) :]
        row.prefix_offset, row.read_offset = row.read_offset, len(ids)
        self._push(row, delta)

    def _push(self, row: _Row, delta: str) -> None:
        """Send ``delta`` to the client, holding back any tail that may be the start of a stop string."""
        pending = row.held + delta
        stops = row.params.stop
        if stops:
            combined = row.emitted + pending
            start = max(0, len(row.emitted) - max(len(s) for s in stops))
            hits = [at for at in (combined.find(s, start) for s in stops) if at != -1]
            if hits:
                row.held, row.finish = "", "stop"
                self._send(row, combined[len(row.emitted) : min(hits)])
                return
            keep = min(_partial_stop_suffix(combined, stops), len(pending))
            pending, row.held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self._send(row, pending)

    @staticmethod
    def _send(row: _Row, text: str) -> None:
        if text:
            row.emitted += text
            row.handle._emit(TokenDelta(text))

    def _complete(self, row: _Row) -> None:
        finish: FinishReason = row.finish or ("cancelled" if row.handle.cancelled.is_set() else "length")
        if row.params.stop:
            # The stream already holds the text up to a stop string; text held back as a possible stop is released.
            self._send(row, row.held)
            row.held = ""
            text = row.emitted
        else:
            # The response text is the decode of every generated token; the stream gets whatever it has not shown.
            text = self._detokenize(row.generated)  # [issue 12] tag-preserving decode
            if finish != "cancelled" and text.startswith(row.emitted):
                self._send(row, text[len(row.emitted) :])
        end = time.perf_counter()
        h = row.handle
        n_out = len(row.generated)
        timings = Timings(
            queue_wait_s=row.admitted_at - h.submitted_at,
            time_to_first_token_s=(row.first_token_at - h.submitted_at) if row.first_token_at else None,
            total_s=end - h.submitted_at,
            output_tokens_per_second=n_out / (end - h.submitted_at),
        )
        result = GenerationResult(
            text=text,
            finish_reason=finish,
            input_tokens=row.n_input,
            output_tokens=n_out,
            timings=timings,
            token_ids=list(row.generated),
        )
        self.finished += 1
        h._finish(result)
        if self.on_finish:
            with contextlib.suppress(Exception):
                self.on_finish(h)

    def _complete_cancelled(self, h: RequestHandle) -> None:
        self.finished += 1
        h._finish(
            GenerationResult(text="", finish_reason="cancelled", input_tokens=h.prepared.n_input, output_tokens=0),
        )

    def _fail_all(self, error: ServiceError) -> None:
        for row in self._batch.rows:
            row.handle._finish(None, error)
            self.finished += 1
        self._batch.keep([])


# --- sampling --------------------------------------------------------------------------------------------------------


def _sample(rows: list[_Row], logits: torch.Tensor) -> list[int]:
    """Per-row logits processing in transformers' order: repetition penalty, temperature, top-k, top-p.

    Plain greedy rows share one batched argmax (one device sync per step, not one per row)."""
    greedy = logits.argmax(-1).tolist()
    out: list[int] = []
    for i, (row, row_logits) in enumerate(zip(rows, logits, strict=True)):
        p = row.params
        penalise = p.repetition_penalty is not None and p.repetition_penalty != 1.0
        if not p.do_sample and not penalise:
            out.append(int(greedy[i]))
            continue
        lg = row_logits
        if penalise:
            seen = torch.cat(
                [row.prompt_ids.to(lg.device), torch.tensor(row.generated, dtype=torch.long, device=lg.device)]
            )
            score = lg.gather(0, seen)
            score = torch.where(score < 0, score * p.repetition_penalty, score / p.repetition_penalty)
            lg = lg.scatter(0, seen, score)
        if not p.do_sample:
            out.append(int(torch.argmax(lg)))
            continue
        if p.temperature is not None and p.temperature > 0:
            lg = lg / p.temperature
        if p.top_k is not None and p.top_k < lg.shape[-1]:
            kth = torch.topk(lg, p.top_k).values[-1]
            lg = lg.masked_fill(lg < kth, float("-inf"))
        if p.top_p is not None and p.top_p < 1.0:
            sorted_lg, order = torch.sort(lg, descending=False)
            cum = sorted_lg.softmax(-1).cumsum(-1)
            remove = cum <= (1 - p.top_p)
            remove[-1] = False  # always keep the most likely token
            lg = lg.masked_fill(remove.scatter(0, order, remove), float("-inf"))
        out.append(int(torch.multinomial(lg.softmax(-1), 1, generator=row.generator)))
    return out


def _partial_stop_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best


# --- helpers ---------------------------------------------------------------------------------------------------------


def _to_chat(messages: list[Message], *, vision: bool) -> list[dict[str, Any]]:
    """Internal messages → the chat-template format. Images become bare `{"type": "image"}` placeholders: the pixels
    go to the processor separately, so no user string ever reaches the template as a path or URL."""
    chat: list[dict[str, Any]] = []
    for m in messages:
        if vision:
            parts: list[dict[str, Any]] = []
            for p in m.parts:
                if isinstance(p, ImagePart):
                    parts.append({"type": "image"})
                elif isinstance(p, TextPart):
                    parts.append({"type": "text", "text": p.text})
            chat.append({"role": m.role, "content": parts})
        else:
            chat.append({"role": m.role, "content": m.text})
    return chat


def _as_list(x: Any) -> list[int]:
    if x is None:
        return []
    return [int(v) for v in x] if isinstance(x, list | tuple) else [int(x)]


def _reserved_tokens(processor: Any, tokenizer: Any) -> tuple[str, ...]:
    """Control tokens a user's text must not contain: turn markers, BOS/EOS/PAD, image markers."""
    names = {"<start_of_turn>", "<end_of_turn>", *(str(t) for t in getattr(tokenizer, "all_special_tokens", []))}
    for owner in (processor, tokenizer):
        for attr in ("boi_token", "eoi_token", "image_token"):
            value = getattr(owner, attr, None)
            if isinstance(value, str) and value.strip():
                names.add(value.strip())
    return tuple(sorted(n for n in names if n.startswith("<") and len(n) > 2))


def _eos_ids(loaded: LoadedModel) -> list[int]:
    ids = _as_list(getattr(loaded.generation_config, "eos_token_id", None))
    if not ids:
        text = loaded.config.get_text_config() if hasattr(loaded.config, "get_text_config") else loaded.config
        ids = _as_list(getattr(text, "eos_token_id", None))
    if loaded.tokenizer.eos_token_id is not None:
        ids.append(int(loaded.tokenizer.eos_token_id))
    return ids


def _vocab_size(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)


def _context_length(config: Any) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)


def _pad_id(loaded: LoadedModel) -> int:
    pid = loaded.tokenizer.pad_token_id
    if pid is None:
        pid = _as_list(loaded.generation_config.pad_token_id)[:1] or [0]
        return pid[0]
    return int(pid)


def _public(exc: BaseException) -> str:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return msg[:300]


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError | MemoryError) or "out of memory" in str(exc).lower()


def _as_service_error(exc: BaseException) -> ServiceError:
    if isinstance(exc, ServiceError):
        return exc
    if _is_oom(exc):
        return EngineUnavailable(
            "out of memory while generating this request; retry with fewer images or tokens", retry_after=5
        )
    log.error("generation failed: %s", type(exc).__name__)
    return InternalError()


def _free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
