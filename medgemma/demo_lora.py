"""Random-weight PEFT LoRA adapters for the demo checkpoints, written with PEFT itself in the format Google's
MedGemma fine-tuning notebook saves (``adapter_config.json`` + ``adapter_model.safetensors``).

PEFT initialises ``lora_B`` to zeros (an untrained adapter changes nothing), so the LoRA matrices get random values
scaled to move each layer's output by ``strength`` times the base layer's typical output: enough to change greedy
answers, not so much that the demo model turns into one repeated token. ``modules_to_save`` copies (the notebook
saves ``lm_head`` and ``embed_tokens``) get the same relative noise on the rows that are not zero: the demo keeps
the embeddings of tokens it must never generate (padding, image placeholders) at zero, and so does the adapter.

CLI: ``python -m medgemma.demo_lora --base DIR --out DIR [--seed N] [--style notebook|attention] [--rank R]``
prints the adapter directory. Like ``medgemma.demo``, serving code never imports this module.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

Style = Literal["notebook", "attention"]
STYLES: tuple[Style, ...] = ("notebook", "attention")

logger = logging.getLogger(__name__)


def lora_config(style: Style, *, rank: int, alpha: float | None = None, rslora: bool = False) -> Any:
    """``notebook``: Google's MedGemma notebook (every linear layer, vision tower included, plus full copies of
    ``lm_head`` and ``embed_tokens``); ``attention``: q/k/v/o projections of the language model only."""
    from peft import LoraConfig

    alpha = alpha if alpha is not None else 2 * rank
    if style == "notebook":
        return LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=0.05,
            bias="none",
            target_modules="all-linear",
            task_type="CAUSAL_LM",
            modules_to_save=["lm_head", "embed_tokens"],
            use_rslora=rslora,
        )
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)|^model\.layers.*\.(q_proj|k_proj|v_proj|o_proj)",
        task_type="CAUSAL_LM",
        use_rslora=rslora,
    )


def load_base(base: str | Path) -> Any:
    """The demo checkpoint in fp32 on the CPU, with the class the server would pick for it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(base)
    cls = AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM
    model = cls.from_pretrained(base, dtype=torch.float32)
    model.eval()
    return model


def build_adapter(
    base: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    style: Style = "notebook",
    rank: int = 8,
    alpha: float | None = None,
    rslora: bool = False,
    strength: float = 0.5,
) -> Path:
    """Write a random LoRA adapter for the checkpoint at ``base`` into ``out`` and return ``out``."""
    import torch
    from peft import get_peft_model

    model = load_base(base)
    peft_model = get_peft_model(model, lora_config(style, rank=rank, alpha=alpha, rslora=rslora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in peft_model.modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                _randomize_lora(module, generator, strength)
            originals = getattr(module, "original_module", None)
            copies = getattr(module, "modules_to_save", None)
            if originals is not None and copies is not None and "default" in copies:
                weight = copies["default"].weight
                nonzero = (originals.weight.abs().sum(-1, keepdim=True) > 0).to(weight.dtype)
                noise = torch.randn(weight.shape, generator=generator) * float(originals.weight.std()) * strength
                weight.add_(noise * nonzero)
    out_path = Path(out)
    peft_model.save_pretrained(out_path)
    logger.info("Built a %s LoRA adapter (rank %d, seed %d) in %s", style, rank, seed, out_path)
    return out_path


def _randomize_lora(module: Any, generator: Any, strength: float) -> None:
    import torch

    a = module.lora_A["default"].weight  # (r, in)
    b = module.lora_B["default"].weight  # (out, r)
    r, fan_in = a.shape
    scale = float(module.scaling["default"])
    w_std = float(module.get_base_layer().weight.std())
    a.copy_(torch.randn(a.shape, generator=generator) / math.sqrt(fan_in))
    b.copy_(torch.randn(b.shape, generator=generator) * (strength * w_std * math.sqrt(fan_in) / (math.sqrt(r) * scale)))


def merged_model(base: str | Path, adapter: str | Path) -> Any:
    """The base with the adapter merged into its weights (PEFT ``merge_and_unload``): the reference a served
    adapter must equal."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(base), str(adapter)).merge_and_unload()
    model.eval()
    return model


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medgemma.demo_lora", description="Build a random-weight PEFT LoRA adapter for a demo model."
    )
    parser.add_argument("--base", required=True, type=Path, help="the demo checkpoint directory (medgemma.demo)")
    parser.add_argument("--out", required=True, type=Path, help="where to write the adapter directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--style", choices=STYLES, default="notebook")
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    path = build_adapter(args.base, args.out, seed=args.seed, style=args.style, rank=args.rank)
    sys.stdout.write(f"{path.resolve()}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
