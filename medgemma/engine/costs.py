"""What the scheduler measures and sizes: a decode step's cost, long prompts' share of time beside decoding rows,
and the KV pool's default budget."""

from __future__ import annotations

import torch

from medgemma.engine.kv_cache import KVLayout


def moving_average(previous: float | None, value: float, smoothing: float) -> float:
    """Exponential moving average whose first value is the first sample (no warm-up from zero)."""
    return value if previous is None else previous + smoothing * (value - previous)


class DecodeCost:
    """Seconds of a decode step by its number of rows, from steps that read no prompt.

    Where steps of exactly this many rows were seen, their recent average (``smoothing``) answers: the fit below
    can be off by 15-25 % at a given row count (a line through steps taken at other counts and at other moments of
    a machine whose speed drifts), and every error there moves the prompt credit, which is earned and charged in
    these units. Elsewhere ``fixed + per_row * rows``, fitted by least squares with exponential forgetting (rows
    come and go, which separates the two terms).
    """

    def __init__(self, forget: float = 0.95, smoothing: float = 0.3) -> None:
        self.forget = forget
        self.smoothing = smoothing
        self._s = [0.0] * 5  # sums of w, w*n, w*t, w*n*n, w*n*t
        self._by_rows: dict[int, float] = {}

    def observe(self, rows: int, seconds: float) -> None:
        n, t = float(rows), seconds
        self._s = [self.forget * a + b for a, b in zip(self._s, (1.0, n, t, n * n, n * t), strict=True)]
        self._by_rows[rows] = moving_average(self._by_rows.get(rows), seconds, self.smoothing)

    def seconds(self, rows: int) -> float | None:
        if rows in self._by_rows:
            return self._by_rows[rows]
        w, sn, st, snn, snt = self._s
        if w == 0:
            return None
        denom = w * snn - sn * sn
        if denom > 1e-9 * max(w * snn, 1e-12):
            slope = (w * snt - sn * st) / denom
            if slope >= 0:
                return max((st - slope * sn) / w + slope * rows, 0.0)
        return st / w


class PrefillCredit:
    """Step time owed to long prompts while rows decode, in seconds, and what one of their tokens costs there.

    Each decode step earns ``share`` x its measured decode time while a long prompt waits; a step that carries
    long-prompt tokens is charged what it took beyond decoding alone, so a misestimate corrects itself on the next
    chunks. The balance never banks more than one full chunk (no burst after a long wait) and may go below zero (an
    image read whole costs more than the credit had; it is paid off before the next chunk).
    """

    def __init__(self, share: float, *, max_tokens: int, smoothing: float = 0.3) -> None:
        self.share = share
        self.max_tokens = max_tokens
        self.smoothing = smoothing
        self.balance = 0.0
        self.token_s: float | None = None  # marginal seconds of one prompt token (moving average)

    def earn(self, decode_s: float | None) -> None:
        if decode_s is None:
            return
        self.balance += self.share * decode_s
        if self.token_s is not None:
            self.balance = min(self.balance, self.max_tokens * self.token_s)

    def reset(self) -> None:
        """No long prompt waits: drop the balance (credit is never banked for a prompt that has not arrived)."""
        self.balance = 0.0

    def tokens(self, decode_s: float | None, minimum: int) -> int:
        """Prompt tokens the balance pays for now: 0 below ``minimum``; ``minimum`` while a token's cost or a
        decode step's is still unknown (a step measures the first; the second needs a step with no prompt in it,
        which short prompts arriving every step could put off indefinitely, so a long prompt never waits for it)."""
        if decode_s is None or self.token_s is None:
            return minimum
        tokens = min(int(self.balance / self.token_s), self.max_tokens)
        return tokens if tokens >= minimum else 0

    def charge(self, extra_s: float, tokens: int, *, measured: bool) -> None:
        """A step read ``tokens`` long-prompt tokens in ``extra_s`` more than decoding alone. ``measured=False``:
        the step also read other prompts, so ``extra_s`` is not theirs alone and the estimate is charged instead."""
        if tokens <= 0:
            return
        if measured and extra_s > 0:
            per_token = extra_s / tokens
            self.observe(per_token)
        else:
            extra_s = tokens * (self.token_s or 0.0)
        self.balance -= extra_s

    def observe(self, per_token_s: float) -> None:
        """A measured cost of one prompt token (also from steps where nobody decodes)."""
        self.token_s = moving_average(self.token_s, per_token_s, self.smoothing)


def default_kv_budget(layout: KVLayout, device: torch.device) -> int:
    """Bytes for the KV pools when no budget is set: 85 % of the GPU memory still free after loading (what vLLM's
    ``gpu_memory_utilization`` does, leaving room for activations), or on CPU 2 GiB (pages are committed lazily)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.85)
    return 2 * 2**30
