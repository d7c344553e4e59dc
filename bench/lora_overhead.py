"""Per-forward cost of serving LoRA adapters per row: this service's per-token LoRA (``medgemma.lora``) against
PEFT's mixed-adapter batches (``model(..., adapter_names=[...])``) and the base model alone.

In-process, no server: one prefill of ``--batch`` rows of ``--prompt`` tokens and ``--steps`` decode steps of one
token per row (with the KV cache), the rows spread round-robin over ``--adapters`` adapters of rank ``--rank`` on
every linear layer of the language model. Prints milliseconds per forward pass and the ratio to the base. This is
the measurement behind the choice documented in ``medgemma/lora.py``; the end-to-end throughput goal is measured by
``bench/benchmark.py --scenario lora``.

    python bench/lora_overhead.py [--size small] [--batch 16] [--adapters 4] [--rank 16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "small"), default="small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--notebook", action="store_true", help="add lm_head and embed_tokens copies (Google's notebook layout)"
    )
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import DynamicCache

    from medgemma.demo import ensure_checkpoint
    from medgemma.demo_lora import load_base
    from medgemma.lora import LoraSet, rows_active

    tmp = Path(tempfile.mkdtemp(prefix="lora-overhead-"))
    base = ensure_checkpoint("text", args.size, root=tmp / "demo")
    names = [f"a{i}" for i in range(args.adapters)]
    dirs = [tmp / n for n in names]
    # Random adapters on every linear layer of the language model (what PEFT's mixed batches can serve).
    save = ["lm_head", "embed_tokens"] if args.notebook else None
    cfg = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", task_type="CAUSAL_LM", modules_to_save=save
    )
    for i, d in enumerate(dirs):
        m = get_peft_model(load_base(base), cfg)
        g = torch.Generator().manual_seed(i)
        for mod in m.modules():
            if hasattr(mod, "lora_B") and "default" in getattr(mod, "lora_B", {}):
                mod.lora_B["default"].weight.copy_(torch.randn(mod.lora_B["default"].weight.shape, generator=g) * 0.01)
        m.save_pretrained(d)

    rows = [i % args.adapters for i in range(args.batch)]
    ids = torch.randint(200, 900, (args.batch, args.prompt))

    def one(model: torch.nn.Module, ctx: object, kwargs: dict) -> tuple[float, float]:
        cache = DynamicCache()
        t0 = time.perf_counter()
        with ctx():
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **kwargs)
        prefill = time.perf_counter() - t0
        nxt = out.logits[:, -1:].argmax(-1)
        decode = []
        for _ in range(args.steps):
            s = time.perf_counter()
            with ctx():
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1, **kwargs)
            decode.append(time.perf_counter() - s)
            nxt = out.logits[:, -1:].argmax(-1)
        return prefill * 1000, statistics.median(decode) * 1000

    import contextlib

    plain = load_base(base)
    ours_model = load_base(base)
    lora_set = LoraSet(ours_model, max_adapters=args.adapters, max_rank=args.rank)
    for n, d in zip(names, dirs, strict=True):
        lora_set.register(n, str(d))
        lora_set.load(n)
    peft_model = PeftModel.from_pretrained(load_base(base), str(dirs[0]), adapter_name=names[0])
    for n, d in zip(names[1:], dirs[1:], strict=True):
        peft_model.load_adapter(str(d), adapter_name=n)
    peft_model.eval()
    setups = {
        "base, no adapters": (plain, contextlib.nullcontext, {}),
        "medgemma.lora": (ours_model, lambda: rows_active(lora_set, rows), {}),
        "PEFT mixed batch": (peft_model, contextlib.nullcontext, {"adapter_names": [names[r] for r in rows]}),
    }
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in setups}
    refused: dict[str, str] = {}
    for repeat in range(args.repeats + 1):  # interleaved, so that machine noise hits every setup alike
        for label, setup in list(setups.items()):
            try:
                r = one(*setup)
            except Exception as exc:  # PEFT refuses some layouts in mixed batches (modules_to_save)
                refused[label] = f"{type(exc).__name__}: {str(exc)[:150]}"
                del setups[label], results[label]
                continue
            if repeat:  # the first round warms up
                results[label].append(r)
    best = {k: (min(p for p, _ in v), min(d for _, d in v)) for k, v in results.items()}
    base_ms = best["base, no adapters"]

    print(
        f"{args.size} text model; batch {args.batch}, prompt {args.prompt}, {args.adapters} adapters, rank {args.rank}"
        + (", with lm_head/embed_tokens copies" if args.notebook else "")
    )
    print(f"{'':28}{'prefill ms':>12}{'decode ms/step':>16}{'prefill/base':>14}{'decode/base':>13}")
    for label, (p, d) in best.items():
        print(f"{label:28}{p:12.1f}{d:16.2f}{p / base_ms[0]:14.2f}{d / base_ms[1]:13.2f}")
    for label, why in refused.items():
        print(f"{label:28}refused: {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
