"""Fixed-shape decode steps, so that a decode step can be captured once and replayed as a CUDA graph.

Why: on a GPU a decode step of a small batch is a few hundred short kernels, and launching them one by one from
Python can take longer than running them; a CUDA graph records the launches once and replays them with one call.
A graph replays fixed shapes at fixed addresses, so a graphed step is **bucketed**:

* **rows** are padded to a batch bucket (1, 2, 4, 8, ... and ``max_rows``); a padding row reads and writes only
  the cache's scratch slot (``PagedKVCache(scratch=True)``: a block per pool that no row is ever given), and its
  logits are dropped;
* **context** is padded per kind of layer to a length bucket (powers of two from one block; a sliding layer's
  context is capped at the window); padding columns point at the scratch slot and are masked;
* every index tensor of the step lives in a static buffer, filled in place before each replay, and the step's
  plans (``attention.LayerPlan``) are built once per bucket over those buffers.

One graph per (rows, full context, sliding context) bucket, captured the first time a step of that shape runs, all
sharing one memory pool (replays never overlap, and each step's logits are copied out before the next). At most
``MAX_GRAPHS`` are kept; a step of any other shape runs the same fixed-shape code without a graph.

The price is padding: a bucketed step attends over rows x the bucket of the longest row in one SDPA call, where the
default path groups rows by length (``attention.py``). vLLM makes the same trade for its graphs (bucketed by batch
size); its paged kernels read each row's own length, SDPA here reads the whole bucket, so context is bucketed too.

On a CPU nothing is captured: the same bucketed code runs eagerly. That is what the tests check (its tokens equal
``generate()``'s), and what ``scripts/gpu_check.py --cpu-smoke`` runs under both transformers versions. Used for
steps in which every row decodes and no LoRA adapter is loaded; every other step takes the default path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from medgemma.engine.attention import Group, LayerPlan
from medgemma.engine.kv_cache import Kind, PagedKVCache, RowKV

log = logging.getLogger(__name__)

MAX_GRAPHS = 48  # a graph holds its own kernel parameters; past this many shapes, the bucketed code runs eagerly


@dataclass
class DecodeRow:
    kv: RowKV
    position: int  # of the token fed this step (its K/V slot is already reserved by ``PagedKVCache.extend``)
    token: int


@dataclass
class _Bucket:
    """Static inputs of one bucket's step, the plans over them, and (on CUDA) its graph and output."""

    ids: torch.Tensor  # (1, B)
    positions: torch.Tensor  # (1, B)
    keep: torch.Tensor  # (B,) every row's logits
    writes: dict[Kind, torch.Tensor]  # (B,)
    slots: dict[Kind, torch.Tensor]  # (B, L)
    masks: dict[Kind, torch.Tensor]  # (B, 1, 1, L)
    plans: dict[str, LayerPlan]
    graph: Any = None
    logits: torch.Tensor | None = None


def batch_buckets(max_rows: int) -> list[int]:
    out, b = [], 1
    while b < max_rows:
        out.append(b)
        b *= 2
    return [*out, max_rows]


def length_bucket(n: int, block_size: int, cap: int | None) -> int:
    """The context length a row of ``n`` positions is padded to: a power of two times the block size."""
    b = block_size
    while b < n:
        b *= 2
    return b if cap is None else min(b, max(cap, n))


