"""The per-token LoRA compute: wrapped layers and the per-forward plan of which token uses which adapter.

``medgemma.lora.LoraSet`` owns these layers and sets ``owner._active`` (an ``Active``) around each forward pass;
a wrapped layer with no active plan is its base layer plus one ``None`` check. No BentoML here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

Domain = str  # "text" | "vision" | "logits"
DENSE_MAX_TOKENS = 256  # up to this many tokens in a layer call, all adapters are applied at once (see LoraLinear)


# --- the per-forward plan ----------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Tokens of one domain and shape, sorted by adapter: ``perm[start:end]`` are the flat positions of ``slot``."""

    perm: torch.Tensor | None  # None: every token uses the one adapter in ``groups``
    groups: list[tuple[int, int, int]]  # (slot, start, end)
    flat: torch.Tensor  # (N,) every token's slot, -1 for the base
    masks: dict[tuple[tuple[int, int], ...], torch.Tensor] = field(default_factory=dict)

    def mask(self, layout: tuple[tuple[int, int], ...], cols: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(N, C): 1 where column c of a layer's stacked LoRA belongs to the token's adapter. Layers with the same
        adapters share it, so it is built once per forward pass, not once per layer."""
        if layout not in self.masks:
            self.masks[layout] = (self.flat[:, None] == cols[None, :]).to(dtype)
        return self.masks[layout]


class Active:
    def __init__(self, token: torch.Tensor, image: torch.Tensor | None, logits: torch.Tensor | None) -> None:
        self.index = {"text": token, "vision": image, "logits": logits if logits is not None else token}
        self.plans: dict[tuple[Domain, tuple[int, ...]], Plan | None] = {}

    def plan(self, domain: Domain, shape: torch.Size) -> Plan | None:
        key = (domain, tuple(shape))
        if key not in self.plans:
            self.plans[key] = _make_plan(self.index[domain], shape, domain)
        return self.plans[key]


def _fit(index: torch.Tensor, shape: torch.Size, domain: Domain) -> torch.Tensor:
    """``index`` broadcast to ``shape``; for logits, the last positions (what ``logits_to_keep=n`` keeps)."""
    try:
        return index.expand(shape)
    except RuntimeError:
        if domain == "logits" and index.dim() == len(shape) and index.shape[-1] >= shape[-1]:
            return index[..., index.shape[-1] - shape[-1] :].expand(shape)
        raise RuntimeError(
            f"LoRA {domain} index of shape {tuple(index.shape)} does not fit the layer input {tuple(shape)}"
        ) from None


def _make_plan(index: torch.Tensor | None, shape: torch.Size, domain: Domain) -> Plan | None:
    if index is None:
        return None
    flat = _fit(index, shape, domain).reshape(-1)
    used = (flat >= 0).nonzero().squeeze(1)
    n_used = int(used.numel())
    if n_used == 0:
        return None
    keys = flat.index_select(0, used)
    counts = torch.bincount(keys).tolist()  # the one device sync of this domain in this forward pass
    groups: list[tuple[int, int, int]] = []
    start = 0
    for slot, n in enumerate(counts):
        if n:
            groups.append((slot, start, start + n))
            start += n
    if len(groups) == 1 and n_used == flat.numel():
        return Plan(perm=None, groups=groups, flat=flat)
    order = torch.sort(keys, stable=True).indices
    return Plan(perm=used.index_select(0, order), groups=groups, flat=flat)


# --- wrapped layers --------------------------------------------------------------------------------------------------


class Wrapped(nn.Module):
    """Base layer + per-adapter extras. The extras are plain tensors (not parameters), so the model's own memory
    footprint stays the base's and adapter memory is counted apart."""

    def __init__(self, base: nn.Module, domain: Domain, owner: Any) -> None:
        super().__init__()
        self.base = base
        self.domain = domain
        self._owner = [owner]  # in a list: nn.Module would otherwise try to register it
        self.lora: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> (A, scale * B)
        self.replace: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # slot -> (weight, bias)
        # Every adapter's A stacked (C, in) and B^T stacked (C, out), with each column's slot: see LoraLinear.
        self.stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[tuple[int, int], ...]] | None = None

    def add_lora(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        self.lora[slot] = (a, b)
        slots = sorted(self.lora)
        a_all = torch.cat([self.lora[s][0] for s in slots])
        bt_all = torch.cat([self.lora[s][1].t() for s in slots]).contiguous()
        ranks = [int(self.lora[s][0].shape[0]) for s in slots]
        cols = torch.repeat_interleave(torch.tensor(slots), torch.tensor(ranks)).to(a_all.device)
        self.stacked = (a_all, bt_all, cols, tuple(zip(slots, ranks, strict=True)))

    @property
    def weight(self) -> torch.Tensor:  # code that reads `layer.weight` (dtype checks, tied embeddings) still works
        return self.base.weight

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base"], name)  # in_features, embed_scale, padding_idx, ...

    def _plan(self, shape: torch.Size) -> Plan | None:
        active = self._owner[0]._active
        if active is None or (not self.lora and not self.replace):
            return None
        return active.plan(self.domain, shape)


class LoraLinear(Wrapped):
    """Two ways to add the deltas, picked per call by the number of tokens:

    * few tokens (decoding): every adapter at once, ``out += ((x @ A_all^T) * mask) @ B_all^T``, where ``mask``
      keeps each token's own adapter's columns: three kernels per layer whatever the number of adapters, which is
      what decoding steps are made of (per-kernel overhead, not FLOPs, is their cost);
    * many tokens (prefill): tokens sorted by adapter, two small matmuls per adapter on its own tokens only, so
      the FLOPs are proportional to the tokens that use an adapter.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._plan(x.shape[:-1])
        if plan is not None and plan.perm is None and plan.groups[0][0] in self.replace:
            w, b = self.replace[plan.groups[0][0]]  # every token uses one replaced copy: the base is not needed
            return F.linear(x, w, b)
        out = self.base(x)
        if plan is None:
            return out
        if plan.perm is None:  # one adapter for every token: no gather, no scatter
            ab = self.lora.get(plan.groups[0][0])
            return out if ab is None else out + F.linear(F.linear(x, ab[0]), ab[1])
        out = out.contiguous()
        flat_out = out.view(-1, out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        replaced = [g for g in plan.groups if g[0] in self.replace]
        if self.stacked is not None and x2.shape[0] <= DENSE_MAX_TOKENS and not replaced:
            a_all, bt_all, cols, layout = self.stacked
            h = F.linear(x2, a_all) * plan.mask(layout, cols, x2.dtype)
            flat_out.addmm_(h, bt_all)
            return out
        xs = x2.index_select(0, plan.perm)
        for slot, s, e in plan.groups:
            if slot in self.replace:
                w, b = self.replace[slot]
                flat_out.index_copy_(0, plan.perm[s:e], F.linear(xs[s:e], w, b))
            elif slot in self.lora:
                a, b = self.lora[slot]
                flat_out.index_add_(0, plan.perm[s:e], F.linear(F.linear(xs[s:e], a), b))
        return out


class LoraEmbedding(Wrapped):
    """``modules_to_save`` copy of the token embedding, per token (Gemma's embedding scale kept)."""

    def _embed(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = F.embedding(ids, weight, getattr(self.base, "padding_idx", None))
        scale = getattr(self.base, "embed_scale", None)
        return out if scale is None else out * scale.to(weight.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        plan = self._plan(ids.shape)
        if plan is not None and plan.perm is None and plan.groups[0][0] in self.replace:
            return self._embed(ids, self.replace[plan.groups[0][0]][0])
        out = self.base(ids)
        if plan is None or plan.perm is None:
            return out
        flat_out = out.view(-1, out.shape[-1])
        flat_ids = ids.reshape(-1).index_select(0, plan.perm)
        for slot, s, e in plan.groups:
            if slot in self.replace:
                flat_out.index_copy_(0, plan.perm[s:e], self._embed(flat_ids[s:e], self.replace[slot][0]))
        return out
