"""Next-token choice per row, and stop strings. Pure torch; one row's failure never touches another's choice."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from medgemma.protocol import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class SampleInput:
    """What the sampler needs of one row."""

    params: SamplingParams
    prompt_ids: torch.Tensor
    generated: list[int]
    generator: torch.Generator | None


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if not params.do_sample:
        return None
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def sample(
    rows: Sequence[SampleInput], logits: torch.Tensor, *, check: Callable[[int], None] | None = None
) -> list[int | BaseException]:
    """Per-row logits processing in transformers' order: repetition penalty, temperature, top-k, top-p.

    Plain greedy rows share one batched argmax (one device sync per step, not one per row). The result holds, per
    row, the chosen token or the exception that row raised: the caller fails that row alone. ``check(i)`` runs before
    row ``i`` is sampled (tests inject faults there).
    """
    greedy = logits.argmax(-1).tolist()
    out: list[int | BaseException] = []
    for i, row in enumerate(rows):
        try:
            if check is not None:
                check(i)
            out.append(_one(row, logits[i], greedy[i]))
        except Exception as exc:  # this row's failure is this row's alone
            out.append(exc)
    return out


def _one(row: SampleInput, lg: torch.Tensor, greedy: int) -> int:
    p = row.params
    penalise = p.repetition_penalty is not None and p.repetition_penalty != 1.0
    if not p.do_sample and not penalise:
        return int(greedy)
    if penalise:
        seen = torch.cat(
            [row.prompt_ids.to(lg.device), torch.tensor(row.generated, dtype=torch.long, device=lg.device)]
        )
        score = lg.gather(0, seen)
        score = torch.where(score < 0, score * p.repetition_penalty, score / p.repetition_penalty)
        lg = lg.scatter(0, seen, score)
    if not p.do_sample:
        return int(torch.argmax(lg))
    if p.temperature is not None and p.temperature > 0:
        lg = lg / p.temperature
    if p.top_k is not None and p.top_k < lg.shape[-1]:
        kth = torch.topk(lg, p.top_k).values[-1]
        lg = lg.masked_fill(lg < kth, float("-inf"))
    if p.top_p is not None and p.top_p < 1.0:
        sorted_lg, order = torch.sort(lg, descending=False)
        cum = sorted_lg.softmax(-1).cumsum(-1)
        remove = cum <= (1 - p.top_p)
        remove[-1] = False  # always keep the most likely token
        lg = lg.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return int(torch.multinomial(lg.softmax(-1), 1, generator=row.generator))


def partial_stop_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best
