"""The engine: one thread owns the model and runs steps over every admitted request. No BentoML in here.

Why our own loop: ``generate()`` serves one batch start to end, and transformers' continuous batching takes token
ids only (no pixel values), so neither batches image+text requests that arrive at different times.

A **step** is one forward over packed tokens: one token for every decoding row and this step's chunks of the rows
still reading their prompts, side by side over the paged KV cache (``attention.py``, ``kv_cache.py``), so rows of
any length share a pass without padding each other.

**Chunked prefill with decode priority.** A prompt is read in chunks, never splitting an image (Gemma 3 attends
bidirectionally inside an image). With nobody decoding a chunk is up to ``prefill_chunk_tokens``. While rows are
decoding, long prompts are owed ``prefill_share`` of each decode step's measured time (a credit in seconds); the
credit is spent on a chunk once it pays for at least ``_MIN_DECODING_CHUNK`` tokens at the measured marginal cost of a
prompt token, and the step's actual extra time is charged back. Why credit, not a slice of every step: on a CPU a
prompt token packed into a decode step costs 0.88 ms in a 16-token chunk but 0.51 ms in a 128-token one (``small``
demo, 15 rows decoding), so a few larger chunks read the prompt almost twice as fast for the same time taken from the
decoding rows; on a GPU the credit of every step already buys more than the minimum, so a chunk rides every step.
Among rows waiting to prefill, the one with the fewest prompt tokens left goes first, so a short chat arriving next
to a 22K-token CT study starts answering at once while the study keeps its share.

**Bucketed decode steps** (``decode_graphs``, off by default): a step in which every row decodes runs in fixed,
bucketed shapes, captured and replayed as a CUDA graph on a GPU (``graphs.py``).

**Faults stay in their row.** A failed forward is retried row by row (paged K/V writes go to fixed slots, so redoing
a row's step is harmless); only rows that fail alone fail, out-of-memory ones with a 503. A sampler error fails its
row only. Every handle finishes exactly once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from medgemma import reasoning, structured
from medgemma.engine import attention
from medgemma.engine.attention import Chunk
from medgemma.engine.costs import DecodeCost, PrefillCredit, default_kv_budget
from medgemma.engine.faults import as_service_error, free_memory
from medgemma.engine.graphs import DecodeGraphs, DecodeRow
from medgemma.engine.handle import RequestHandle
from medgemma.engine.kv_cache import KVLayout, PagedKVCache, RowKV
from medgemma.engine.prepare import PreparedRequest, Preparer, context_length, eos_ids, vocab_size
from medgemma.engine.sampling import SampleInput, make_generator, sample
from medgemma.engine.text import TextOut
from medgemma.errors import BadRequest, EngineUnavailable, InternalError, Overloaded, ServiceError
from medgemma.loader import LoadedModel
from medgemma.lora import LoraSet, resolve_adapter
from medgemma.protocol import FinishReason, GenerationRequest, GenerationResult, Timings, TokenDelta

log = logging.getLogger(__name__)

_MIN_CHUNK = 16  # a prompt chunk is never cut shorter than this (unless the prompt ends or an image starts)
_MIN_DECODING_CHUNK = 64  # beside decoding rows, smaller chunks cost up to 1.7x more per token (see the docstring)


@dataclass
class EngineStats:
    waiting: int
    running: int
    steps: int
    requests_finished: int
    kv: dict[str, Any] = field(default_factory=dict)
    decode_graphs: dict[str, Any] | None = None  # None when bucketed decode steps are off


@dataclass
class _Row:
    handle: RequestHandle
    prepared: PreparedRequest
    kv: RowKV
    admitted_at: float
    generator: torch.Generator | None
    spans: list[tuple[int, int]]
    image_groups: torch.Tensor | None
    text: TextOut
    cached: int = 0  # positions whose K/V are in the cache
    generated: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    finish: FinishReason | None = None

    @property
    def n_input(self) -> int:
        return self.prepared.n_input

    @property
    def params(self) -> Any:
        return self.prepared.params

    @property
    def prefilling(self) -> bool:
        return self.cached < self.n_input

    def sample_input(self) -> SampleInput:
        return SampleInput(self.params, self.prepared.input_ids, self.generated, self.generator)


class Engine:
    """Owns a loaded model; batches every submitted request through shared forward passes."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_batch_size: int = 16,
        max_queue: int = 256,
        kv_cache_bytes: int | None = None,
        kv_block_size: int = 16,
        prefill_chunk_tokens: int = 512,
        prefill_share: float = 0.6,
        decode_graphs: bool = False,
        on_finish: Callable[[RequestHandle], None] | None = None,
        on_stats: Callable[[EngineStats], None] | None = None,
        lora: LoraSet | None = None,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = torch.device(loaded.device)
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.prefill_chunk_tokens = max(prefill_chunk_tokens, _MIN_CHUNK)
        self.prefill_share = prefill_share
        self.on_finish = on_finish
        self.on_stats = on_stats
        self.lora = lora
        self.eos_ids = set(eos_ids(loaded))
        self.context_length = context_length(loaded.config)
        # Constrained decoding compiles per request at prepare time and masks per row before sampling; text keeps
        # the thinking tags even where a tokenizer marks them special (the core splits the thought off).
        self.grammars = structured.GrammarCompiler(
            self.tokenizer, vocab_size=vocab_size(loaded.config), eos_ids=sorted(self.eos_ids)
        )
        self._decode = reasoning.tag_preserving_decoder(self.tokenizer)
        self.preparer = Preparer(loaded, context_length=self.context_length, grammars=self.grammars)
        attention.install(self.model)
        layout = KVLayout.from_model(self.model)
        self.kv = PagedKVCache(
            layout,
            budget_bytes=kv_cache_bytes or default_kv_budget(layout, self.device),
            block_size=kv_block_size,
            max_rows=max_batch_size,
            max_chunk=self.prefill_chunk_tokens,
            scratch=decode_graphs,
        )
        self.graphs: DecodeGraphs | None = None
        if decode_graphs:
            if any(d != self.device for d in layout.devices):
                log.warning("bucketed decode steps need every layer on %s; they stay off", self.device)
            else:
                self.graphs = DecodeGraphs(self.model, self.kv, max_rows=max_batch_size, device=self.device)
        self._waiting: deque[RequestHandle] = deque()
        self._rows: list[_Row] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._draining = False
        self._thread: threading.Thread | None = None
        self._published: tuple[int, ...] = ()
        self._decode_cost = DecodeCost()  # measured seconds of a decode step, by rows
        self._credit = PrefillCredit(prefill_share, max_tokens=self.prefill_chunk_tokens)
        self.steps = 0
        self.finished = 0
        self.fault_injector: Callable[[str, list[str]], None] | None = None  # tests: ("forward"|"sample", ids)

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
        while grace_s > 0 and time.monotonic() < deadline and (self._waiting or self._rows):
            time.sleep(0.02)
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def stats(self) -> EngineStats:
        graphs = self.graphs.stats() if self.graphs is not None else None
        return EngineStats(len(self._waiting), len(self._rows), self.steps, self.finished, self.kv.stats(), graphs)

    def _publish(self) -> None:
        """Report queue, batch and KV block counts (Prometheus gauges) when they change."""
        if self.on_stats is None:
            return
        now = (len(self._waiting), len(self._rows), *(p.used for p in self.kv.pools.values()))
        if now != self._published:
            self._published = now
            with contextlib.suppress(Exception):
                self.on_stats(self.stats())

    # -- caller side
    def prepare(self, req: GenerationRequest) -> PreparedRequest:
        """Chat template + processor → tensors. Runs on the caller's thread; raises BadRequest for bad prompts."""
        prepared = self.preparer.prepare(req)
        prepared.adapter_index = resolve_adapter(self.lora, req.adapter)
        total = prepared.n_input + prepared.params.max_new_tokens
        if not self.kv.fits_ever(total, _longest(prepared.image_spans())):
            raise BadRequest(
                f"the prompt ({prepared.n_input} tokens) plus max_new_tokens ({prepared.params.max_new_tokens}) "
                f"needs more KV cache than this server has ({self.kv.capacity_tokens} tokens); lower max_new_tokens "
                "or send a shorter prompt",
                param="max_new_tokens",
            )
        return prepared

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
                while not self._stopping and not self._waiting and not self._rows:
                    self._cv.wait(timeout=0.5)
                if self._stopping:
                    break
                self._admit()
            self._publish()
            try:
                self._step()
            except Exception:  # pragma: no cover - the per-phase handlers catch what they can explain
                log.exception("engine step failed")
                for row in list(self._rows):
                    self._fail(row, InternalError())
            self._publish()
        shutdown = EngineUnavailable("the server is shutting down; retry on another replica", retry_after=5)
        for row in list(self._rows):
            self._fail(row, shutdown)
        with self._cv:
            while self._waiting:
                self._waiting.popleft()._finish(None, shutdown)

    def _admit(self) -> None:
        """First come, first served, while a batch slot and the KV blocks for the whole request are free."""
        while self._waiting and len(self._rows) < self.max_batch_size:
            h = self._waiting[0]
            if h.cancelled.is_set():
                self._waiting.popleft()
                self._complete_cancelled(h)
                continue
            p = h.prepared
            spans = p.image_spans()
            kv = self.kv.admit(p.n_input + p.params.max_new_tokens, _longest(spans))
            if kv is None:
                break  # waits for blocks; later requests wait behind it, so a long one is not starved
            self._waiting.popleft()
            groups = None
            if spans:
                groups = torch.full((p.n_input,), -1, dtype=torch.long)
                for i, (s, e) in enumerate(spans):
                    groups[s:e] = i
            self._rows.append(
                _Row(
                    handle=h,
                    prepared=p,
                    kv=kv,
                    admitted_at=time.perf_counter(),
                    generator=make_generator(p.params, self.device),
                    spans=spans,
                    image_groups=groups,
                    text=TextOut(self._decode, lambda t, h=h: h._emit(TokenDelta(t)), p.params.stop),
                )
            )

    def _step(self) -> None:
        """One packed forward: a token for every decoding row plus this step's prompt chunks."""
        for row in [r for r in self._rows if r.handle.cancelled.is_set()]:
            self._complete(row)
        decoding = [r for r in self._rows if not r.prefilling]
        chunks = self._prefill_chunks(len(decoding))
        work = [(r, r.cached, r.cached + 1) for r in decoding] + chunks
        if not work:
            return
        long_waiting = any(r.prefilling and self._is_long(r) for r in self._rows)
        t0 = time.perf_counter()
        self._forward_rows(work)
        seconds = time.perf_counter() - t0
        self.steps += 1
        long_tokens = sum(e - s for r, s, e in chunks if self._is_long(r))
        other_tokens = sum(e - s for _, s, e in chunks) - long_tokens
        if not decoding:
            if long_tokens and not other_tokens:
                self._credit.observe(seconds / long_tokens)
            return
        decode_s = self._decode_cost.seconds(len(decoding))
        if not chunks:
            self._decode_cost.observe(len(decoding), seconds)
        if long_waiting:
            self._credit.earn(decode_s)
        else:
            self._credit.reset()  # nothing banked for a prompt that has not arrived yet
        if long_tokens and decode_s is not None:
            self._credit.charge(seconds - decode_s, long_tokens, measured=not other_tokens)

    def _is_long(self, row: _Row) -> bool:
        """A prompt read in several chunks, which shares the decoding steps by credit (a shorter one is read whole)."""
        return row.n_input > self.prefill_chunk_tokens

    def _long_prompt_budget(self, n_decoding: int) -> int:
        """Tokens of multi-chunk prompts to read this step: a whole chunk when nobody decodes, else what the credit
        pays for (nothing until it pays for ``_MIN_DECODING_CHUNK`` tokens)."""
        if not n_decoding:
            return self.prefill_chunk_tokens
        minimum = min(_MIN_DECODING_CHUNK, self.prefill_chunk_tokens)
        return self._credit.tokens(self._decode_cost.seconds(n_decoding), minimum)

    def _prefill_chunks(self, n_decoding: int) -> list[tuple[_Row, int, int]]:
        """This step's prompt chunks: fewest tokens left first, never splitting an image.

        A prompt that fits one chunk is read at once (its request starts answering next step); prompts longer than
        a chunk share the decode-priority budget, so a 22K-token study never stalls the chats decoding beside it.
        """
        waiting = sorted((r for r in self._rows if r.prefilling), key=lambda r: r.n_input - r.cached)
        budget = self.prefill_chunk_tokens
        long_budget = self._long_prompt_budget(n_decoding)
        out: list[tuple[_Row, int, int]] = []
        for row in waiting:
            is_long = self._is_long(row)
            cap = min(budget, long_budget) if is_long else budget
            if cap <= 0:
                continue
            start = row.cached
            end = min(row.n_input, start + cap)
            for s, e in row.spans:
                if s < end < e:  # the chunk would end inside an image: stop before it, or take it whole
                    end = s if s > start else e
                    break
            if end <= start or (out and end - start > budget):
                continue
            out.append((row, start, end))
            budget -= end - start
            if is_long:
                long_budget -= end - start
        return out

    def _forward_rows(self, work: list[tuple[_Row, int, int]]) -> None:
        """One packed forward for ``work``; on failure, each row alone, so only the rows that fail alone fail."""
        try:
            logits = self._forward(work)
        except Exception as exc:
            free_memory()
            if len(work) == 1:
                self._fail(work[0][0], as_service_error(exc))
                return
            log.warning("step failed (%s); retrying %d requests one by one", type(exc).__name__, len(work))
            for item in work:
                self._forward_rows([item])
            return
        self._after_forward(work, logits)

    def _forward(self, work: list[tuple[_Row, int, int]]) -> torch.Tensor:
        if self.fault_injector:
            self.fault_injector("forward", [r.handle.request_id for r, _, _ in work])
        if self.graphs is not None and self._graphable(work):
            rows = []
            for row, start, end in work:
                self.kv.extend(row.kv, start, end)
                rows.append(DecodeRow(row.kv, start, row.generated[-1]))
            return self.graphs.run(rows)
        ids: list[torch.Tensor] = []
        chunks: list[Chunk] = []
        pixels: list[torch.Tensor] = []
        keep: list[int] = []
        adapters: list[int] = []  # per token, per image and per kept row: which LoRA adapter (-1 = base)
        image_adapters: list[int] = []
        keep_adapters: list[int] = []
        offset = 0
        for row, start, end in work:
            adapter = row.prepared.adapter_index
            adapters += [adapter] * (end - start)
            self.kv.extend(row.kv, start, end)
            if start < row.n_input:
                ids.append(row.prepared.input_ids[start:end])
                images = [i for i, (s, e) in enumerate(row.spans) if start <= s and e <= end]
                if images:
                    assert row.prepared.pixel_values is not None
                    pixels.append(row.prepared.pixel_values[images[0] : images[-1] + 1])
                    image_adapters += [adapter] * len(images)
                chunks.append(Chunk(row.kv, start, end, row.image_groups if images else None))
            else:
                ids.append(torch.tensor([row.generated[-1]]))
                chunks.append(Chunk(row.kv, start, end))
            offset += end - start
            if end >= row.n_input:
                keep.append(offset - 1)
                keep_adapters.append(adapter)
        position_ids = torch.cat([torch.arange(c.start, c.end) for c in chunks])
        kwargs: dict[str, Any] = {}
        if pixels:
            kwargs["pixel_values"] = torch.cat(pixels).to(self.device, self.model.dtype)
        if not keep:  # a step of prompt chunks only: no token is chosen, so compute one logit and drop it
            keep, keep_adapters = [offset - 1], [-1]
        with self._adapters(adapters, image_adapters, keep_adapters):
            out = self.model(
                input_ids=torch.cat(ids)[None].to(self.device),
                position_ids=position_ids[None].to(self.device),
                attention_mask=attention.build_plans(self.kv, chunks, self.device),
                use_cache=False,
                logits_to_keep=torch.tensor(keep, device=self.device),
                **kwargs,
            )
        return out.logits[0].float()

    def _graphable(self, work: list[tuple[_Row, int, int]]) -> bool:
        """A step of decoding rows only, without LoRA (whose per-token adapter choice a graph cannot follow)."""
        return all(start >= row.n_input for row, start, _ in work) and (self.lora is None or not self.lora.adapters)

    def _adapters(
        self, tokens: list[int], images: list[int], kept: list[int]
    ) -> contextlib.AbstractContextManager[None]:
        """Per-token LoRA for this forward (rows with different adapters, or none, share the pass)."""
        if self.lora is None or not self.lora.adapters:
            return contextlib.nullcontext()
        return self.lora.active(
            torch.tensor(tokens)[None], torch.tensor(images)[:, None] if images else None, torch.tensor(kept)[None]
        )

    def _after_forward(self, work: list[tuple[_Row, int, int]], logits: torch.Tensor) -> None:
        choosing: list[_Row] = []
        for row, _start, end in work:
            row.cached = end
            self.kv.trim(row.kv, end)  # between steps a sliding layer holds the window, not the chunk behind it
            if end >= row.n_input:
                choosing.append(row)
                if row.prepared.pixel_values is not None:
                    row.prepared.pixel_values = None  # the prompt is read: free the image tensors
        if not choosing:
            return
        logits = logits[: len(choosing)]
        constraints = [r.prepared.constraint for r in choosing]
        if any(c is not None for c in constraints):
            try:  # each constrained row's grammar masks its own logits row only
                structured.apply_token_masks(self.grammars, constraints, logits)
            except Exception as exc:  # a grammar failure fails the constrained rows, not their neighbours
                keep = [i for i, c in enumerate(constraints) if c is None]
                for i, c in enumerate(constraints):
                    if c is not None:
                        self._fail(choosing[i], as_service_error(exc))
                choosing, logits = [choosing[i] for i in keep], logits[keep]
        ids = [r.handle.request_id for r in choosing]
        check = (lambda i: self.fault_injector("sample", [ids[i]])) if self.fault_injector else None  # type: ignore[misc]
        tokens = sample([r.sample_input() for r in choosing], logits, check=check)
        now = time.perf_counter()
        for row, tok in zip(choosing, tokens, strict=True):
            if isinstance(tok, BaseException):
                log.error("sampling failed for one request: %s", type(tok).__name__)
                self._fail(row, as_service_error(tok))
                continue
            if row.first_token_at is None:
                row.first_token_at = now
            if tok in self.eos_ids:
                row.finish = "stop"
            else:
                row.generated.append(tok)
                constraint = row.prepared.constraint
                if constraint is not None:  # a complete answer ends the row
                    try:
                        constraint.accept(tok)
                    except Exception as exc:
                        self._fail(row, as_service_error(exc))
                        continue
                    if constraint.is_terminated():
                        row.finish = "stop"
                if row.handle.streaming or row.params.stop:  # a plain request is decoded once, at the end
                    row.text.feed(row.generated)
                    if row.text.stopped:
                        row.finish = "stop"
                if row.finish is None and len(row.generated) >= row.params.max_new_tokens:
                    row.finish = "length"
            if row.finish is not None or row.handle.cancelled.is_set():
                self._complete(row)

    # -- leaving the batch
    def _leave(self, row: _Row) -> None:
        self.kv.release(row.kv)
        with contextlib.suppress(ValueError):
            self._rows.remove(row)
        self.finished += 1

    def _complete(self, row: _Row) -> None:
        finish: FinishReason = row.finish or ("cancelled" if row.handle.cancelled.is_set() else "length")
        text = row.text.finish(row.generated, streamed=row.handle.streaming, cancelled=finish == "cancelled")
        self._leave(row)
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
        if h._finish(result) and self.on_finish:
            with contextlib.suppress(Exception):
                self.on_finish(h)

    def _fail(self, row: _Row, error: ServiceError) -> None:
        self._leave(row)
        row.handle._finish(None, error)

    def _complete_cancelled(self, h: RequestHandle) -> None:
        self.finished += 1
        h._finish(
            GenerationResult(text="", finish_reason="cancelled", input_tokens=h.prepared.n_input, output_tokens=0),
        )


# --- helpers ---------------------------------------------------------------------------------------------------------


def _longest(spans: list[tuple[int, int]]) -> int:
    return max((e - s for s, e in spans), default=0)
