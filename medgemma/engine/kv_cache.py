"""Paged KV cache: preallocated pools of fixed-size blocks, per-row block tables, writes in place.

Memory follows the live tokens, not rows x longest: each language layer owns one K and one V tensor of shape
``(blocks * block_size, kv_heads, head_dim)``; a row holds a list of block numbers (its block table) and its token
at position ``p`` lives in slot ``table[p // block_size] * block_size + p % block_size``. Rows join and leave by
taking and returning block numbers; nobody's cache is ever copied or re-padded.

Two pools, because Gemma 3 has two kinds of layer:

* **full** attention layers keep every position of the row;
* **sliding** layers (5 of every 6 in MedGemma) only ever look back ``window`` positions, so a row's sliding table
  drops blocks that fell out of the window: between steps a row holds at most ``window + block_size - 1`` positions
  there (during a prefill chunk of ``c`` tokens, ``window + c + block_size`` at most, since the chunk's first query
  still needs the window behind it).

Admission by reservation: a request is admitted only when both pools can reserve every block it can ever need
(prompt + ``max_new_tokens``; in the sliding pool at most window + chunk). A running row therefore never runs out of
blocks and is never preempted for KV space; a request that does not fit waits in the queue (429 only when the queue is
full), and one that could never fit is refused up front with a 400. The price is that a large ``max_new_tokens``
holds room a shorter answer does not use; the room comes back the moment the row finishes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Kind = Literal["full", "sliding"]


@dataclass(frozen=True)
class KVLayout:
    """The shapes the cache must hold, read off the loaded model."""

    kinds: tuple[Kind, ...]  # per language layer
    num_kv_heads: int
    head_dim: int
    window: int | None  # sliding window, None when no layer slides
    dtype: torch.dtype
    devices: tuple[torch.device, ...]  # per layer (device_map may spread layers over GPUs)

    @property
    def bytes_per_token_layer(self) -> int:
        """K and V of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def count(self, kind: Kind) -> int:
        return sum(1 for k in self.kinds if k == kind)

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token in every layer: what a dense cache pays per token of context."""
        return self.bytes_per_token_layer * len(self.kinds)

    @classmethod
    def from_model(cls, model: Any) -> KVLayout:
        attn = language_attention_modules(model)
        if not attn:
            raise ValueError("no Gemma 3 attention layers found in the model")
        cfg = attn[0].config
        kinds: list[Kind] = ["sliding" if getattr(m, "is_sliding", False) else "full" for m in attn]
        window = getattr(cfg, "sliding_window", None) if "sliding" in kinds else None
        weight = attn[0].k_proj.weight
        return cls(
            kinds=tuple(kinds),
            num_kv_heads=int(cfg.num_key_value_heads),
            head_dim=int(attn[0].head_dim),
            window=int(window) if window else None,
            dtype=weight.dtype,
            devices=tuple(m.k_proj.weight.device for m in attn),
        )


def language_attention_modules(model: Any) -> list[Any]:
    """The language model's self-attention modules in layer order (the vision tower's are not among them)."""
    found = [m for m in model.modules() if type(m).__name__ == "Gemma3Attention" and hasattr(m, "layer_idx")]
    return sorted(found, key=lambda m: m.layer_idx)


class BlockPool:
    """Free list of block numbers with reservations: ``take`` only ever spends what ``reserve`` set aside."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        # A stack handing out low numbers first: reused blocks are the recently touched ones, so the pages a
        # lazily committed pool (CPU) has to back stay few.
        self._free = list(range(num_blocks - 1, -1, -1))
        self.reserved = 0  # set aside for admitted rows, not yet taken

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def available(self) -> int:
        return len(self._free) - self.reserved

    def reserve(self, n: int) -> bool:
        if n > self.available:
            return False
        self.reserved += n
        return True

    def unreserve(self, n: int) -> None:
        self.reserved -= n

    def take(self) -> int:
        assert self.reserved > 0 and self._free, "take() without a reservation"
        self.reserved -= 1
        return self._free.pop()

    def give(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


@dataclass
class RowTable:
    """One row's blocks in one pool: ``blocks[i]`` holds positions of logical block ``first + i``."""

    reserved: int  # blocks this row may still take
    blocks: list[int] = field(default_factory=list)
    first: int = 0
    _slots: torch.Tensor | None = None  # cache of slots(); cleared whenever the blocks change

    @property
    def end(self) -> int:
        """First logical block not held."""
        return self.first + len(self.blocks)

    def slots(self, device: torch.device, block_size: int) -> torch.Tensor:
        """Pool slots of every position held, from ``first * block_size`` on (cached until the blocks change)."""
        if self._slots is None or self._slots.device != device:
            blocks = torch.tensor(self.blocks, dtype=torch.long, device=device)
            offsets = torch.arange(block_size, device=device)
            self._slots = (blocks[:, None] * block_size + offsets).flatten()
        return self._slots


@dataclass
class RowKV:
    full: RowTable
    sliding: RowTable | None

    def table(self, kind: Kind) -> RowTable:
        table = self.full if kind == "full" else self.sliding
        assert table is not None
        return table


class PagedKVCache:
    """The pools and their allocators. Used from the engine thread only."""

    def __init__(
        self,
        layout: KVLayout,
        *,
        budget_bytes: int,
        block_size: int,
        max_rows: int,
        max_chunk: int,
        scratch: bool = False,
    ) -> None:
        self.layout = layout
        self.block_size = block_size
        self.window = layout.window
        self.max_chunk = max_chunk
        full_tokens, sliding_tokens = split_budget(
            layout, budget_bytes, block_size=block_size, max_rows=max_rows, max_chunk=max_chunk
        )
        self.pools: dict[Kind, BlockPool] = {"full": BlockPool(full_tokens // block_size)}
        if layout.count("sliding"):
            self.pools["sliding"] = BlockPool(sliding_tokens // block_size)
        if self.pools["full"].num_blocks < 1 or ("sliding" in self.pools and self.pools["sliding"].num_blocks < 2):
            mib = budget_bytes / 2**20
            raise ValueError(f"the KV cache budget of {mib:.1f} MiB holds no usable block; raise MEDGEMMA_KV_CACHE_MB")
        # Bucketed decode steps (``graphs.py``) pad with rows and columns that must read and write somewhere no row
        # lives: one more block per pool, never on a free list, whose first slot is that scratch slot.
        self.scratch: dict[Kind, int] = (
            {kind: pool.num_blocks * block_size for kind, pool in self.pools.items()} if scratch else {}
        )
        # torch.empty: on CPU the pages are committed only when first written, so resident memory follows the
        # tokens actually cached; on a GPU the pool is reserved up front, as vLLM does.
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for kind, device in zip(layout.kinds, layout.devices, strict=True):
            slots = (self.pools[kind].num_blocks + (1 if scratch else 0)) * block_size
            shape = (slots, layout.num_kv_heads, layout.head_dim)
            self.k.append(torch.empty(shape, dtype=layout.dtype, device=device))
            self.v.append(torch.empty(shape, dtype=layout.dtype, device=device))

    # -- sizes
    @property
    def capacity_tokens(self) -> int:
        """Most tokens of context the full-attention pool holds, over all rows together."""
        return self.pools["full"].num_blocks * self.block_size

    @property
    def pool_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def blocks_needed(self, total_tokens: int, longest_image: int = 0) -> dict[Kind, int]:
        bs = self.block_size
        need: dict[Kind, int] = {"full": math.ceil(total_tokens / bs)}
        if "sliding" in self.pools:
            assert self.window is not None
            chunk = max(self.max_chunk, longest_image)
            need["sliding"] = min(need["full"], math.ceil((self.window + chunk - 1) / bs) + 1)
        return need

    def fits_ever(self, total_tokens: int, longest_image: int = 0) -> bool:
        need = self.blocks_needed(total_tokens, longest_image)
        return all(n <= self.pools[kind].num_blocks for kind, n in need.items())

    # -- rows
    def admit(self, total_tokens: int, longest_image: int = 0) -> RowKV | None:
        """Reserve every block a request can need, or None when the pools cannot promise them now."""
        need = self.blocks_needed(total_tokens, longest_image)
        if any(n > self.pools[kind].available for kind, n in need.items()):
            return None
        for kind, n in need.items():
            self.pools[kind].reserve(n)
        sliding = RowTable(reserved=need["sliding"]) if "sliding" in need else None
        return RowKV(full=RowTable(reserved=need["full"]), sliding=sliding)

    def release(self, row: RowKV) -> None:
        for kind in self.pools:
            table = row.table(kind)
            self.pools[kind].give(table.blocks)
            self.pools[kind].unreserve(table.reserved)
            table.blocks, table.reserved, table._slots = [], 0, None

    def extend(self, row: RowKV, start: int, end: int) -> None:
        """Make positions [start, end) writable; in the sliding pool first return blocks no query needs any more."""
        bs = self.block_size
        self.trim(row, start)
        for kind, pool in self.pools.items():
            table = row.table(kind)
            if not table.blocks:
                table.first = start // bs
            last = (end - 1) // bs
            while table.end <= last:
                table.blocks.append(pool.take())
                table.reserved -= 1
                table._slots = None

    def trim(self, row: RowKV, next_pos: int) -> None:
        """Return the sliding blocks that the query at ``next_pos`` (and every later one) no longer sees."""
        table = row.sliding
        if table is None or not table.blocks:
            return
        assert self.window is not None
        keep_from = max(0, next_pos - self.window + 1) // self.block_size
        drop = min(max(0, keep_from - table.first), len(table.blocks))
        if drop:
            pool = self.pools["sliding"]
            pool.give(table.blocks[:drop])
            # The row keeps its claim: it takes as many blocks again as the window moves on, so what it gives back
            # returns to its reservation (others see no more room than before).
            pool.reserved += drop
            table.reserved += drop
            table.blocks, table.first, table._slots = table.blocks[drop:], table.first + drop, None

    def held_tokens(self, row: RowKV, kind: Kind) -> int:
        return len(row.table(kind).blocks) * self.block_size

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "block_size": self.block_size,
            "capacity_tokens": self.capacity_tokens,
            "pool_mb": round(self.pool_bytes / 2**20, 2),
            "admission": "reserve",  # prompt + max_new_tokens reserved up front: a running row is never preempted
            "preemptions": 0,
        }
        for kind, pool in self.pools.items():
            out[kind] = {
                "blocks_total": pool.num_blocks,
                "blocks_used": pool.used,
                "blocks_free": pool.free,
                "blocks_reserved": pool.reserved,
            }
        return out


def split_budget(
    layout: KVLayout, budget_bytes: int, *, block_size: int, max_rows: int, max_chunk: int
) -> tuple[int, int]:
    """Tokens for the full and the sliding pool out of one byte budget.

    The sliding pool never needs more than every row's window (+ a chunk and two blocks of slack), so it gets that and
    the rest goes to the full pool; a budget too small for that splits evenly (a sliding table is never longer than
    the row's full table, so equal pools never make the sliding one the limit).
    """
    layer_tokens = budget_bytes // layout.bytes_per_token_layer
    n_full, n_sliding = layout.count("full"), layout.count("sliding")
    if not n_sliding:
        return layer_tokens // max(n_full, 1), 0
    assert layout.window is not None
    cap = max_rows * (layout.window + max_chunk + 2 * block_size)
    full = (layer_tokens - n_sliding * cap) // max(n_full, 1)
    if n_full and full >= cap:
        return full, cap
    even = layer_tokens // (n_full + n_sliding)
    return even, even


def budget_for_tokens(layout: KVLayout, tokens: int, *, block_size: int, max_rows: int, max_chunk: int) -> int:
    """The byte budget whose full pool holds ``tokens`` tokens (the inverse of ``split_budget``), for tests/bench."""
    b = layout.bytes_per_token_layer
    n_full, n_sliding = layout.count("full"), layout.count("sliding")
    tokens = math.ceil(tokens / block_size) * block_size
    if not n_sliding:
        return tokens * n_full * b
    assert layout.window is not None
    cap = max_rows * (layout.window + max_chunk + 2 * block_size)
    if tokens >= cap:
        return (tokens * n_full + cap * n_sliding) * b
    return tokens * (n_full + n_sliding) * b
