"""Many LoRA adapters over one base model, chosen per token: rows with different adapters share one forward pass.

How: every linear layer an adapter targets is wrapped (once) by a module that computes the base output and then
adds, for each adapter, ``scale * B @ (A @ x)`` to the tokens that use it. Which token uses which adapter is an
integer tensor the engine sets around each forward pass (``with lora_set.active(token_adapter_index): ...``;
``-1`` = base), broadcastable to the layer input's leading shape, so the same code serves today's left-padded
``(B, L)`` prefill and ``(B, 1)`` decode and a packed ``(1, T)`` layout alike. The index is turned into a plan once
per forward pass and domain (one device sync); then each layer either applies every adapter at once through
stacked matrices and a per-token mask (few tokens: decode steps, three kernels per layer) or sorts the tokens by
adapter and runs two small matmuls per adapter on its own tokens (many tokens: prefill, work proportional to the
tokens that use an adapter). A batch without adapters costs a ``None`` check per layer. ``modules_to_save`` copies
of linear and embedding layers (Google's MedGemma notebook saves ``lm_head`` and ``embed_tokens``) are served the
same way, as per-token replacements.

Why not PEFT's own mixed-adapter batches (``model(..., adapter_names=[...])``): they take one adapter per batch
*row*, so they cannot serve packed tokens, where one row holds many requests; they need the whole model wrapped in
``PeftModel``; and they split the batch by adapter in Python in every layer, several kernels per adapter. Measured
with ``bench/lora_overhead.py`` (``small`` text demo, fp32, 2 CPU cores, 16 rows of 64 prompt tokens, 4 adapters of
rank 16 on every linear layer; milliseconds, best of 3 interleaved rounds):

                         prefill ms  decode ms/step  prefill/base  decode/base
    base, no adapters         260.2          13.58          1.00         1.00
    medgemma.lora             318.5          18.15          1.22         1.34
    PEFT mixed batch          356.6          30.57          1.37         2.25

Three token domains: the language model's tokens (``token_index``), the images of the vision tower
(``image_index``, one entry per image) and the rows of the logits (``logits_index``, defaulting to the last
positions of ``token_index``, which is what ``logits_to_keep=n`` keeps). The layers and the per-forward plan are in
``medgemma.lora_layers``; the files are read by ``medgemma.lora_files``. No BentoML here.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from medgemma.errors import AdapterFailed, AdapterLoading, NotFound
from medgemma.lora_files import AdapterError, AdapterFile, read_adapter, resolve_directory
from medgemma.lora_layers import Active, Domain, LoraEmbedding, LoraLinear, Wrapped

log = logging.getLogger(__name__)


# Module paths of adapters saved with older transformers (before the Gemma 3 refactor in 4.52), mapped to today's.
_LEGACY_PREFIXES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head", "lm_head"),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("model.vision_tower.vision_model.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


@dataclass
class AdapterInfo:
    """What listings, /health and /schema say about one configured adapter."""

    name: str
    source: str
    state: str = "loading"  # loading | ready | failed
    error: str | None = None
    index: int = -1
    rank: int | None = None
    alpha: float | None = None
    use_rslora: bool = False
    target_modules: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    vision_tower: bool = False
    base_model: str | None = None
    memory_bytes: int = 0
    load_seconds: float | None = None

    def public(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.name, "source": self.source, "state": self.state}
        if self.state == "failed":
            body["error"] = self.error
            return body
        if self.state == "ready":
            body.update(
                {
                    "rank": self.rank,
                    "alpha": self.alpha,
                    "use_rslora": self.use_rslora,
                    "target_modules": self.target_modules,
                    "modules_to_save": self.modules_to_save,
                    "vision_tower": self.vision_tower,
                    "base_model": self.base_model,
                    "memory_mb": round(self.memory_bytes / 2**20, 3),
                    "load_seconds": round(self.load_seconds or 0.0, 3),
                }
            )
        return body


# --- the set of adapters ---------------------------------------------------------------------------------------------


@dataclass
class _Bound:
    """An adapter's tensors matched to the base model's layers, on its device and dtype, ready to install."""

    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    replace: dict[str, tuple[torch.Tensor, torch.Tensor | None]]
    memory_bytes: int


class LoraSet:
    """The adapters served over one loaded model. ``load`` runs on a loader thread; ``active`` on the engine's."""

    def __init__(self, model: nn.Module, *, max_adapters: int, max_rank: int, token: str | None = None) -> None:
        self.model = model
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        self.token = token
        self.adapters: dict[str, AdapterInfo] = {}
        self._modules = dict(model.named_modules())  # the base layers, by path, before any wrapping
        self._wrapped: dict[str, Wrapped] = {}
        self._slots: list[str] = []
        self._active: Active | None = None
        self._forward = threading.Lock()  # held by the engine around each forward pass
        self._pending: list[tuple[AdapterInfo, _Bound]] = []
        self._pending_lock = threading.Lock()
        self._dtype = _model_dtype(model)

    # -- what requests and listings see
    def register(self, name: str, source: str) -> AdapterInfo:
        info = AdapterInfo(name=name, source=source)
        self.adapters[name] = info
        if len(self.adapters) > self.max_adapters:
            self._fail(info, f"more than MEDGEMMA_MAX_LORA_ADAPTERS={self.max_adapters} adapters are configured")
        return info

    def index_of(self, name: str) -> int:
        """The adapter's slot for the engine, or the 404 / 202 / 503 that a request naming it gets instead."""
        info = self.adapters.get(name)
        if info is None:
            raise NotFound(
                f"adapter '{name[:100]}' is not served here; served: {', '.join(self.adapters) or 'none'}",
                param="adapter",
            )
        if info.state == "loading":
            raise AdapterLoading(name)
        if info.state == "failed":
            raise AdapterFailed(name, info.error or "unknown error")
        return info.index

    def name_of(self, index: int) -> str | None:
        return self._slots[index] if 0 <= index < len(self._slots) else None

    @property
    def memory_bytes(self) -> int:
        return sum(i.memory_bytes for i in self.adapters.values() if i.state == "ready")

    def listing(self) -> list[dict[str, Any]]:
        return [info.public() for info in self.adapters.values()]

    # -- loading (loader thread)
    def load(self, name: str) -> None:
        """Read, check and install one registered adapter; any failure becomes its stored error."""
        info = self.adapters[name]
        if info.state == "failed":
            return
        started = time.monotonic()
        try:
            adapter = read_adapter(resolve_directory(info.source, token=self.token))
            if adapter.max_rank > self.max_rank:
                raise AdapterError(
                    f"rank {adapter.max_rank} is above MEDGEMMA_MAX_LORA_RANK={self.max_rank}; raise the setting "
                    "to serve it"
                )
            bound = self._bind(adapter, info)
        except AdapterError as exc:
            self._fail(info, str(exc))
            return
        except Exception as exc:  # anything unexpected is still this adapter's problem, not the server's
            self._fail(info, f"{type(exc).__name__}: {exc}"[:1000])
            return
        info.load_seconds = time.monotonic() - started
        with self._pending_lock:
            self._pending.append((info, bound))
        # The engine installs pending adapters before its next forward pass; when it is idle, do it here.
        while info.state == "loading":
            if self._forward.acquire(timeout=0.05):
                try:
                    self._install_pending()
                finally:
                    self._forward.release()
        log.info(
            "LoRA adapter %s ready: rank %s, %d layers, %.1f MB, %.2f s",
            name,
            info.rank,
            len(bound.lora) + len(bound.replace),
            info.memory_bytes / 2**20,
            info.load_seconds,
        )

    def _fail(self, info: AdapterInfo, message: str) -> None:
        info.state, info.error = "failed", message[:2000]
        log.error("LoRA adapter %s failed to load: %s", info.name, info.error)

    def _bind(self, adapter: AdapterFile, info: AdapterInfo) -> _Bound:
        """Match every saved layer to a base layer with the same shapes; move the tensors to its device."""
        lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        replace: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        memory = 0
        targets: set[str] = set()
        vision = False
        has_tower = any(".vision_tower." in f".{p}." for p in self._modules)
        if not has_tower and any("vision_tower" in p for p in [*adapter.lora, *adapter.replaced]):
            raise AdapterError(
                "the adapter adapts a vision tower, which this text-only model does not have: it was trained on an "
                "image+text model"
            )
        for saved, t in adapter.lora.items():
            path, module = self._find(saved)
            _check_target(path, module)
            in_f, out_f = _features(module)
            if t.a.shape[1] != in_f or t.b.shape[0] != out_f:
                raise AdapterError(
                    f"layer {path} is {in_f}->{out_f} in the served model but the adapter's LoRA is "
                    f"{t.a.shape[1]}->{t.b.shape[0]}: the adapter was trained on another base model"
                )
            device = _device_of(module)
            a = t.a.to(device=device, dtype=self._dtype).contiguous()
            b = (t.b.to(torch.float32) * t.scale).to(device=device, dtype=self._dtype).contiguous()
            lora[path] = (a, b)
            memory += a.numel() * a.element_size() + b.numel() * b.element_size()
            targets.add(path.rsplit(".", 1)[-1])
            vision = vision or _domain(path, module, self.model) == "vision"
        for saved, params in adapter.replaced.items():
            path, module = self._find(saved)
            _check_target(path, module)
            if not isinstance(module, nn.Linear | nn.Embedding):
                raise AdapterError(
                    f"modules_to_save layer {path} is a {type(module).__name__}; only linear and embedding layers "
                    "can be served per request"
                )
            weight = params.get("weight")
            if weight is None or tuple(weight.shape) != tuple(module.weight.shape):
                got = None if weight is None else tuple(weight.shape)
                raise AdapterError(
                    f"modules_to_save layer {path} has weight {got} but the served model's is "
                    f"{tuple(module.weight.shape)}: the adapter was trained on another base model"
                )
            device = _device_of(module)
            w = weight.to(device=device, dtype=self._dtype).contiguous()
            bias = params.get("bias")
            b = None if bias is None else bias.to(device=device, dtype=self._dtype)
            replace[path] = (w, b)
            memory += w.numel() * w.element_size() + (0 if b is None else b.numel() * b.element_size())
        info.rank = adapter.max_rank or adapter.rank
        info.alpha = adapter.alpha
        info.use_rslora = adapter.use_rslora
        info.target_modules = sorted(targets)
        info.modules_to_save = sorted({p.rsplit(".", 1)[-1] for p in replace})
        info.vision_tower = vision
        info.base_model = adapter.base_model
        info.memory_bytes = memory
        return _Bound(lora=lora, replace=replace, memory_bytes=memory)

    def _find(self, saved: str) -> tuple[str, nn.Module]:
        if "multi_modal_projector" in saved:
            raise AdapterError(
                f"the adapter changes the multimodal projector ({saved}), which this server does not serve per request"
            )
        for candidate in _candidates(saved):
            module = self._modules.get(candidate)
            if module is not None:
                return candidate, module
        raise AdapterError(
            f"the adapter adapts layer {saved}, which the served model does not have: it was trained on another base "
            "model"
        )

    # -- installing (engine thread, or the loader while the engine is idle)
    def _install_pending(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, []
        for info, bound in pending:
            slot = len(self._slots)
            self._slots.append(info.name)
            for path, ab in bound.lora.items():
                self._wrap(path).add_lora(slot, *ab)
            for path, wb in bound.replace.items():
                self._wrap(path).replace[slot] = wb
            info.index, info.state = slot, "ready"

    def _wrap(self, path: str) -> Wrapped:
        if path in self._wrapped:
            return self._wrapped[path]
        base = self._modules[path]
        cls = LoraEmbedding if isinstance(base, nn.Embedding) else LoraLinear
        wrapper = cls(base, _domain(path, base, self.model), self)
        parent_path, _, attr = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        setattr(parent, attr, wrapper)
        self._wrapped[path] = wrapper
        return wrapper

    # -- serving (engine thread)
    @contextlib.contextmanager
    def active(
        self,
        token_index: torch.Tensor | None,
        image_index: torch.Tensor | None = None,
        logits_index: torch.Tensor | None = None,
    ) -> Iterator[None]:
        """Run one forward pass with these per-token adapters (``-1`` = base). Installs adapters that finished
        loading first, so layers are only ever swapped between forward passes."""
        with self._forward:
            if self._pending:
                self._install_pending()
            if not _any_adapter(token_index, image_index, logits_index):
                yield
                return
            device = _device_of(self.model)
            self._active = Active(
                *(None if t is None else t.to(device, non_blocking=True) for t in (token_index, image_index)),
                None if logits_index is None else logits_index.to(device, non_blocking=True),
            )
            try:
                yield
            finally:
                self._active = None


def resolve_adapter(lora_set: LoraSet | None, name: str | None) -> int:
    """A request's adapter name as the engine's slot (-1 = base), or the answer a request naming it gets."""
    if name is None:
        return -1
    if lora_set is None:
        raise NotFound(
            f"adapter '{name[:100]}' is not served here; no adapters are configured (MEDGEMMA_LORA_ADAPTERS)",
            param="adapter",
        )
    return lora_set.index_of(name)


def rows_active(
    lora_set: LoraSet | None, row_adapters: Sequence[int], images_per_row: Sequence[int] | None = None
) -> contextlib.AbstractContextManager[None]:
    """The engine's one call: a forward pass over rows in the ``(B, L)`` layout, each row with one adapter."""
    if lora_set is None or not lora_set.adapters:
        return contextlib.nullcontext()
    rows = torch.tensor(list(row_adapters), dtype=torch.long)
    images = None
    if images_per_row is not None and any(images_per_row):
        images = torch.repeat_interleave(rows, torch.tensor(list(images_per_row), dtype=torch.long))[:, None]
    return lora_set.active(rows[:, None], images)


# --- helpers ---------------------------------------------------------------------------------------------------------


def _any_adapter(*indices: torch.Tensor | None) -> bool:
    return any(t is not None and t.numel() and int(t.max()) >= 0 for t in indices)


def _candidates(saved: str) -> list[str]:
    out = [saved]
    for old, new in _LEGACY_PREFIXES:
        if saved.startswith(old):
            out.append(new + saved[len(old) :])
    return out


def _domain(path: str, module: nn.Module, model: nn.Module) -> Domain:
    """Which index a layer reads: the vision tower's (per image), the logits' (per kept row) or the tokens'."""
    if ".vision_tower." in f".{path}":
        return "vision"
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(out, Wrapped):
        out = out.base
    return "logits" if module is out or path == "lm_head" else "text"


def _check_target(path: str, module: nn.Module) -> None:
    if not hasattr(module, "weight") or not all(_features(module)):
        raise AdapterError(f"layer {path} is a {type(module).__name__}, not a linear layer LoRA can adapt")


def _features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return int(getattr(module, "in_features", 0) or 0), int(getattr(module, "out_features", 0) or 0)


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The compute dtype: the model's floating dtype (a quantized model's int8 weights do not count)."""
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32