class DecodeGraphs:
    """Runs decode-only steps in fixed shapes; captures each shape as a CUDA graph on a CUDA device."""

    def __init__(self, model: Any, cache: PagedKVCache, *, max_rows: int, device: torch.device) -> None:
        if not cache.scratch:
            raise ValueError("bucketed decode steps need a KV cache with a scratch block (PagedKVCache(scratch=True))")
        self.model = model
        self.embed = model.get_input_embeddings()
        self.cache = cache
        self.device = device
        self.buckets = batch_buckets(max_rows)
        self.capture = device.type == "cuda"
        self._steps: dict[tuple[int, ...], _Bucket] = {}
        self._pool: Any = None
        self.graphs = 0  # captured so far
        self.replays = 0
        self.eager_steps = 0

    def stats(self) -> dict[str, Any]:
        return {
            "capture": self.capture,
            "graphs": self.graphs,
            "replays": self.replays,
            "eager_steps": self.eager_steps,
        }

    def run(self, rows: list[DecodeRow]) -> torch.Tensor:
        """Logits (len(rows), vocab) of one decode step over ``rows``."""
        n = len(rows)
        b = next(x for x in self.buckets if x >= n)
        views = {kind: [self._view(r, kind) for r in rows] for kind in self.cache.pools}
        window = self.cache.window
        lengths = {
            kind: length_bucket(
                max(v.shape[0] for v in vs), self.cache.block_size, window if kind == "sliding" else None
            )
            for kind, vs in views.items()
        }
        key = (b, *(lengths[k] for k in self.cache.pools))
        step = self._steps.get(key)
        if step is None:
            step = self._allocate(b, lengths)
            if len(self._steps) < MAX_GRAPHS:
                self._steps[key] = step
        self._fill(step, rows, views)
        if self.capture and step.graph is None and key in self._steps:
            self._capture(step)
        if step.graph is not None:
            step.graph.replay()
            self.replays += 1
            assert step.logits is not None
            out = step.logits[:n]
        else:
            out = self._forward(step)[:n]
            self.eager_steps += 1
        return out.float() if out.dtype != torch.float32 else out.clone()

    # -- buffers
    def _view(self, row: DecodeRow, kind: Kind) -> torch.Tensor:
        """The row's key slots for this step (as ``attention._build`` takes them): all of them, or the window."""
        bs = self.cache.block_size
        table = row.kv.table(kind)
        slots, base = table.slots(self.device, bs), table.first * bs
        window = self.cache.window if kind == "sliding" else None
        start = 0 if window is None else max(0, row.position - window + 1)
        return slots[start - base : row.position + 1 - base]

    def _allocate(self, b: int, lengths: dict[Kind, int]) -> _Bucket:
        dev = self.device
        scratch = self.cache.scratch
        writes = {k: torch.full((b,), scratch[k], dtype=torch.long, device=dev) for k in lengths}
        slots = {k: torch.full((b, n), scratch[k], dtype=torch.long, device=dev) for k, n in lengths.items()}
        masks = {k: torch.zeros((b, 1, 1, n), dtype=torch.bool, device=dev) for k, n in lengths.items()}
        q_index = torch.arange(b, device=dev)[:, None]
        plans = {
            f"{k}_attention": LayerPlan(self.cache, writes[k], [Group(q_index, slots[k], masks[k], identity=True)])
            for k in lengths
        }
        return _Bucket(
            ids=torch.zeros((1, b), dtype=torch.long, device=dev),
            positions=torch.zeros((1, b), dtype=torch.long, device=dev),
            keep=torch.arange(b, device=dev),
            writes=writes,
            slots=slots,
            masks=masks,
            plans=plans,
        )

    def _fill(self, step: _Bucket, rows: list[DecodeRow], views: dict[Kind, list[torch.Tensor]]) -> None:
        """This step's rows into the static buffers; padding rows read and write the scratch slot only."""
        n, b = len(rows), step.ids.shape[1]
        step.ids.copy_(torch.tensor([[r.token for r in rows] + [0] * (b - n)]))
        step.positions.copy_(torch.tensor([[r.position for r in rows] + [0] * (b - n)]))
        for kind, vs in views.items():
            slots, writes = step.slots[kind], step.writes[kind]
            slots.fill_(self.cache.scratch[kind])
            writes.fill_(self.cache.scratch[kind])
            for i, v in enumerate(vs):
                slots[i, : v.shape[0]] = v
            writes[:n] = torch.cat([v[-1:] for v in vs])  # the fed token's own slot ends its view
            lengths = torch.tensor([v.shape[0] for v in vs] + [1] * (b - n), device=self.device)
            columns = torch.arange(slots.shape[1], device=self.device)
            step.masks[kind].copy_((columns[None, :] < lengths[:, None])[:, None, None, :])

    # -- running
    def _forward(self, step: _Bucket) -> torch.Tensor:
        # Embeddings in, not ids: Gemma3Model remaps out-of-vocabulary image-token ids with a boolean index, which
        # synchronises with the host and cannot be captured; a decoded token is never one of them.
        out = self.model(
            inputs_embeds=self.embed(step.ids),
            position_ids=step.positions,
            attention_mask=step.plans,
            use_cache=False,
            logits_to_keep=step.keep,
        )
        return out.logits[0]

    def _capture(self, step: _Bucket) -> None:
        """Record this bucket's step (its buffers already hold a real step, so warm-up writes real K/V: the same
        values the replay writes again)."""
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture: lazy initialisation, library workspaces
                self._forward(step)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: request threads may touch CUDA (memory stats, image tensors) while this thread captures
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                step.logits = self._forward(step)
        except Exception as exc:  # never fail a request for a graph: run eagerly from now on
            log.warning("CUDA graph capture failed (%s); decode steps run without graphs", type(exc).__name__)
            self.capture = False
            step.logits = None
            return
        self._pool = graph.pool()
        step.graph = graph
        self.graphs += 1
