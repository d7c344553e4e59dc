"""Settings: every knob of the service, declared once with its default, environment variable and meaning.

``Settings.from_env()`` is the only place that reads ``MEDGEMMA_*`` variables. The README's settings table is
generated from the same declarations (``python -m medgemma.config``), and a test keeps the two in sync.

BentoML's own runtime settings (port, traffic timeout, concurrency, logging, metrics) live in
``configuration.yaml`` instead; ``load_bentoml_config`` reads that file so that a plain ``bentoml serve`` applies
it (BentoML itself only reads a config file named by ``BENTOML_CONFIG``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

ENV_PREFIX = "MEDGEMMA_"
DEFAULT_MODEL = "google/medgemma-27b-it"
SERVICE_NAME = "MedGemma"

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
Quantization = Literal["none", "8bit", "4bit"]
FrameSelection = Literal["middle", "first", "all"]


def setting(default: Any, help: str, *, env: str | None = None, secret: bool = False) -> Any:
    """Declare one setting: its default, its one-line meaning and (optionally) a non-standard env var."""
    return field(default=default, metadata={"help": help, "env": env, "secret": secret})


@dataclass(frozen=True)
class Settings:
    # --- model ---------------------------------------------------------------------------------------------------
    model: str = setting(
        DEFAULT_MODEL,
        "Hugging Face model id or local checkpoint directory; `demo`, `demo:small`, `demo:tiny-text`, "
        "`demo:small-text` build a random-weight demo checkpoint locally.",
    )
    app_name: str = setting("", "Route prefix `/{app}/v1/...`; empty derives it from the model (`medgemma-27b-it`).")
    load_on_startup: bool = setting(
        True, "Start loading when the server starts; `false` loads on the first request (scale from zero)."
    )
    dtype: Dtype = setting(
        "auto", "`auto` = bfloat16 on GPUs that support it, float32 otherwise; float16 only when asked."
    )
    device_map: str = setting("auto", "Passed to `from_pretrained`: `auto` spreads over all visible GPUs.")
    attn_implementation: str = setting(
        "sdpa",
        "Attention of the vision tower (`sdpa`, `eager`, `flex_attention`); the language layers always use the "
        "engine's paged attention.",
    )
    quantization: Quantization = setting("none", "`8bit` / `4bit` load through bitsandbytes (optional extra).")
    trust_remote_code: bool = setting(False, "Run model code from the Hub; Gemma 3 is native, so keep it off.")
    hf_token: str = setting("", "Token for gated models; used when set, never required.", env="HF_TOKEN", secret=True)
    demo_dir: str = setting("", "Where demo checkpoints are built; empty = `~/.cache/medgemma/demo`.")

    # --- LoRA adapters -------------------------------------------------------------------------------------------
    lora_adapters: tuple[str, ...] = setting(
        (),
        "LoRA adapters served over the base model, `name=path[,name=path]`: PEFT adapter directories (or Hugging Face "
        "ids when online), loaded in the background after the base; a request picks one by name.",
    )
    max_lora_adapters: int = setting(8, "Most LoRA adapters loaded; adapters beyond it are reported as failed.")
    max_lora_rank: int = setting(64, "Largest LoRA rank loaded; an adapter of higher rank is reported as failed.")

    # --- lifecycle -----------------------------------------------------------------------------------------------
    load_retry_backoff_s: float = setting(
        30.0, "After a failed load, answer 503 with the stored error this long before a request retries."
    )
    loading_retry_after_s: int = setting(10, "`Retry-After` seconds suggested in 202 answers while loading.")
    idle_unload_s: float = setting(0.0, "Unload the model after this many idle seconds; 0 never unloads.")
    shutdown_grace_s: float = setting(
        20.0, "On SIGTERM: refuse new work (503) and let running requests finish for up to this long."
    )

    # --- generation ----------------------------------------------------------------------------------------------
    default_max_new_tokens: int = setting(200, "`max_new_tokens` when a request does not set it (seed default).")
    max_new_tokens_cap: int = setting(4096, "Largest `max_new_tokens` a request may ask for.")
    max_batch_size: int = setting(16, "Most sequences decoded together in one forward pass.")
    max_queue: int = setting(256, "Most requests waiting for a batch slot; more are answered 429.")
    kv_cache_mb: int = setting(
        0,
        "KV cache pool size in MiB; 0 = 85 % of the GPU memory free after loading, or 2048 on CPU. Requests wait "
        "for room in it; one that could never fit is a 400.",
    )
    kv_block_size: int = setting(16, "Tokens per KV cache block (the paging unit).")
    prefill_chunk_tokens: int = setting(
        512, "Longest prompt chunk read in one step; a prompt is read in chunks (never splitting an image)."
    )
    prefill_share: float = setting(
        0.6,
        "While requests are decoding, long prompts get this fraction of the decoding steps' measured time, read in "
        "chunks of at least 64 tokens.",
    )
    cuda_graphs: bool = setting(
        False,
        "Run steps where every request decodes in bucketed fixed shapes, each captured as a CUDA graph on first use "
        "and replayed (GPU; pads rows and context to buckets). On a CPU the bucketed steps run without graphs. "
        "Not used while LoRA adapters are loaded.",
    )
    max_constraint_bytes: int = setting(
        32768, "Largest JSON schema, regex, choice list or grammar in one request (bytes, compact JSON); larger is 400."
    )

    # --- inputs and limits ---------------------------------------------------------------------------------------
    max_body_bytes: int = setting(128 * 1024 * 1024, "Largest request body; larger bodies get 413.")
    max_image_bytes: int = setting(32 * 1024 * 1024, "Largest encoded image or DICOM file.")
    max_image_pixels: int = setting(40_000_000, "Largest image frame (width x height), checked before decoding.")
    max_images: int = setting(
        128, "Most images per request, counted after sampling (a CT series gives 85 slices, a slide up to 125 patches)."
    )
    max_text_chars: int = setting(200_000, "Longest text in one message part or system prompt.")
    dicom_frames: FrameSelection = setting("middle", "Frames of a multi-frame DICOM used: middle, first or all.")
    image_url_domains: tuple[str, ...] = setting(
        (), "Comma-separated domains whose http(s) image URLs may be fetched; empty fetches none."
    )

    # --- volumes, slides and DICOMweb ----------------------------------------------------------------------------
    max_slices: int = setting(
        85, "A CT/MR series is sampled evenly down to at most this many slices (Google's CT notebook uses 85)."
    )
    wsi_magnification: float = setting(
        10.0, "Whole-slide images are cut into patches at the level nearest this magnification (10x ~ 1 um/pixel)."
    )
    wsi_max_patches: int = setting(125, "Most tissue patches taken from one slide (a seeded random sample).")
    dicomweb_urls: tuple[str, ...] = setting(
        (),
        "Comma-separated DICOMweb roots (`https://pacs.example.org/dicom-web`) that `image_dicom` sources may name; "
        "empty fetches none.",
    )
    dicomweb_connect_timeout_s: float = setting(5.0, "Seconds to wait for a DICOMweb server to accept a connection.")
    dicomweb_read_timeout_s: float = setting(30.0, "Seconds to wait for each answer (or chunk) from a DICOMweb server.")
    dicomweb_max_bytes: int = setting(
        1024 * 1024 * 1024, "Most bytes fetched from DICOMweb servers for one request; more is a 413."
    )
    dicomweb_concurrency: int = setting(4, "Most DICOMweb fetches in flight at once for one request.")

    # --- Vertex AI custom container (Google's request format at POST /predict) -------------------------------------
    aip_predict_route: str = setting(
        "",
        "Set by Vertex AI: another path that serves `POST /predict` (Google's request format).",
        env="AIP_PREDICT_ROUTE",
    )
    aip_health_route: str = setting(
        "", "Set by Vertex AI: a path answering 200 once the model is ready, 503 before.", env="AIP_HEALTH_ROUTE"
    )
    aip_http_port: int = setting(
        0, "Set by Vertex AI: the port to listen on; 0 keeps configuration.yaml's.", env="AIP_HTTP_PORT"
    )

    # --- security and logs ---------------------------------------------------------------------------------------
    api_token: str = setting("", "When set, model routes need `Authorization: Bearer <token>`.", secret=True)
    log_content: bool = setting(False, "Debug only: log prompt and generated text (patient data!).")

    # ---------------------------------------------------------------------------------------------------------------
    @classmethod
    def env_name(cls, name: str) -> str:
        f = _FIELDS[name]
        return f.metadata["env"] or ENV_PREFIX + name.upper()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every setting from ``environ`` (default ``os.environ``); ``overrides`` win over both."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            env = cls.env_name(f.name)
            if f.name in overrides:
                values[f.name] = overrides[f.name]
            elif env in environ and environ[env] != "":
                values[f.name] = _parse(f.name, env, environ[env], _TYPES[f.name])
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        positive = (
            "default_max_new_tokens",
            "max_new_tokens_cap",
            "max_batch_size",
            "max_queue",
            "kv_block_size",
            "prefill_chunk_tokens",
            "max_constraint_bytes",
            "max_body_bytes",
            "max_image_bytes",
            "max_image_pixels",
            "max_images",
            "max_text_chars",
            "max_lora_adapters",
            "max_lora_rank",
            "max_slices",
            "wsi_max_patches",
            "dicomweb_max_bytes",
            "dicomweb_concurrency",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{self.env_name(name)} must be at least 1")
        if self.kv_cache_mb < 0:
            raise ValueError("MEDGEMMA_KV_CACHE_MB must be 0 (automatic) or a size in MiB")
        if not 0 < self.prefill_share <= 10:
            raise ValueError("MEDGEMMA_PREFILL_SHARE must be above 0 and at most 10")
        if self.default_max_new_tokens > self.max_new_tokens_cap:
            raise ValueError("MEDGEMMA_DEFAULT_MAX_NEW_TOKENS must not exceed MEDGEMMA_MAX_NEW_TOKENS_CAP")
        for name in ("wsi_magnification", "dicomweb_connect_timeout_s", "dicomweb_read_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{self.env_name(name)} must be greater than 0")
        for root in self.dicomweb_urls:
            if not re.fullmatch(r"https?://[^/?#@\s]+(/[^?#\s]*)?", root):
                raise ValueError(f"MEDGEMMA_DICOMWEB_URLS: {root!r} is not an http(s) URL without query or credentials")
        for name in ("aip_predict_route", "aip_health_route"):
            route = getattr(self, name)
            if route and not re.fullmatch(r"/[A-Za-z0-9._~:/@-]*", route):
                raise ValueError(f"{self.env_name(name)} must be a path starting with '/'")
        if not 0 <= self.aip_http_port < 65536:
            raise ValueError("AIP_HTTP_PORT must be a port number")
        if self.app_name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.app_name):
            raise ValueError("MEDGEMMA_APP_NAME may hold letters, digits, '.', '_' and '-' only")
        self.lora_adapter_specs  # noqa: B018 - parsing is the check

    @property
    def lora_adapter_specs(self) -> tuple[tuple[str, str], ...]:
        """``MEDGEMMA_LORA_ADAPTERS`` as (name, path) pairs; a malformed list is an error at start, not a guess."""
        specs: list[tuple[str, str]] = []
        for item in self.lora_adapters:
            name, sep, path = (part.strip() for part in item.partition("="))
            if not sep or not name or not path:
                raise ValueError(f"MEDGEMMA_LORA_ADAPTERS: {item!r} is not name=path")
            if not _ADAPTER_NAME.fullmatch(name):
                raise ValueError(
                    f"MEDGEMMA_LORA_ADAPTERS: adapter name {name!r} may hold letters, digits, '.', '_', ':', '/' and "
                    "'-' only (at most 128)"
                )
            if name in (self.route_prefix, self.model) or name in (n for n, _ in specs):
                raise ValueError(f"MEDGEMMA_LORA_ADAPTERS: adapter name {name!r} is used twice or names the base model")
            specs.append((name, path))
        return tuple(specs)

    @property
    def route_prefix(self) -> str:
        """The `{app}` of `/{app}/v1/...`: the explicit setting, else derived from the model."""
        return self.app_name or derive_app_name(self.model)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def derive_app_name(model: str) -> str:
    """`google/medgemma-27b-it` → `medgemma-27b-it`; `/models/ckpt/` → `ckpt`; `demo:small` → the demo's name."""
    if model == "demo" or model.startswith("demo:"):
        from medgemma.demo import checkpoint_name

        kind, size = parse_demo_spec(model)
        return checkpoint_name(kind, size)
    name = model.rstrip("/").rsplit("/", 1)[-1] or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def parse_demo_spec(model: str) -> tuple[Literal["vlm", "text"], Literal["tiny", "small"]]:
    """`demo` → (vlm, tiny); `demo:small-text` → (text, small)."""
    spec = model.partition(":")[2] or "tiny"
    size, _, kind = spec.partition("-")
    if size not in ("tiny", "small") or kind not in ("", "text", "vlm"):
        raise ValueError(f"unknown demo model {model!r}: use demo, demo:small, demo:tiny-text or demo:small-text")
    return ("text" if kind == "text" else "vlm"), size  # type: ignore[return-value]


