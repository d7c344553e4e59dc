"""Constrained decoding with llguidance: compile, per-row masks, thought-first, bad constraints, and the real engine."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from medgemma.config import Settings
from medgemma.engine import Engine
from medgemma.errors import BadRequest
from medgemma.inputs import constraint_spec
from medgemma.loader import load_model
from medgemma.protocol import ConstraintSpec, GenerationRequest, Message, SamplingParams, TextPart
from medgemma.reasoning import split_text
from medgemma.schemas import AnswerOptions
from medgemma.structured import GrammarCompiler, apply_token_masks

FINDING = {
    "type": "object",
    "properties": {
        "finding": {"type": "string", "maxLength": 24},
        "severity": {"enum": ["none", "mild", "moderate", "severe"]},
        "confidence_percent": {"type": "integer", "minimum": 0, "maximum": 100},
        "location": {
            "type": "object",
            "properties": {"side": {"enum": ["left", "right"]}, "zone": {"enum": ["upper", "lower"]}},
            "required": ["side", "zone"],
            "additionalProperties": False,
        },
        "differential": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 2},
        "follow_up": {"type": "boolean"},
    },
    "required": ["finding", "severity", "confidence_percent", "location", "differential", "follow_up"],
    "additionalProperties": False,
}
EOS = [1, 106]


@pytest.fixture(scope="module")
def tok(tiny_vlm):
    return AutoTokenizer.from_pretrained(tiny_vlm)


@pytest.fixture(scope="module")
def compiler(tok):
    return GrammarCompiler(tok, vocab_size=len(tok), eos_ids=EOS)


def spec_of(schema: dict, param: str = "response_format.json_schema.schema") -> ConstraintSpec:
    return ConstraintSpec("json_schema", json.dumps(schema, separators=(",", ":")), param)


def walk(compiler, constraint, tok, *, seed: int, steps: int = 400, first: torch.Tensor | None = None):
    """Drive one constrained row beside an unconstrained one with random logits; return text and stop state."""
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for step in range(steps):
        logits = torch.randn(2, len(tok), generator=gen)
        if step == 0 and first is not None:
            logits[0] = first
        neighbour = logits[1].clone()
        apply_token_masks(compiler, [constraint, None], logits)
        assert torch.equal(logits[1], neighbour)  # the unconstrained row is never touched
        t = int(logits[0].argmax())
        if t in EOS:
            return tok.decode(out), "eos"
        out.append(t)
        constraint.accept(t)
        if constraint.is_terminated():
            return tok.decode(out), "terminated"
    return tok.decode(out), "length"


@pytest.mark.parametrize("seed", range(12))
def test_random_logits_always_give_valid_compact_json(compiler, tok, seed):
    text, how = walk(compiler, compiler.compile(spec_of(FINDING)), tok, seed=seed)
    assert how == "terminated"  # complete JSON ends the row by itself, no end token needed
    jsonschema.validate(json.loads(text), FINDING)
    assert not re.search(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', "", text))  # compact: no whitespace outside strings
    assert list(json.loads(text)) == list(FINDING["properties"])  # properties in the schema's order


def test_regex_and_choice(compiler, tok):
    text, _ = walk(compiler, compiler.compile(ConstraintSpec("regex", r"(yes|no), [0-9]{2}", "r")), tok, seed=1)
    assert text in {f"{a}, {n:02d}" for a in ("yes", "no") for n in range(100)}
    choices = ["yes", "no", 'say "maybe" \\ é']
    spec = ConstraintSpec("choice", json.dumps(choices, ensure_ascii=False), "c")
    seen = {walk(compiler, compiler.compile(spec), tok, seed=s)[0] for s in range(20)}
    assert seen <= set(choices) and len(seen) >= 2


def test_compiled_grammar_is_cached_and_each_request_gets_its_own_state(compiler, tok):
    spec = spec_of({"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"]})
    one, two = compiler.compile(spec), compiler.compile(spec)
    assert (spec.kind, spec.source) in compiler._cache
    assert one._matcher is not two._matcher
    walk(compiler, one, tok, seed=0)
    assert one.is_terminated() and not two.is_terminated()


def test_model_that_opens_a_thought_thinks_first_then_answers_in_the_grammar(compiler, tok):
    """Top choice at the first step is <unused94>: the thought runs free (no end token), the JSON follows it."""
    yes_no = {"type": "object", "properties": {"a": {"enum": ["yes", "no"]}}, "required": ["a"]}
    constraint = compiler.compile(spec_of({**yes_no, "additionalProperties": False}))
    close = tok.convert_tokens_to_ids("<unused95>")
    gen = torch.Generator().manual_seed(3)
    ids: list[int] = []
    for step in range(200):
        logits = torch.randn(1, len(tok), generator=gen)
        if step == 0:
            logits[0, 100] = 50.0  # the model wants to think
        if step in (1, 2):
            logits[0, EOS] = 60.0  # ...and tries to stop inside the thought: not allowed
        if step == 5:
            logits[0, close] = 70.0
        apply_token_masks(compiler, [constraint], logits)
        t = int(logits[0].argmax())
        assert t not in EOS or step > 5
        if t in EOS:
            break
        ids.append(t)
        constraint.accept(t)
        if constraint.is_terminated():
            break
    parts = split_text(tok.decode(ids))
    assert parts.thinking is not None and parts.complete
    assert json.loads(parts.answer)["a"] in ("yes", "no")


def test_a_grammar_that_names_the_thought_applies_from_the_first_token(compiler, tok):
    lark = 'start: <unused94> "thought\\n" /[a-z ]{3,20}/ <unused95> ("yes" | "no")'
    text, how = walk(compiler, compiler.compile(ConstraintSpec("grammar", lark, "g")), tok, seed=4)
    parts = split_text(text)
    assert how == "terminated" and parts.complete and parts.answer in {"yes", "no"}
    assert 3 <= len(parts.thinking or "") <= 20


@pytest.mark.parametrize(
    ("schema", "fragment"),
    [
        ({"type": "strin"}, "strin"),
        ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "string", "pattern": "^(?=a)b$"}, "look-around"),
    ],
)
def test_schema_the_library_cannot_enforce_is_a_bad_request_naming_it(compiler, schema, fragment):
    with pytest.raises(BadRequest) as err:
        compiler.compile(spec_of(schema))
    assert fragment in err.value.message
    assert err.value.message.startswith("response_format.json_schema.schema: ")


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        (ConstraintSpec("regex", "(a", "structured_outputs.regex"), "unclosed group"),
        (ConstraintSpec("regex", "<unused95>yes", "structured_outputs.regex"), "thinking tags"),
        (ConstraintSpec("grammar", "start: missing_rule", "structured_outputs.grammar"), "missing_rule"),
    ],
)
def test_bad_regex_and_grammar(compiler, spec, fragment):
    with pytest.raises(BadRequest) as err:
        compiler.compile(spec)
    assert fragment in err.value.message and err.value.param == spec.param


def options(**kw) -> AnswerOptions:
    return AnswerOptions.model_validate(kw)


def test_request_side_checks_size_and_meta_schema():
    small = Settings(max_constraint_bytes=200)
    big = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(50)}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": big}}
    with pytest.raises(BadRequest, match=r"above this server's limit of 200 bytes"):
        constraint_spec(options(response_format=fmt), small)
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "required": "a"}}}
    with pytest.raises(BadRequest, match="not a valid JSON Schema"):
        constraint_spec(options(response_format=bad), Settings())
    spec = constraint_spec(options(response_format={"type": "json_object"}), Settings())
    assert spec is not None and spec.kind == "json_object"
    assert constraint_spec(options(response_format={"type": "text"}), Settings()) is None
    spec = constraint_spec(options(structured_outputs={"choice": ["yes", "no"]}), Settings())
    assert spec is not None and json.loads(spec.source) == ["yes", "no"]


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "send one of them"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one"),
        ({"response_format": {"type": "json_schema"}}, "needs a json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}}, "pattern"),
    ],
)
def test_request_schema_refuses_contradictions(payload, fragment):
    from medgemma.schemas import parse_model

    with pytest.raises(BadRequest) as err:
        parse_model(AnswerOptions, payload)
    assert fragment in err.value.message


# --- the real engine: constrained and unconstrained rows in one batch -------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_vlm):
    eng = Engine(load_model(Settings(model=str(tiny_vlm))), max_batch_size=8, max_queue=64)
    eng.start()
    yield eng
    eng.stop()


def request(text: str, n: int, spec: ConstraintSpec | None = None) -> GenerationRequest:
    req = GenerationRequest([Message("user", (TextPart(text),))], SamplingParams.resolve(max_new_tokens=n))
    req.constraint = spec
    return req


def test_engine_mixes_constrained_and_unconstrained_rows(engine):
    prompts = [f"Patient {i}: describe the chest film." for i in range(6)]
    alone = [engine.submit(engine.prepare(request(p, 24))).wait_sync(120) for p in prompts]
    handles = []
    for i, p in enumerate(prompts):
        handles.append(engine.submit(engine.prepare(request(p, 24))))
        handles.append(engine.submit(engine.prepare(request(p, 300, spec_of(FINDING)))))
        if i == 2:
            handles.append(engine.submit(engine.prepare(request(p, 300, spec_of(FINDING)))))
    results = [h.wait_sync(300) for h in handles]
    free = [r for h, r in zip(handles, results, strict=True) if h.prepared.constraint is None]
    bound = [r for h, r in zip(handles, results, strict=True) if h.prepared.constraint is not None]
    assert [r.token_ids for r in free] == [r.token_ids for r in alone]  # neighbours change nothing, token for token
    for r in bound:
        assert r.finish_reason == "stop"
        jsonschema.validate(json.loads(r.text), FINDING)


def test_engine_max_tokens_ends_json_early_with_length(engine):
    r = engine.submit(engine.prepare(request("x", 5, spec_of(FINDING)))).wait_sync(60)
    assert r.finish_reason == "length" and r.output_tokens == 5
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.text)


def test_engine_bad_constraint_is_refused_at_prepare(engine):
    with pytest.raises(BadRequest, match="Unimplemented keys"):
        engine.prepare(request("x", 5, spec_of({"type": "object", "if": {"required": ["a"]}})))
