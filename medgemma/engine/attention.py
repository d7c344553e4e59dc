"""Attention over the paged KV cache, plugged into transformers' Gemma 3 layers through ``AttentionInterface``.

One forward pass runs on **packed** tokens: every scheduled row's new tokens side by side in one ``(1, T)``
sequence, each with its own position id (so RoPE sees the row's own positions). transformers computes Q/K/V,
norms and RoPE as usual; ``paged_attention`` then

1. writes the new K/V into the pool slots the step plan gives (in place, no cache object, no copies of anyone's
   past), and
2. attends each row's queries to its own context, gathered from its blocks.

The step plan is passed where transformers expects the attention mask (the model forwards a ``dict`` of masks per
layer kind untouched), so nothing in transformers is patched; a call without a plan (e.g. ``generate()`` on the
same model) falls through to the attention the model was loaded with.

**Cost follows each row's own length (length grouping).** Decode rows are grouped by context length; a group pads
only to its own longest row, and a row joins a group only when padding it costs at most a third of its own length or
128 tokens, whichever is more. One long row beside short ones is its own group, so a decode step costs about the
sum of the rows' lengths, not rows x longest. Each group is one ``scaled_dot_product_attention`` call (SDPA's own
kernels, GQA without repeating K/V). A prefill chunk is a group of its own with an explicit mask: causal, Gemma 3's
bidirectional attention inside each image (the ``token_type_ids`` semantics), and the sliding window on local layers:
``AND(window, OR(causal, same image))``, as transformers builds it.

Measured on the ``small`` demo checkpoint (CPU, fp32): a gather + SDPA per group costs ~0.1 ms per layer, so 16 rows
in 1-3 groups add well under a millisecond per layer to a decode step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from medgemma.engine.kv_cache import Kind, PagedKVCache, RowKV, language_attention_modules

ATTN_NAME = "medgemma_paged"
_GROUP_SLACK_TOKENS = 128
_GROUP_SLACK_RATIO = 0.75


@dataclass
class Chunk:
    """One row's share of a step: the positions [start, end) whose K/V it writes and whose queries it runs."""

    kv: RowKV
    start: int
    end: int
    image_groups: torch.Tensor | None = None  # (n_prompt,) image index per prompt position, -1 for text


@dataclass
class Group:
    q_index: torch.Tensor  # (B, Q) indices into the packed tokens
    kv_slots: torch.Tensor  # (B, L) pool slots (padding points at a valid slot and is masked)
    mask: torch.Tensor | None  # (B, 1, Q, L) bool, True = attend; None = everything
    identity: bool = False  # q_index is every packed token in order: no gather or scatter of queries needed


@dataclass
class LayerPlan:
    """What the layers of one kind do in this step."""

    cache: PagedKVCache
    write_slots: torch.Tensor  # (T,)
    groups: list[Group]
    _moved: dict[torch.device, LayerPlan] = field(default_factory=dict)

    def on(self, device: torch.device) -> LayerPlan:
        """This plan with its index tensors on ``device`` (layers spread over GPUs by device_map)."""
        if self.write_slots.device == device:
            return self
        if device not in self._moved:
            self._moved[device] = LayerPlan(
                self.cache,
                self.write_slots.to(device),
                [
                    Group(
                        g.q_index.to(device),
                        g.kv_slots.to(device),
                        None if g.mask is None else g.mask.to(device),
                        g.identity,
                    )
                    for g in self.groups
                ],
            )
        return self._moved[device]


def build_plans(cache: PagedKVCache, chunks: list[Chunk], device: torch.device) -> dict[str, LayerPlan]:
    """The per-kind plans of one step, keyed as transformers keys its masks ("full_attention", ...)."""
    plans: dict[str, LayerPlan] = {}
    for kind in cache.pools:
        plans[f"{kind}_attention"] = _build(cache, kind, chunks, device)
    return plans


def _build(cache: PagedKVCache, kind: Kind, chunks: list[Chunk], device: torch.device) -> LayerPlan:
    bs = cache.block_size
    window = cache.window if kind == "sliding" else None
    writes: list[torch.Tensor] = []
    groups: list[Group] = []
    decode: list[tuple[int, torch.Tensor]] = []  # (packed index, the row's key slots)
    total = sum(c.end - c.start for c in chunks)
    offset = 0
    for c in chunks:
        table = c.kv.table(kind)
        slots, base = table.slots(device, bs), table.first * bs
        writes.append(slots[c.start - base : c.end - base])
        kv_start = 0 if window is None else max(0, c.start - window + 1)
        kv_slots = slots[kv_start - base : c.end - base]
        n_q = c.end - c.start
        if n_q == 1 and c.image_groups is None:
            decode.append((offset, kv_slots))
        else:
            groups.append(_prefill_group(c, kv_slots, offset=offset, kv_start=kv_start, window=window, total=total))
        offset += n_q
    groups.extend(_decode_groups(decode, total, device))
    return LayerPlan(cache, writes[0] if len(writes) == 1 else torch.cat(writes), groups)


