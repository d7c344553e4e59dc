#!/usr/bin/env python
"""One long prompt beside many short chats, through the real service over HTTP: does the long one stall everyone?

One command::

    python bench/mixed.py [--long-tokens 6000] [--shorts 15] [--new-tokens 64] [--repeat 5]
                          [--out bench/results/mixed.json]

In one run, on the ``small`` random-weight demo checkpoint and one ``bentoml serve`` subprocess, ``--repeat`` rounds of:

1. **shorts alone**: ``--shorts`` short chats sent together, ``--new-tokens`` each;
2. **long alone**: one prompt of about ``--long-tokens`` tokens, ``--new-tokens`` new tokens;
3. **mixed**: the long prompt, then the same short chats ``--delay`` s later (the issue's scenario).

Why rounds: on a shared 2-core machine the same code's "alone" time moves by 20-40 % from one minute to the next,
so one alone/mixed pair measures the machine as much as the scheduler. Each round's ratios compare scenarios run
seconds apart; the verdict is on the median ratio over the rounds, and every round is printed.

Printed per scenario: the shorts' aggregate throughput (their output tokens over the time from their send to the
last one's answer) and p50/max latency, the long request's latency, and the server's peak memory growth (resident
memory of the server's process tree sampled every 20 ms, minus its value just before the scenario) beside the KV
bytes of the live tokens: every prompt and output token of the scenario's requests times the K+V bytes one token
takes in every layer (what a dense cache would hold for them; the paged cache holds less, since sliding layers keep
only their window). Acceptance (issue), on the medians: shorts mixed >= 0.6 x alone, long mixed <= 1.5 x alone,
peak growth <= 3 x KV.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from benchmark import Server, log  # noqa: E402 - bench/ is on the path only now

WORDS = [
    "patient",
    "presents",
    "with",
    "fever",
    "cough",
    "and",
    "shortness",
    "of",
    "breath",
    "after",
    "travel",
    "history",
    "of",
    "asthma",
    "chest",
    "pain",
    "no",
    "prior",
    "surgery",
    "medication",
    "list",
    "includes",
    "inhaled",
    "steroids",
    "blood",
    "pressure",
    "normal",
    "oxygen",
    "saturation",
    "low",
]


def long_prompt(tokenizer: Any, target: int) -> str:
    """Plain words until the tokenizer counts ``target`` tokens (the chat template adds about ten)."""
    words: list[str] = []
    i = 0
    while True:
        chunk = [WORDS[(i + k * 7) % len(WORDS)] for k in range(200)]
        words.extend(chunk)
        i += 1
        n = len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"])
        if n >= target:
            break
    while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) > target:
        words.pop()
    return " ".join(words)


class MemorySampler:
    """Peak resident memory of the server's process tree, sampled in a thread."""

    def __init__(self, server: Server, period: float = 0.02) -> None:
        self.server, self.period = server, period
        self.base = self.rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        return self.server.rss_bytes()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.period)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak - self.base


async def send(client: Any, url: str, text: str, new_tokens: int, delay: float = 0.0) -> dict[str, Any]:
    await asyncio.sleep(delay)
    t0 = time.perf_counter()
    r = await client.post(url, json={"text": text, "max_new_tokens": new_tokens}, timeout=900)
    t1 = time.perf_counter()
    r.raise_for_status()
    body = r.json()
    m = body["compute_metrics"]
    return {"start": t0, "end": t1, "latency": t1 - t0, "in": m["input_tokens"], "out": m["output_tokens"]}


