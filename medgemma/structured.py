"""Constrained decoding: a request's JSON schema, regex or choice list becomes a per-row token mask.

Library: **llguidance** (Microsoft's Rust grammar engine, also a vLLM and SGLang backend), chosen after measuring it
against xgrammar and outlines-core on the demo tokenizer (``bench/grammar_libs.py``; figures in the README):

* it **refuses what it cannot enforce**: an unsupported JSON Schema keyword (``not``, ``if``/``then``,
  ``uniqueItems``, look-around in ``pattern``) is an error naming the keyword, which becomes a 400. xgrammar 0.2.9
  compiled all four without complaint and would then not enforce them, so "valid JSON for your schema" would be a
  silent lie;
* compilation is lazy (no per-schema precomputation over the vocabulary): under a millisecond per schema here and
  independent of the vocabulary size, so a new schema never stalls anything; outlines-core builds a full automaton
  index over the vocabulary per schema (23 ms for a small report schema on a 1,024-token vocabulary; it grows with
  both);
* its per-token mask costs 13-15 µs here (xgrammar 1-11 µs, outlines-core under 1 µs once its index is built):
  noise next to a decode step, and computed for all constrained rows at once on a thread pool that releases the GIL;
* it builds its vocabulary from a local tokenizer (outlines-core 0.2 only from the Hub, i.e. not offline) and
  depends on nothing else (xgrammar pulls torch-specific kernels, triton and tvm-ffi).

How the engine uses it (the whole interface, so a rewritten engine ports a handful of calls):

* ``GrammarCompiler(tokenizer, vocab_size=..., eos_ids=...)`` once per loaded model (cheap; the tokenizer view is
  built lazily on the first constrained request, ~1 s for Gemma's 262k vocabulary);
* ``compiler.compile(spec)`` at prepare time, on the caller's thread → a fresh :class:`RowConstraint`; compiled
  grammars are cached per constraint text; bad constraints raise :class:`BadRequest` (400);
* ``apply_token_masks(constraints, logits)`` in the sampler, once per step, for the rows of that step: masks the
  rows that have a constraint, in place; other rows are not touched (their output is what it would be alone);
* ``constraint.accept(token)`` after a row's token is chosen; ``constraint.is_terminated()`` → the row finishes
  with "stop" (the constraint is complete and allows nothing but the end); hitting ``max_new_tokens`` first is
  "length".

Kinds: ``json_schema`` and ``json_object`` (OpenAI's ``response_format``), and as extensions ``regex``, ``choice``
and ``grammar`` (llguidance's Lark dialect, where ``%json {...}`` embeds a schema and ``<unused94>`` names a token),
under vLLM's ``structured_outputs`` names.

Output is compact JSON (no whitespace between tokens, ``","`` and ``":"`` separators), so a random or confused model
cannot spend its budget on spaces. Thinking comes first: if the model's own first choice is the thought-opening
token, the thought runs unconstrained (except that it may not end the answer) and the grammar applies from the
token after ``<unused95>``. A constraint that mentions the tag itself (e.g. a test regex) is applied from the first
token instead.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from medgemma.errors import BadRequest
from medgemma.protocol import ConstraintSpec
from medgemma.reasoning import THINK_CLOSE, THINK_OPEN, tag_ids

log = logging.getLogger(__name__)

CACHE_SIZE = 256  # compiled grammars kept per model (a schema used by one client is compiled once)
# Compact JSON, always: applied as llguidance "overrides", after any "x-guidance" options inside a user's schema,
# and `lenient: false` so an unsupported keyword is refused rather than ignored.
_JSON_OPTIONS = {
    "whitespace_flexible": False,
    "item_separator": ",",
    "key_separator": ":",
    "lenient": False,
    "coerce_one_of": False,
}
_START, _THINKING, _ANSWER = "start", "thinking", "answer"


class RowConstraint:
    """One request's constraint state: the grammar matcher, plus the thought that may come before it."""

    def __init__(self, matcher: Any, *, think_ids: tuple[int | None, int | None], eos_ids: Sequence[int]) -> None:
        self._matcher = matcher
        self._think_open, self._think_close = think_ids
        self._eos = list(eos_ids)
        self._phase = _START if self._think_open is not None and self._think_close is not None else _ANSWER

    @property
    def thinking(self) -> bool:
        return self._phase == _THINKING

    def accept(self, token_id: int) -> None:
        """The token chosen for this row (after the mask was applied)."""
        if self._phase == _START:
            self._phase = _THINKING if token_id == self._think_open else _ANSWER
            if self._phase == _THINKING:
                return
        if self._phase == _THINKING:
            if token_id == self._think_close:
                self._phase = _ANSWER
            return
        if not self._matcher.consume_token(token_id):
            # Cannot happen for a token the mask allowed. Logged without the library's message, which quotes
            # generated text (patient data); the matcher is now in error, so the row ends (is_terminated).
            log.warning("a constrained row's grammar refused the token the mask allowed; the row ends")

    def is_terminated(self) -> bool:
        """The constraint is complete and allows only the end: the row finishes with "stop"."""
        return self._phase == _ANSWER and (self._matcher.is_stopped() or self._matcher.is_error())

    def is_accepting(self) -> bool:
        return self._phase == _ANSWER and self._matcher.is_accepting()


