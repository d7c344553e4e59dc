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
    attn_implementation: str = setting("sdpa", "Attention kernel: `sdpa`, `eager` or `flex_attention`.")
    quantization: Quantization = setting("none", "`8bit` / `4bit` load through bitsandbytes (optional extra).")
    trust_remote_code: bool = setting(False, "Run model code from the Hub; Gemma 3 is native, so keep it off.")
    hf_token: str = setting("", "Token for gated models; used when set, never required.", env="HF_TOKEN", secret=True)
    demo_dir: str = setting("", "Where demo checkpoints are built; empty = `~/.cache/medgemma/demo`.")

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
    max_constraint_bytes: int = setting(
        32768, "Largest JSON schema, regex, choice list or grammar in one request (bytes, compact JSON); larger is 400."
    )

    # --- inputs and limits ---------------------------------------------------------------------------------------
    max_body_bytes: int = setting(128 * 1024 * 1024, "Largest request body; larger bodies get 413.")
    max_image_bytes: int = setting(32 * 1024 * 1024, "Largest encoded image or DICOM file.")
    max_image_pixels: int = setting(40_000_000, "Largest image frame (width x height), checked before decoding.")
    max_images: int = setting(96, "Most images per request (Google's CT notebook sends 85 slices).")
    max_text_chars: int = setting(200_000, "Longest text in one message part or system prompt.")
    dicom_frames: FrameSelection = setting("middle", "Frames of a multi-frame DICOM used: middle, first or all.")
    image_url_domains: tuple[str, ...] = setting(
        (), "Comma-separated domains whose http(s) image URLs may be fetched; empty fetches none."
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
            "max_constraint_bytes",
            "max_body_bytes",
            "max_image_bytes",
            "max_image_pixels",
            "max_images",
            "max_text_chars",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{self.env_name(name)} must be at least 1")
        if self.default_max_new_tokens > self.max_new_tokens_cap:
            raise ValueError("MEDGEMMA_DEFAULT_MAX_NEW_TOKENS must not exceed MEDGEMMA_MAX_NEW_TOKENS_CAP")
        if self.app_name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.app_name):
            raise ValueError("MEDGEMMA_APP_NAME may hold letters, digits, '.', '_' and '-' only")

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
