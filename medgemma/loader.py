"""Load a Gemma 3 checkpoint with the classes its config asks for, on the right device and dtype.

Image+text checkpoints (`model_type: gemma3`, e.g. medgemma-4b-it, medgemma-27b-it) load as
``AutoModelForImageTextToText`` + ``AutoProcessor``; text-only ones (`gemma3_text`, medgemma-27b-text-it) as
``AutoModelForCausalLM`` + ``AutoTokenizer``. Nothing here imports BentoML.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medgemma.config import Settings

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class LoadedModel:
    model: Any
    processor: Any  # Gemma3Processor (image+text) or the tokenizer (text-only)
    tokenizer: Any
    config: Any
    generation_config: Any
    kind: Literal["vlm", "text"]
    model_id: str  # what the settings named (hub id, directory or demo spec)
    path: str  # where it was loaded from
    device: str
    dtype: str
    is_demo: bool
    load_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def vision(self) -> bool:
        return self.kind == "vlm"


def resolve_source(settings: Settings) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is a built-in demo checkpoint)."""
    model = settings.model
    if model == "demo" or model.startswith("demo:"):
        from medgemma.config import parse_demo_spec
        from medgemma.demo import ensure_checkpoint

        kind, size = parse_demo_spec(model)
        return str(ensure_checkpoint(kind, size, root=settings.demo_dir or None)), True
    looks_local = model.startswith(("/", "./", "../", "~")) or os.path.isdir(os.path.expanduser(model))
    if looks_local:
        path = Path(model).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"model directory {path} does not exist")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model directory {path} has no config.json")
        return str(path), False
    return model, False


def pick_dtype(settings: Settings) -> Any:
    import torch

    if settings.dtype != "auto":
        return getattr(torch, settings.dtype)
    # Gemma 3 overflows in float16 (NaN/empty output), so "auto" never picks it: bf16 where the GPU has it, else fp32.
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _quantization_config(settings: Settings) -> Any:
    if settings.quantization == "none":
        return None
    try:
        from transformers import BitsAndBytesConfig
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise RuntimeError("quantization needs `pip install 'medgemma-bentoml[quantization]'`") from exc
    import torch

    if settings.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4")


def weight_files(path: str) -> list[Path]:
    p = Path(path)
    if not p.is_dir():
        return []
    return sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))


def load_model(settings: Settings, progress: ProgressFn | None = None) -> LoadedModel:
    """Load model + processor; report phases through ``progress`` (dicts with `phase` and counters)."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
        GenerationConfig,
    )

    report = progress or (lambda _d: None)
    started = time.monotonic()
    report({"phase": "resolving"})
    source, is_demo = resolve_source(settings)
    token = settings.hf_token or None
    common: dict[str, Any] = {"trust_remote_code": settings.trust_remote_code, "token": token}

    with _step("read the model config", source):
        config = AutoConfig.from_pretrained(source, **common)
    model_type = getattr(config, "model_type", "")
    vision = hasattr(config, "vision_config") and getattr(config, "vision_config", None) is not None
    if model_type == "gemma3_text" or not vision:
        kind: Literal["vlm", "text"] = "text"
        model_cls: Any = AutoModelForCausalLM
    else:
        kind = "vlm"
        model_cls = AutoModelForImageTextToText

    dtype = pick_dtype(settings)
    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {
        **common,
        "dtype": dtype,
        "attn_implementation": settings.attn_implementation,
    }
    if cuda:
        kwargs["device_map"] = settings.device_map
    quant = _quantization_config(settings)
    if quant is not None:
        kwargs["quantization_config"] = quant

    files = weight_files(source)
    total_bytes = sum(f.stat().st_size for f in files)
    report({"phase": "loading weights", "files_total": len(files), "bytes_total": total_bytes})
    log.info("loading %s (%s, dtype=%s, device=%s)", source, model_cls.__name__, dtype, "cuda" if cuda else "cpu")
    with _step(f"load the weights ({model_cls.__name__})", source), _track_shards(files, report):
        model = model_cls.from_pretrained(source, **kwargs)
    model.eval()
    report({"phase": "loading processor"})
    with _step("load the processor/tokenizer", source):
        if kind == "vlm":
            processor = AutoProcessor.from_pretrained(source, **common)
            tokenizer = processor.tokenizer
        else:
            processor = tokenizer = AutoTokenizer.from_pretrained(source, **common)
    try:
        generation_config = GenerationConfig.from_pretrained(source, **common)
    except OSError:
        generation_config = model.generation_config
    device = str(next(model.parameters()).device)
    seconds = time.monotonic() - started
    log.info("loaded %s in %.1f s on %s", source, seconds, device)
    from medgemma.demo import is_demo_checkpoint

    return LoadedModel(
        model=model,
        processor=processor,
        tokenizer=tokenizer,
        config=config,
        generation_config=generation_config,
        kind=kind,
        model_id=settings.model,
        path=source,
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        is_demo=is_demo or is_demo_checkpoint(config),
        load_seconds=seconds,
    )


class LoadError(RuntimeError):
    """A load step failed; the message names the step and the source, then the original error."""


@contextlib.contextmanager
def _step(what: str, source: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        raise LoadError(f"could not {what} from {source}: {type(exc).__name__}: {exc}") from exc


class _track_shards:
    """Count weight files as transformers opens them, for load progress (safetensors only)."""

    def __init__(self, files: list[Path], report: ProgressFn) -> None:
        self.files = {str(f.resolve()): f.stat().st_size for f in files}
        self.report = report
        self.seen: set[str] = set()
        self._orig: Any = None

    def __enter__(self) -> _track_shards:
        if not self.files:
            return self
        import safetensors

        self._orig = safetensors.safe_open
        orig = self._orig
        tracker = self

        def safe_open(filename: Any, *args: Any, **kwargs: Any) -> Any:
            key = str(Path(filename).resolve())
            if key in tracker.files and key not in tracker.seen:
                tracker.seen.add(key)
                tracker.report(
                    {
                        "phase": "loading weights",
                        "files_total": len(tracker.files),
                        "files_loaded": len(tracker.seen),
                        "bytes_total": sum(tracker.files.values()),
                        "bytes_loaded": sum(tracker.files[k] for k in tracker.seen),
                    }
                )
            return orig(filename, *args, **kwargs)

        safetensors.safe_open = safe_open
        self._patched = _patch_module_attr("transformers.modeling_utils", "safe_open", safe_open)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._orig is not None:
            import safetensors

            safetensors.safe_open = self._orig
            for restore in self._patched:
                restore()


def _patch_module_attr(module: str, name: str, value: Any) -> list[Callable[[], None]]:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError:
        return []
    if not hasattr(mod, name):
        return []
    old = getattr(mod, name)
    setattr(mod, name, value)
    return [lambda: setattr(mod, name, old)]