class GrammarCompiler:
    """Compiles constraints for one tokenizer; thread-safe, cached per constraint text."""

    def __init__(self, tokenizer: Any, *, vocab_size: int, eos_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.eos_ids = sorted({int(i) for i in eos_ids})
        self.think_ids = tag_ids(tokenizer)
        self._lock = threading.Lock()
        self._lltok: Any = None
        self._executor: Any = None
        self._cache: OrderedDict[tuple[str, str], tuple[Any, bool]] = OrderedDict()

    def _tokenizer_view(self) -> Any:
        if self._lltok is None:
            import llguidance
            import llguidance.hf

            self._lltok = llguidance.hf.from_tokenizer(self.tokenizer, self.vocab_size, eos_token=self.eos_ids)
            self._executor = llguidance.LLExecutor(num_threads=max(1, min(4, os.cpu_count() or 1)))
        return self._lltok

    def compile(self, spec: ConstraintSpec) -> RowConstraint:
        """A fresh per-request constraint; raises BadRequest naming the problem for a constraint that cannot work."""
        key = (spec.kind, spec.source)
        with self._lock:
            lltok = self._tokenizer_view()
            cached = self._cache.get(key)
            if cached is None:
                cached = self._cache[key] = self._build(spec, lltok)
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
            pristine, mentions_thought = cached
            matcher = pristine.deep_copy()
        think = (None, None) if mentions_thought else self.think_ids
        return RowConstraint(matcher, think_ids=think, eos_ids=self.eos_ids)

    def _build(self, spec: ConstraintSpec, lltok: Any) -> tuple[Any, bool]:
        import llguidance

        grammar = grammar_for(spec)
        limits = llguidance.LLParserLimits(verbose_errors=False)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lltok, limits=limits)
        if is_error:
            reason = _public(messages[0] if messages else "invalid constraint")
            raise BadRequest(f"{spec.param}: {reason}", param=spec.param)
        matcher = llguidance.LLMatcher(lltok, grammar, limits=limits, log_level=0)
        if matcher.is_error():
            raise BadRequest(f"{spec.param}: {_public(matcher.get_error())}", param=spec.param)
        if matcher.is_stopped():  # e.g. a regex that only matches the empty string
            raise BadRequest(f"{spec.param}: the constraint allows no output at all", param=spec.param)
        # A grammar whose first token may be the thought-opening tag handles the thought itself.
        open_id = self.think_ids[0]
        mentions = False
        if open_id is not None:
            mask = torch.zeros((1, _words(self.vocab_size)), dtype=torch.int32)
            matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
            mentions = bool((int(mask[0, open_id // 32]) >> (open_id % 32)) & 1)
        return matcher, mentions

    # -- per step, on the engine thread
    def fill(self, rows: Sequence[tuple[RowConstraint, int]], bitmask: torch.Tensor) -> None:
        """Fill ``bitmask[k]`` for each (constraint, k), on llguidance's thread pool."""
        pairs = [(c._matcher, k) for c, k in rows]
        self._executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])


def grammar_for(spec: ConstraintSpec) -> str:
    """The llguidance grammar text of a constraint (no tokenizer needed)."""
    import llguidance

    if spec.kind in ("json_schema", "json_object"):
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(spec.source, overrides=_JSON_OPTIONS)
        except ValueError as exc:
            raise BadRequest(f"{spec.param}: {_public(str(exc))}", param=spec.param) from None
    if spec.kind in ("regex", "choice") and any(t.strip("<>") in spec.source for t in (THINK_OPEN, THINK_CLOSE)):
        # llguidance matches these tags as tokens, never as text; a grammar names them as tokens (<unused94>).
        raise BadRequest(
            f"{spec.param}: a regex or choice applies to the answer after any thought and cannot contain the "
            "thinking tags; use structured_outputs.grammar to shape the thought itself",
            param=spec.param,
        )
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.source)
    if spec.kind == "grammar":
        return llguidance.LLMatcher.grammar_from_lark(spec.source)
    if spec.kind == "choice":
        choices = json.loads(spec.source)
        # Each choice as a JSON string literal, which Lark's string syntax accepts (quotes and backslashes escaped).
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    raise BadRequest(f"{spec.param}: unknown constraint kind {spec.kind!r}", param=spec.param)


def apply_token_masks(
    compiler: GrammarCompiler | None, constraints: Sequence[RowConstraint | None], logits: torch.Tensor
) -> None:
    """Mask, in place, the rows of ``logits`` (rows, vocab) whose constraint is set; other rows stay untouched.

    A row whose constraint is still at its first token and whose own top choice is the thought-opening tag enters
    its thought instead (unmasked, except that it may not end there); a row inside its thought likewise."""
    active = [(i, c) for i, c in enumerate(constraints) if c is not None]
    if not active or compiler is None:
        return
    starting = [(i, c) for i, c in active if c._phase == _START]
    if starting:
        top = logits[[i for i, _ in starting]].argmax(-1).tolist()
        for (_, c), t in zip(starting, top, strict=True):
            if t == c._think_open:
                c._phase = _THINKING
            else:
                c._phase = _ANSWER
    masked: list[tuple[int, RowConstraint]] = []
    for i, c in active:
        if c._phase == _THINKING:
            if c._eos:
                logits[i, c._eos] = float("-inf")
        else:
            masked.append((i, c))
    if not masked:
        return
    vocab = logits.shape[-1]
    bitmask = torch.zeros((len(masked), _words(compiler.vocab_size)), dtype=torch.int32)
    compiler.fill([(c, k) for k, (_, c) in enumerate(masked)], bitmask)
    bits = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask.to(logits.device).unsqueeze(-1) >> bits) & 1).flatten(1).bool()
    if allowed.shape[1] < vocab:  # logits wider than the grammar's vocabulary: the extra ids are never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
    allowed = allowed[:, :vocab]
    rows = torch.tensor([i for i, _ in masked], device=logits.device)
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))


def _words(vocab: int) -> int:
    return (vocab + 31) // 32


def _public(message: str) -> str:
    """A library message, cleaned for a client: first line, no internal noise, bounded."""
    text = " ".join(message.strip().split())
    return text[:400] or "invalid constraint"