def _prefill_group(
    c: Chunk, kv_slots: torch.Tensor, *, offset: int, kv_start: int, window: int | None, total: int
) -> Group:
    device = kv_slots.device
    kpos = torch.arange(kv_start, c.end, device=device)
    qpos = torch.arange(c.start, c.end, device=device)
    allowed = kpos[None, :] <= qpos[:, None]
    if c.image_groups is not None:
        groups = c.image_groups.to(device)
        n = groups.shape[0]
        qg = torch.where(qpos < n, groups[qpos.clamp(max=n - 1)], -1)
        kg = torch.where(kpos < n, groups[kpos.clamp(max=n - 1)], -1)
        allowed = allowed | ((qg[:, None] == kg[None, :]) & (qg[:, None] >= 0))
    if window is not None:
        allowed = allowed & (kpos[None, :] > qpos[:, None] - window)
    q_index = torch.arange(offset, offset + qpos.shape[0], device=device)
    identity = offset == 0 and qpos.shape[0] == total
    return Group(q_index[None], kv_slots[None], allowed[None, None], identity)


def _decode_groups(rows: list[tuple[int, torch.Tensor]], total: int, device: torch.device) -> list[Group]:
    """Length grouping of one-token rows: each group pads only to its own longest row."""
    if not rows:
        return []
    by_length = sorted(rows, key=lambda r: -r[1].shape[0])
    out: list[list[tuple[int, torch.Tensor]]] = []
    current: list[tuple[int, torch.Tensor]] = []
    for r in by_length:
        if current:
            longest, length = current[0][1].shape[0], r[1].shape[0]
            if length < longest * _GROUP_SLACK_RATIO and longest - length > _GROUP_SLACK_TOKENS:
                out.append(current)
                current = []
        current.append(r)
    out.append(current)
    return [_decode_group(sorted(g, key=lambda r: r[0]), total, device) for g in out]


def _decode_group(rows: list[tuple[int, torch.Tensor]], total: int, device: torch.device) -> Group:
    views = [r[1] for r in rows]
    lengths = [v.shape[0] for v in views]
    if len(set(lengths)) == 1:
        slots, mask = torch.stack(views), None
    else:  # padding points at slot 0 (valid memory) and is masked
        slots = torch.nn.utils.rnn.pad_sequence(views, batch_first=True, padding_value=0)
        valid = torch.arange(max(lengths), device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
        mask = valid[:, None, None, :]
    offsets = [r[0] for r in rows]
    q_index = torch.tensor(offsets, device=device)[:, None]
    return Group(q_index, slots, mask, identity=offsets == list(range(total)))


def paged_attention(  # noqa: PLR0917 - the signature transformers calls
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` function: query (1, Hq, T, D), key/value (1, Hkv, T, D) → ((1, T, Hq, D), None)."""
    if not isinstance(attention_mask, LayerPlan):
        fallback = _FALLBACK.get(id(module.config))
        assert fallback is not None, "paged attention was not installed on this model"
        return fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    plan = attention_mask.on(query.device)
    layer = module.layer_idx
    k_pool, v_pool = plan.cache.k[layer], plan.cache.v[layer]
    k_pool.index_copy_(0, plan.write_slots, key[0].transpose(0, 1))
    v_pool.index_copy_(0, plan.write_slots, value[0].transpose(0, 1))
    q_all = query[0].transpose(0, 1)  # (T, Hq, D)
    gqa = query.shape[1] != key.shape[1]
    out: torch.Tensor | None = None
    for g in plan.groups:
        b, n_kv = g.kv_slots.shape
        flat = g.kv_slots.reshape(-1)
        k = k_pool.index_select(0, flat).view(b, n_kv, *k_pool.shape[1:]).transpose(1, 2)
        v = v_pool.index_select(0, flat).view(b, n_kv, *v_pool.shape[1:]).transpose(1, 2)
        if g.identity:  # one group, every token in order (a batch of decode rows, or one prompt chunk): no copies
            q = query if b == 1 else q_all.unsqueeze(2)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask, scale=scaling, enable_gqa=gqa)
            return o.transpose(1, 2).reshape(1, q_all.shape[0], *q_all.shape[1:]), None
        if out is None:
            out = torch.empty_like(q_all)
        q = q_all[g.q_index].transpose(1, 2)  # (B, Hq, Q, D)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask, scale=scaling, enable_gqa=gqa)
        out[g.q_index] = o.transpose(1, 2)
    assert out is not None
    return out.unsqueeze(0), None


_FALLBACK: dict[int, Any] = {}


def install(model: Any) -> None:
    """Route the language layers' attention through ``paged_attention`` (the vision tower keeps its own)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    AttentionInterface.register(ATTN_NAME, paged_attention)
    for m in language_attention_modules(model):
        cfg = m.config
        if getattr(cfg, "attn_logit_softcapping", None):
            raise ValueError("paged attention does not implement attention logit soft-capping")
        current = cfg._attn_implementation
        if current == ATTN_NAME:
            continue
        if current in (None, "eager") or current not in ALL_ATTENTION_FUNCTIONS:
            import importlib

            modeling = importlib.import_module(type(m).__module__)
            _FALLBACK[id(cfg)] = modeling.eager_attention_forward
        else:
            _FALLBACK[id(cfg)] = ALL_ATTENTION_FUNCTIONS[current]
        # transformers picks the mask format by the attention's name: a call that falls through to the original
        # attention (e.g. generate()) must get that attention's masks, sliding window included. Our own steps pass
        # their plans instead and never build one.
        mask_kind = current if current in ALL_MASK_ATTENTION_FUNCTIONS else "eager"
        AttentionMaskInterface.register(ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS[mask_kind])
        cfg._attn_implementation_internal = ATTN_NAME
