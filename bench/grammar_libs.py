"""Compare the three maintained grammar libraries on the demo tokenizer: compile time and per-token mask time.

    python bench/grammar_libs.py [--checkpoint DIR] [--repeat 3]

Needs ``xgrammar``, ``llguidance`` and ``outlines-core`` installed (only the chosen one, xgrammar, is a dependency
of the service; install the other two by hand to rerun this). For each library and each test schema it measures:

* **compile**: schema → compiled grammar, cold (a fresh compiler/tokenizer wrapper each time, after a warm-up of the
  tokenizer wrapper itself, which the service builds once per model);
* **mask**: the per-token cost during decoding — fill the allowed-token bitmask for the current state (the bitmask →
  logits step is the same tensor operation whichever library filled it, so it is not part of the comparison), then
  accept the next token of a valid compact JSON document — as the mean over the document's tokens;
* **tokenizer**: building the library's view of the vocabulary (once per loaded model).

The document is tokenized by the demo tokenizer itself, so every library walks the same token path. The demo
vocabulary has 1,024 tokens against Gemma 3's 262,208: mask times here are a floor, and the ranking on a real
vocabulary is stated in README/docstrings from the libraries' own published figures, not from this run.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCHEMAS: dict[str, dict[str, Any]] = {
    "yes_no": {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]},
    "finding": {
        "type": "object",
        "properties": {
            "finding": {"type": "string", "maxLength": 40},
            "severity": {"enum": ["none", "mild", "moderate", "severe"]},
            "confidence_percent": {"type": "integer", "minimum": 0, "maximum": 100},
            "location": {
                "type": "object",
                "properties": {
                    "side": {"enum": ["left", "right", "bilateral"]},
                    "zone": {"enum": ["upper", "middle", "lower"]},
                },
                "required": ["side", "zone"],
                "additionalProperties": False,
            },
            "differential": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3},
            "follow_up": {"type": "boolean"},
        },
        "required": ["finding", "severity", "confidence_percent", "location", "differential", "follow_up"],
        "additionalProperties": False,
    },
}
DOCS: dict[str, Any] = {
    "yes_no": {"answer": "no"},
    "finding": {
        "finding": "right lower lobe consolidation",
        "severity": "moderate",
        "confidence_percent": 72,
        "location": {"side": "right", "zone": "lower"},
        "differential": ["pneumonia", "atelectasis"],
        "follow_up": True,
    },
}


def _timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_xgrammar(tok: Any, n_vocab: int, schema: dict[str, Any], doc_ids: list[int], repeat: int) -> dict[str, float]:
    import xgrammar as xgr

    t_tok, info = _timed(lambda: xgr.TokenizerInfo.from_huggingface(tok, vocab_size=n_vocab), 1)
    text = json.dumps(schema)

    def compile_() -> Any:
        compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return compiler.compile_json_schema(text, any_whitespace=False, separators=(",", ":"))

    t_compile, compiled = _timed(compile_, repeat)
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, n_vocab)
    times = []
    for t in doc_ids:
        t0 = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask, 0)
        times.append(time.perf_counter() - t0)
        assert matcher.accept_token(t), "xgrammar refused the document"
    return {"tokenizer_s": t_tok, "compile_s": t_compile, "mask_us": statistics.mean(times) * 1e6}


def bench_llguidance(
    tok: Any, n_vocab: int, schema: dict[str, Any], doc_ids: list[int], repeat: int
) -> dict[str, float]:
    import llguidance
    import llguidance.hf
    import torch

    t_tok, lltok = _timed(lambda: llguidance.hf.from_tokenizer(tok, n_vocab), 1)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(schema), defaults={"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
    )
    t_compile, matcher = _timed(lambda: llguidance.LLMatcher(lltok, grammar), repeat)
    assert not matcher.is_error(), matcher.get_error()
    bitmask = torch.full((1, (n_vocab + 31) // 32), -1, dtype=torch.int32)
    times = []
    for t in doc_ids:
        t0 = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)
        times.append(time.perf_counter() - t0)
        assert matcher.consume_token(t), matcher.get_error()
    return {"tokenizer_s": t_tok, "compile_s": t_compile, "mask_us": statistics.mean(times) * 1e6}


def _byte_vocab(tok: Any) -> tuple[int, dict[bytes, list[int]]]:
    """outlines-core only builds vocabularies from the Hub (network); map a local tokenizer's tokens to bytes."""
    special = set(tok.all_special_ids)
    out: dict[bytes, list[int]] = {}
    for token, i in tok.get_vocab().items():
        if i in special:
            continue
        m = re.fullmatch(r"<0x([0-9A-F]{2})>", token)
        data = bytes([int(m.group(1), 16)]) if m else token.replace("\u2581", " ").encode()
        out.setdefault(data, []).append(i)
    return int(tok.eos_token_id), out


def bench_outlines_core(
    tok: Any, n_vocab: int, schema: dict[str, Any], doc_ids: list[int], repeat: int
) -> dict[str, float]:
    import outlines_core
    import torch
    from outlines_core.json_schema import build_regex_from_schema

    def vocab() -> Any:
        eos, mapping = _byte_vocab(tok)
        return outlines_core.Vocabulary(eos, mapping)

    t_tok, voc = _timed(vocab, 1)
    regex = build_regex_from_schema(json.dumps(schema), whitespace_pattern="")
    t_compile, index = _timed(lambda: outlines_core.Index(regex, voc), repeat)
    guide = outlines_core.Guide(index)
    bitmask = torch.full((1, (n_vocab + 31) // 32), -1, dtype=torch.int32)
    times = []
    for t in doc_ids:
        t0 = time.perf_counter()
        guide.write_mask_into(bitmask.data_ptr(), bitmask.numel(), 4)
        times.append(time.perf_counter() - t0)
        guide.advance(t, return_tokens=False)
    return {"tokenizer_s": t_tok, "compile_s": t_compile, "mask_us": statistics.mean(times) * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="demo checkpoint dir (default: tiny vlm)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    if args.checkpoint is None:
        from medgemma.demo import ensure_checkpoint

        args.checkpoint = ensure_checkpoint("vlm", "tiny")
    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    n_vocab = len(tok)
    print(f"tokenizer: {args.checkpoint.name}, {n_vocab} tokens")
    print(f"{'library':<14} {'schema':<9} {'tokenizer s':>11} {'compile ms':>10} {'mask µs/token':>13} {'tokens':>6}")
    for name, schema in SCHEMAS.items():
        doc_ids = tok.encode(json.dumps(DOCS[name], separators=(",", ":")), add_special_tokens=False)
        for lib, fn in (
            ("xgrammar", bench_xgrammar),
            ("llguidance", bench_llguidance),
            ("outlines-core", bench_outlines_core),
        ):
            try:
                r = fn(tok, n_vocab, schema, doc_ids, args.repeat)
            except Exception as exc:  # a library missing or refusing the schema is a result too
                print(f"{lib:<14} {name:<9} failed: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            print(
                f"{lib:<14} {name:<9} {r['tokenizer_s']:>11.3f} {r['compile_s'] * 1e3:>10.2f} "
                f"{r['mask_us']:>13.1f} {len(doc_ids):>6}"
            )


if __name__ == "__main__":
    main()