def scenario(server: Server, url: str, *, long_text: str | None, shorts: list[str], args: argparse.Namespace) -> dict:
    import httpx

    async def go() -> tuple[dict | None, list[dict]]:
        async with httpx.AsyncClient() as client:
            tasks = []
            if long_text is not None:
                tasks.append(send(client, url, long_text, args.new_tokens))
            delay = args.delay if long_text is not None else 0.0
            tasks += [send(client, url, s, args.new_tokens, delay) for s in shorts]
            results = await asyncio.gather(*tasks)
        return (results[0] if long_text is not None else None), list(results[1:] if long_text is not None else results)

    sampler = MemorySampler(server)
    long_r, short_r = asyncio.run(go())
    growth = sampler.stop()
    out: dict[str, Any] = {"peak_memory_growth_mb": growth / 2**20}
    live_tokens = sum(r["in"] + r["out"] for r in short_r) + (long_r["in"] + long_r["out"] if long_r else 0)
    out["live_tokens"] = live_tokens
    out["kv_bytes_live_mb"] = live_tokens * args.kv_bytes_per_token / 2**20
    if short_r:
        span = max(r["end"] for r in short_r) - min(r["start"] for r in short_r)
        lat = [r["latency"] for r in short_r]
        out["shorts"] = {
            "requests": len(short_r),
            "output_tokens": sum(r["out"] for r in short_r),
            "tok_per_s": sum(r["out"] for r in short_r) / span,
            "p50_s": statistics.median(lat),
            "max_s": max(lat),
        }
    if long_r:
        out["long"] = {"input_tokens": long_r["in"], "output_tokens": long_r["out"], "latency_s": long_r["latency"]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--long-tokens", type=int, default=6000)
    ap.add_argument("--shorts", type=int, default=15)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--delay", type=float, default=0.5, help="seconds between the long prompt and the short chats")
    ap.add_argument("--repeat", type=int, default=5, help="rounds of the three scenarios; the verdict is on medians")
    ap.add_argument("--size", default="small", choices=["tiny", "small"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mixed.json")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoConfig, AutoTokenizer

    from medgemma.demo import ensure_checkpoint

    torch.set_num_threads(args.threads)
    model_dir = ensure_checkpoint("vlm", args.size)
    text = AutoConfig.from_pretrained(model_dir).get_text_config()
    head_dim = getattr(text, "head_dim", text.hidden_size // text.num_attention_heads)
    args.kv_bytes_per_token = 2 * text.num_key_value_heads * head_dim * 4 * text.num_hidden_layers  # fp32 K+V
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    long_text = long_prompt(tokenizer, args.long_tokens)
    shorts = [f"Question {i}: what are the common causes of a persistent cough in adults?" for i in range(args.shorts)]

    with tempfile.TemporaryDirectory(prefix="medgemma-mixed-") as tmp:
        server = Server(model_dir, "mixed", threads=args.threads, max_batch=16, workdir=Path(tmp))
        server.start()
        try:
            health = server.wait_model()
            url = f"{server.url}/mixed/v1/generate"
            log("warm-up")
            scenario(server, url, long_text=None, shorts=shorts[:4], args=args)
            scenario(server, url, long_text=long_text[: len(long_text) // 8], shorts=shorts[:2], args=args)
            rounds = []
            for i in range(args.repeat):
                log(f"round {i + 1}/{args.repeat}: shorts alone")
                alone = scenario(server, url, long_text=None, shorts=shorts, args=args)
                log(f"round {i + 1}/{args.repeat}: long alone")
                long_alone = scenario(server, url, long_text=long_text, shorts=[], args=args)
                log(f"round {i + 1}/{args.repeat}: mixed: the long prompt, then the shorts")
                mixed = scenario(server, url, long_text=long_text, shorts=shorts, args=args)
                rounds.append({"shorts_alone": alone, "long_alone": long_alone, "mixed": mixed})
        finally:
            server.stop()

    per_round = [
        {
            "shorts_mixed_over_alone": r["mixed"]["shorts"]["tok_per_s"] / r["shorts_alone"]["shorts"]["tok_per_s"],
            "long_mixed_over_alone": r["mixed"]["long"]["latency_s"] / r["long_alone"]["long"]["latency_s"],
            "mixed_peak_growth_over_kv": r["mixed"]["peak_memory_growth_mb"] / r["mixed"]["kv_bytes_live_mb"],
        }
        for r in rounds
    ]
    ratios = {k: statistics.median(r[k] for r in per_round) for k in per_round[0]}
    accept = {
        "shorts_mixed_over_alone >= 0.6": ratios["shorts_mixed_over_alone"] >= 0.6,
        "long_mixed_over_alone <= 1.5": ratios["long_mixed_over_alone"] <= 1.5,
        "mixed_peak_growth_over_kv <= 3": ratios["mixed_peak_growth_over_kv"] <= 3,
    }
    res = {
        "rounds": rounds,
        "ratios_per_round": per_round,
        "ratios": ratios,
        "acceptance": accept,
        "kv_bytes_per_token": args.kv_bytes_per_token,
        "server_engine": health.get("engine"),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2, default=str))
    print(markdown(res))
    return 0 if all(accept.values()) else 1


def markdown(res: dict[str, Any]) -> str:
    rows = [
        "| round | shorts tok/s alone → mixed | shorts p50 / max mixed (s) | long latency alone → mixed (s) "
        "| peak memory growth mixed (MB) | KV of live tokens (MB) | shorts ratio | long ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, (s, r) in enumerate(zip(res["rounds"], res["ratios_per_round"], strict=True), 1):
        a, la, m = s["shorts_alone"], s["long_alone"], s["mixed"]
        rows.append(
            f"| {i} | {a['shorts']['tok_per_s']:.1f} → {m['shorts']['tok_per_s']:.1f} | "
            f"{m['shorts']['p50_s']:.2f} / {m['shorts']['max_s']:.2f} | "
            f"{la['long']['latency_s']:.2f} → {m['long']['latency_s']:.2f} | {m['peak_memory_growth_mb']:.1f} | "
            f"{m['kv_bytes_live_mb']:.1f} | {r['shorts_mixed_over_alone']:.2f} | {r['long_mixed_over_alone']:.2f} |"
        )
    s0 = res["rounds"][0]
    r = res["ratios"]
    rows += [
        "",
        f"{s0['shorts_alone']['shorts']['requests']} short chats, one {s0['long_alone']['long']['input_tokens']}-token "
        f"prompt, the shorts {res['args']['delay']} s after it. Medians over {len(res['rounds'])} rounds: shorts "
        f"mixed / alone = **{r['shorts_mixed_over_alone']:.2f}** (goal ≥ 0.6); long mixed / alone = "
        f"**{r['long_mixed_over_alone']:.2f}** (goal ≤ 1.5); mixed peak memory growth / KV of live tokens = "
        f"**{r['mixed_peak_growth_over_kv']:.2f}** (goal ≤ 3). KV per token (all layers, K+V, fp32): "
        f"{res['kv_bytes_per_token']} bytes.",
    ]
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
