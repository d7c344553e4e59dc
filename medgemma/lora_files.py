"""Read a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) into plain tensors.

This is the format Google's MedGemma fine-tuning notebook writes (``trainer.save_model()`` / ``save_pretrained``)
and the format adapters are shared in on the Hugging Face Hub. Only what changes the weights is read; a config
feature that would change them in a way this service does not reproduce (DoRA, trained biases, LoRA on embeddings,
fan-in/fan-out layouts, parameter targets) is refused here with a message naming it, rather than served wrongly.

Nothing here touches the model: matching the tensors to the base model's modules (and their shapes) is
``medgemma.lora``'s job. No BentoML, no web framework.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """The adapter cannot be served; the message says why in words an operator can act on."""


@dataclass
class LoraTensors:
    """One adapted linear layer: ``delta(x) = scale * B @ (A @ x)``."""

    a: Any  # (r, in_features)
    b: Any  # (out_features, r)
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass
class AdapterFile:
    """An adapter as read from disk: its settings and its tensors keyed by module path (as saved)."""

    directory: Path
    rank: int
    alpha: float
    use_rslora: bool
    base_model: str | None
    peft_version: str | None
    modules_to_save: list[str]
    lora: dict[str, LoraTensors] = field(default_factory=dict)
    replaced: dict[str, dict[str, Any]] = field(default_factory=dict)  # module path -> {"weight": ..., "bias": ...}

    @property
    def max_rank(self) -> int:
        return max((t.rank for t in self.lora.values()), default=0)


def resolve_directory(source: str, *, token: str | None = None) -> Path:
    """A local directory as is; anything else is taken as a Hugging Face repo id and fetched (needs the network)."""
    path = Path(source).expanduser()
    looks_local = source.startswith(("/", "./", "../", "~")) or path.exists()
    if looks_local:
        if not path.is_dir():
            raise AdapterError(f"adapter directory {path} does not exist")
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=source, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, "*.md"], token=token))
    except Exception as exc:  # offline, gated, unknown repo: all become the adapter's stored error
        raise AdapterError(
            f"adapter {source!r} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
        ) from None


def read_adapter(directory: Path) -> AdapterFile:
    """Parse and check ``adapter_config.json``, then load the tensors (on the CPU, in their saved dtype)."""
    config = _read_config(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise AdapterError(
                f"{directory} holds adapter_model.bin; save the adapter with safetensors "
                "(save_pretrained(..., safe_serialization=True), the default)"
            )
        raise AdapterError(f"{directory} has no {WEIGHTS_FILE}")
    try:
        from safetensors.torch import load_file

        tensors = load_file(str(weights_path), device="cpu")
    except Exception as exc:
        raise AdapterError(f"{WEIGHTS_FILE} could not be read ({type(exc).__name__}: {exc})"[:500]) from None

    rank = int(config.get("r") or 0)
    alpha = float(config.get("lora_alpha") or rank)
    use_rslora = bool(config.get("use_rslora"))
    alpha_pattern: dict[str, float] = dict(config.get("alpha_pattern") or {})
    modules_to_save = list(config.get("modules_to_save") or [])
    out = AdapterFile(
        directory=directory,
        rank=rank,
        alpha=alpha,
        use_rslora=use_rslora,
        base_model=config.get("base_model_name_or_path"),
        peft_version=config.get("peft_version"),
        modules_to_save=modules_to_save,
    )
    pairs: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        path = key.removeprefix(_PREFIX).replace(".modules_to_save.", ".")
        if path.endswith((".lora_A.weight", ".lora_B.weight")):
            module, which = path.rsplit(".", 2)[0], path.rsplit(".", 2)[1]
            pairs.setdefault(module, {})[which] = value
        elif ".lora_embedding_" in path:
            raise AdapterError("the adapter puts LoRA on an embedding layer, which this server does not support")
        elif ".lora_magnitude_vector" in path:
            raise AdapterError("the adapter is a DoRA adapter (use_dora), which this server does not support")
        elif _is_saved_module(path, modules_to_save):
            module, param = path.rsplit(".", 1)
            out.replaced.setdefault(module, {})[param] = value
        else:
            raise AdapterError(f"unexpected tensor {key!r} in {WEIGHTS_FILE} (not LoRA A/B nor a module to save)")
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise AdapterError(f"module {module}: lora_A and lora_B must both be present")
        a, b = ab["lora_A"], ab["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"module {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not a LoRA pair"
            )
        r = int(a.shape[0])
        key = _pattern_key(alpha_pattern, module)
        a_alpha = float(alpha_pattern[key]) if key in alpha_pattern else alpha
        scale = a_alpha / math.sqrt(r) if use_rslora else a_alpha / r  # exactly PEFT's LoraLayer.update_layer
        out.lora[module] = LoraTensors(a=a, b=b, scale=scale)
    if not out.lora and not out.replaced:
        raise AdapterError(f"{WEIGHTS_FILE} holds no LoRA weights")
    return out


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{directory} has no {CONFIG_FILE} (is it a PEFT adapter directory?)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{CONFIG_FILE} is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_FILE} must hold a JSON object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"only LoRA adapters are supported, this one is {peft_type or 'of no peft_type'}")
    refused = {
        "use_dora": "DoRA (use_dora)",
        "fan_in_fan_out": "fan_in_fan_out layers",
        "lora_bias": "trained LoRA biases (lora_bias)",
        "target_parameters": "LoRA on parameters (target_parameters)",
        "trainable_token_indices": "trainable token indices",
        "layer_replication": "layer replication",
        "use_qalora": "QA-LoRA",
    }
    for key, what in refused.items():
        if config.get(key):
            raise AdapterError(f"the adapter uses {what}, which this server does not support")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"the adapter trains biases (bias={config.get('bias')!r}); only bias='none' is supported")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise AdapterError(f"{CONFIG_FILE}: r must be a positive integer")
    return config


def _is_saved_module(path: str, modules_to_save: list[str]) -> bool:
    """A full copy of a module listed in modules_to_save (PEFT matches by the module name's last parts)."""
    module = path.rsplit(".", 1)[0]
    return any(module == name or module.endswith("." + name) for name in modules_to_save)


def _pattern_key(patterns: dict[str, Any], module: str) -> str:
    """PEFT's rule for rank_pattern/alpha_pattern keys: a regex matching the end of the module path."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module