_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
_FIELDS = {f.name: f for f in fields(Settings)}
_TYPES = typing.get_type_hints(Settings)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse(name: str, env: str, raw: str, tp: Any) -> Any:
    raw = raw.strip()
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise ValueError("expected true or false")
        if tp is int:
            return int(raw)
        if tp is float:
            return float(raw)
        if origin is Literal:
            if raw not in typing.get_args(tp):
                raise ValueError(f"expected one of {', '.join(typing.get_args(tp))}")
            return raw
        if origin is tuple:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if tp is str or origin in (types.UnionType,):
            return raw
    except ValueError as exc:
        raise ValueError(f"{env}={raw!r} is not valid: {exc}") from None
    raise TypeError(f"setting {name} has an unsupported type {tp!r}")


# --- configuration.yaml ---------------------------------------------------------------------------------------------


def config_path(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    explicit = environ.get("MEDGEMMA_CONFIG")
    return Path(explicit) if explicit else Path(__file__).resolve().parent.parent / "configuration.yaml"


def load_bentoml_config(path: Path | None = None, service_name: str = SERVICE_NAME) -> dict[str, Any]:
    """The ``services.<service_name>`` section of configuration.yaml, ready for ``@bentoml.service(**config)``.

    The file uses BentoML's own layout, so the same file also works as ``BENTOML_CONFIG``. A missing file means no
    overrides; a malformed one is an error at import time rather than a silently ignored setting.
    """
    import yaml

    path = path or config_path()
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    services = data.get("services") or {}
    section = services.get(service_name) or {}
    if not isinstance(section, dict):
        raise ValueError(f"{path}: services.{service_name} must be a mapping")
    return section


def settings_table() -> str:
    """Markdown table of every setting, for the README."""
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for f in fields(Settings):
        default = f.default
        if isinstance(default, bool):
            shown = str(default).lower()
        elif isinstance(default, tuple):
            shown = ",".join(default) or "(empty)"
        else:
            shown = str(default) if default != "" else "(empty)"
        rows.append(f"| `{Settings.env_name(f.name)}` | `{shown}` | {f.metadata['help']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(settings_table() + "\n")
