"""Random-weight demo checkpoints: real Gemma 3 classes, offline, consistent sizes, Gemma's chat format.

Each checkpoint is built once per module (well under a second each for "tiny"); the whole file takes about
5 s on two idle CPU cores, plus the transformers import.
"""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
)

from medgemma import demo, demo_sizes

SYSTEM_USER_IMAGE = [
    {"role": "system", "content": "You are an expert radiologist. "},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "  Describe this X-ray.\n"},
            {"type": "image"},
        ],
    },
]
EXPECTED_PROMPT = (
    "<bos><start_of_turn>user\n"
    "You are an expert radiologist.\n\n"
    "Describe this X-ray.<start_of_image><end_of_turn>\n"
    "<start_of_turn>model\n"
)

ROUND_TRIP_TEXTS = [
    "Hello, world!",
    "line one\nline two\n\n\tindented\r\nwindows line",
    "  leading and trailing spaces  ",
    "double  spaces   here",
    "café, naïve, résumé, Ærø, Øre, straße",
    "東京の病院で胸部X線を撮影した。肺炎",
    "emoji 😀🫁🩻 and a family 👩‍👩‍👧 and a doctor 👩‍⚕️",
    "Temp 37.5 °C ± 0.2; dose 5 µg/mL \u00d7 2 — “quoted” …",
    "control \x00\x01\x7f chars and tabs\t\t",
    "<start_of_turn looks like markup but is not a token>",
    "",
]


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.build_checkpoint(tmp_path_factory.mktemp("vlm") / "ckpt", kind="vlm", size="tiny", seed=0)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.build_checkpoint(tmp_path_factory.mktemp("text") / "ckpt", kind="text", size="tiny", seed=0)


@pytest.fixture(scope="module")
def vlm(vlm_dir: Path) -> tuple[Any, Any]:
    return AutoModelForImageTextToText.from_pretrained(vlm_dir), AutoProcessor.from_pretrained(vlm_dir)


@pytest.fixture(scope="module")
def text_model(text_dir: Path) -> tuple[Any, Any]:
    return AutoModelForCausalLM.from_pretrained(text_dir), AutoTokenizer.from_pretrained(text_dir)


def _image(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (90, 60)) -> Image.Image:
    return Image.new("RGB", size, color)


# --- names, files, configs ----------------------------------------------------------------------------


def test_checkpoint_names() -> None:
    assert demo.checkpoint_name("vlm", "tiny") == "medgemma-demo-tiny-it"
    assert demo.checkpoint_name("text", "tiny") == "medgemma-demo-tiny-text-it"
    assert demo.checkpoint_name("vlm", "small") == "medgemma-demo-small-it"
    assert demo.checkpoint_name("text", "small") == "medgemma-demo-small-text-it"
    with pytest.raises(ValueError):
        demo.checkpoint_name("audio", "tiny")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        demo.checkpoint_name("vlm", "huge")  # type: ignore[arg-type]


@pytest.mark.parametrize("fixture", ["vlm_dir", "text_dir"])
def test_checkpoint_files(fixture: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(fixture)
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert {"tokenizer_config.json", "chat_template.jinja", "README.md"} <= names
    assert not any(name.endswith((".bin", ".pt")) for name in names)
    assert "not a medical model" in (path / "README.md").read_text(encoding="utf-8")
    if fixture == "vlm_dir":
        assert "processor_config.json" in names
    # transformers writes the weights 0600; a shared cache must be readable by others too (umask permitting)
    assert (path / "model.safetensors").stat().st_mode & 0o777 == (path / "config.json").stat().st_mode & 0o777


def test_vlm_reloads_as_real_gemma3(vlm_dir: Path, vlm: tuple[Any, Any]) -> None:
    model, processor = vlm
    config = AutoConfig.from_pretrained(vlm_dir)
    assert type(config) is Gemma3Config
    assert config.model_type == "gemma3"
    assert type(model) is Gemma3ForConditionalGeneration
    assert type(processor) is Gemma3Processor
    assert type(processor.tokenizer).__name__ == "GemmaTokenizer"
    assert type(processor.image_processor).__name__.startswith("Gemma3ImageProcessor")
    assert type(model.model.vision_tower).__name__ == "SiglipVisionModel"
    tokenizer = processor.tokenizer
    # the ids the model reads must be the tokenizer's
    assert config.image_token_id == tokenizer.image_token_id == tokenizer.convert_tokens_to_ids("<image_soft_token>")
    assert config.boi_token_id == tokenizer.boi_token_id == tokenizer.convert_tokens_to_ids("<start_of_image>")
    assert config.eoi_token_id == tokenizer.eoi_token_id == tokenizer.convert_tokens_to_ids("<end_of_image>")
    assert config.text_config.vocab_size == len(tokenizer)
    # the sizes that must agree (see shared/notes/gemma3-offline.md)
    vision = config.vision_config
    assert (vision.image_size, vision.patch_size, config.mm_tokens_per_image) == (32, 8, 4)
    assert processor.image_seq_length == config.mm_tokens_per_image
    assert processor.image_processor.size["height"] == processor.image_processor.size["width"] == vision.image_size
    text = config.text_config
    assert text.hidden_size == 32
    assert text.layer_types == ["sliding_attention", "full_attention"]
    assert text.max_position_embeddings >= 4096
    assert 256 <= len(tokenizer) <= 1100


def test_text_reloads_as_real_gemma3(text_dir: Path, text_model: tuple[Any, Any]) -> None:
    model, tokenizer = text_model
    config = AutoConfig.from_pretrained(text_dir)
    assert type(config) is Gemma3TextConfig
    assert config.model_type == "gemma3_text"
    assert type(model) is Gemma3ForCausalLM
    assert type(tokenizer).__name__ == "GemmaTokenizer"
    assert config.vocab_size == len(tokenizer)


@pytest.mark.parametrize("fixture", ["vlm", "text_model"])
def test_generation_config_and_special_ids(fixture: str, request: pytest.FixtureRequest) -> None:
    model, tok_or_proc = request.getfixturevalue(fixture)
    tokenizer = getattr(tok_or_proc, "tokenizer", tok_or_proc)
    eos, end_of_turn = tokenizer.convert_tokens_to_ids(["<eos>", "<end_of_turn>"])
    gen = model.generation_config
    assert gen.eos_token_id == [eos, end_of_turn]
    assert gen.pad_token_id == tokenizer.pad_token_id
    assert gen.bos_token_id == tokenizer.bos_token_id
    assert gen.do_sample is False
    text_config = model.config.get_text_config()
    assert text_config.eos_token_id == [eos, end_of_turn]
    assert text_config.pad_token_id == tokenizer.pad_token_id
    assert text_config.bos_token_id == tokenizer.bos_token_id
    # real Gemma 3 ids where the demo vocabulary can keep them
    assert (tokenizer.pad_token_id, eos, tokenizer.bos_token_id, end_of_turn) == (0, 1, 2, 106)
    assert tokenizer.padding_side == "left"


def test_demo_key_survives_reload(vlm_dir: Path, text_dir: Path, vlm: tuple[Any, Any]) -> None:
    vlm_config = AutoConfig.from_pretrained(vlm_dir)
    text_config = AutoConfig.from_pretrained(text_dir)
    assert getattr(vlm_config, demo.DEMO_CONFIG_KEY) == {
        "size": "tiny",
        "kind": "vlm",
        "seed": 0,
        "format": demo.DEMO_FORMAT,
    }
    assert getattr(text_config, demo.DEMO_CONFIG_KEY) == {
        "size": "tiny",
        "kind": "text",
        "seed": 0,
        "format": demo.DEMO_FORMAT,
    }
    raw = json.loads((vlm_dir / "config.json").read_text(encoding="utf-8"))
    assert raw[demo.DEMO_CONFIG_KEY] == {"size": "tiny", "kind": "vlm", "seed": 0, "format": demo.DEMO_FORMAT}
    assert demo.is_demo_checkpoint(vlm_config)
    assert demo.is_demo_checkpoint(vlm_config.get_text_config())
    assert demo.is_demo_checkpoint(text_config)
    assert demo.is_demo_checkpoint(raw)
    assert demo.is_demo_checkpoint(vlm[0])  # a loaded model
    # the key is found through the text_config too, and plain configs are not demos
    raw.pop(demo.DEMO_CONFIG_KEY)
    assert demo.is_demo_checkpoint(raw)
    raw["text_config"].pop(demo.DEMO_CONFIG_KEY)
    assert not demo.is_demo_checkpoint(raw)
    assert not demo.is_demo_checkpoint(Gemma3Config())
    assert not demo.is_demo_checkpoint(Gemma3TextConfig())
    assert not demo.is_demo_checkpoint(None)


# --- tokenizer and chat template ----------------------------------------------------------------------


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trips(text: str, text_model: tuple[Any, Any]) -> None:
    _, tokenizer = text_model
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id], skip_special_tokens=True) == text


def test_tokenizer_round_trips_random_unicode(text_model: tuple[Any, Any]) -> None:
    _, tokenizer = text_model
    rng = random.Random(1234)
    alphabet = [chr(c) for c in [*range(0x20, 0x7F), *range(0xA0, 0x250), *range(0x400, 0x450), *range(0x4E00, 0x4E80)]]
    alphabet += ["\n", "\t", "\r", " ", "  ", "😀", "🩺", "\u200d", "\U0010fffd"]
    for _ in range(50):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 80)))
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_tokenizer_is_subword_not_bytes(text_model: tuple[Any, Any]) -> None:
    _, tokenizer = text_model
    pieces = tokenizer.tokenize("Is the patient with a chest x-ray stable")
    assert "▁the" in pieces
    assert len(pieces) < len("Is the patient with a chest x-ray stable") / 3
    # Gemma's own quirk, kept on purpose: "▁" is the space symbol, so a literal "▁" decodes as a space
    assert tokenizer.decode(tokenizer.encode("a▁b", add_special_tokens=False)) == "a b"


def test_special_tokens_are_single_tokens_and_skippable(vlm: tuple[Any, Any]) -> None:
    _, processor = vlm
    tokenizer = processor.tokenizer
    specials = ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"]
    specials += ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    for token in specials:
        ids = tokenizer.encode(token, add_special_tokens=False)
        assert ids == [tokenizer.convert_tokens_to_ids(token)], token
        assert tokenizer.decode(ids, skip_special_tokens=True) == ""
        assert tokenizer.decode(ids) == token
    assert tokenizer.boi_token == "<start_of_image>"
    assert tokenizer.eoi_token == "<end_of_image>"
    assert tokenizer.image_token == "<image_soft_token>"
    ids = tokenizer.encode("<start_of_turn>user\nHi there<end_of_turn>\n", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nHi there\n"
    # "user" and "model" are single tokens, as in Gemma
    assert tokenizer.tokenize("<start_of_turn>model\n") == ["<start_of_turn>", "model", "\n"]
    assert tokenizer("Hi").input_ids[0] == tokenizer.bos_token_id  # add_bos_token survives the reload


def test_chat_template_exact_string(vlm_dir: Path, vlm: tuple[Any, Any], text_model: tuple[Any, Any]) -> None:
    _, processor = vlm
    _, text_tokenizer = text_model
    vlm_tokenizer = AutoTokenizer.from_pretrained(vlm_dir)  # a tokenizer alone, from the VLM checkpoint
    for renderer in (processor, processor.tokenizer, vlm_tokenizer, text_tokenizer):
        rendered = renderer.apply_chat_template(SYSTEM_USER_IMAGE, add_generation_prompt=True, tokenize=False)
        assert rendered == EXPECTED_PROMPT, type(renderer).__name__
    conversation = [
        {"role": "user", "content": " What is shown? "},
        {"role": "assistant", "content": [{"type": "text", "text": "A chest X-ray."}]},
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "And?"}],
        },
    ]
    assert text_tokenizer.apply_chat_template(conversation, tokenize=False) == (
        "<bos><start_of_turn>user\nWhat is shown?<end_of_turn>\n"
        "<start_of_turn>model\nA chest X-ray.<end_of_turn>\n"
        "<start_of_turn>user\n<start_of_image>And?<end_of_turn>\n"
    )


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "assistant", "content": "a"}],
        [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "assistant", "content": "c"},
        ],
        [{"role": "user", "content": "a"}, {"role": "system", "content": "late system"}],
    ],
)
def test_chat_template_rejects_non_alternating_roles(messages: list[dict[str, Any]], vlm: tuple[Any, Any]) -> None:
    _, processor = vlm
    with pytest.raises(Exception, match="alternate"):
        processor.tokenizer.apply_chat_template(messages, tokenize=False)
    with pytest.raises(Exception, match="alternate"):
        processor.apply_chat_template(messages, tokenize=False)


def test_processor_expands_one_image(vlm: tuple[Any, Any]) -> None:
    model, processor = vlm
    tokenizer = processor.tokenizer
    n = model.config.mm_tokens_per_image
    messages = [{"role": "user", "content": [{"type": "image", "image": _image()}, {"type": "text", "text": "Hi"}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    ids = inputs["input_ids"][0].tolist()
    boi, eoi, soft = tokenizer.boi_token_id, tokenizer.eoi_token_id, tokenizer.image_token_id
    assert ids.count(boi) == 1
    assert ids.count(eoi) == 1
    assert ids.count(soft) == n
    start = ids.index(boi)
    assert ids[start : start + n + 2] == [boi, *[soft] * n, eoi]
    assert ids.count(tokenizer.bos_token_id) == 1  # the template's <bos>, not a second one from the tokenizer
    assert inputs["token_type_ids"][0].sum().item() == n
    size = model.config.vision_config.image_size
    assert tuple(inputs["pixel_values"].shape) == (1, 3, size, size)


# --- generation ---------------------------------------------------------------------------------------


def test_vlm_generates_with_an_image(vlm: tuple[Any, Any]) -> None:
    model, processor = vlm
    messages = [{"role": "user", "content": [{"type": "image", "image": _image()}, {"type": "text", "text": "Hi"}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    assert new.shape == (5,)
    assert isinstance(processor.decode(new, skip_special_tokens=True), str)


def test_vlm_output_depends_on_the_image(vlm: tuple[Any, Any]) -> None:
    """transformers zero-initialises the multimodal projector; left so, images would be ignored."""
    model, processor = vlm
    logits = []
    for color in [(255, 0, 0), (0, 0, 255)]:
        messages = [{"role": "user", "content": [{"type": "image", "image": _image(color)}]}]
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        with torch.inference_mode():
            logits.append(model(**inputs).logits[0, -1])
    assert (logits[0] - logits[1]).abs().max().item() > 1e-2


def test_text_generates(text_model: tuple[Any, Any]) -> None:
    model, tokenizer = text_model
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] - inputs["input_ids"].shape[1] == 5


def test_greedy_batched_matches_unbatched_and_depends_on_prompt(text_model: tuple[Any, Any]) -> None:
    """Clear top-2 margins (initializer_range): left-padded batches decode exactly like single requests."""
    model, tokenizer = text_model
    prompts = ["Describe the chest X-ray.", "hello", "Is there a pleural effusion on the left?", "Thanks!"]
    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    with torch.inference_mode():
        singles = []
        for chat in chats:
            enc = tokenizer(chat, add_special_tokens=False, return_tensors="pt")
            out = model.generate(**enc, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            singles.append(out[0, enc["input_ids"].shape[1] :].tolist())
        enc = tokenizer(chats, add_special_tokens=False, return_tensors="pt", padding=True)
        batched = model.generate(**enc, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        logits = model(**enc).logits[:, -1]
    assert batched[:, enc["input_ids"].shape[1] :].tolist() == singles
    assert len({tuple(s) for s in singles}) >= 2  # not collapsed into one prompt-independent output
    assert torch.isfinite(logits).all()
    top2 = logits.topk(2).values
    assert (top2[:, 0] - top2[:, 1]).min().item() > 1e-4


# --- determinism, ensure_checkpoint, CLI --------------------------------------------------------------


def test_same_seed_same_weights(text_dir: Path, tmp_path: Path) -> None:
    reference = load_file(text_dir / "model.safetensors")
    again = load_file(demo.build_checkpoint(tmp_path / "again", kind="text", size="tiny", seed=0) / "model.safetensors")
    other = load_file(demo.build_checkpoint(tmp_path / "other", kind="text", size="tiny", seed=1) / "model.safetensors")
    assert reference.keys() == again.keys() == other.keys()
    assert all(torch.equal(reference[k], again[k]) for k in reference)
    assert not all(torch.equal(reference[k], other[k]) for k in reference)
    assert (text_dir / "tokenizer.json").read_bytes() == (tmp_path / "again" / "tokenizer.json").read_bytes()


def test_build_does_not_disturb_the_global_rng(tmp_path: Path) -> None:
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    demo.build_checkpoint(tmp_path / "ckpt", kind="text", size="tiny", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_ensure_checkpoint_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[Path] = []
    real_build = demo.build_checkpoint

    def counting_build(path: str | Path, **kwargs: Any) -> Path:
        builds.append(Path(path))
        return real_build(path, **kwargs)

    monkeypatch.setattr(demo, "build_checkpoint", counting_build)
    first = demo.ensure_checkpoint("text", "tiny", root=tmp_path)
    assert first == tmp_path / "medgemma-demo-tiny-text-it"
    assert len(builds) == 1
    assert builds[0] != first  # built in a temporary sibling, then renamed into place
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    second = demo.ensure_checkpoint("text", "tiny", root=tmp_path)
    assert second == first
    assert len(builds) == 1
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == mtimes
    assert not list(tmp_path.glob(".*tmp-*"))  # no temporary directory left behind
    assert AutoConfig.from_pretrained(first).medgemma_demo["kind"] == "text"


def test_ensure_checkpoint_concurrent_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[Path] = []
    real_build = demo.build_checkpoint

    def counting_build(path: str | Path, **kwargs: Any) -> Path:
        builds.append(Path(path))
        return real_build(path, **kwargs)

    monkeypatch.setattr(demo, "build_checkpoint", counting_build)
    results: list[Path] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def call() -> None:
        try:
            barrier.wait()
            results.append(demo.ensure_checkpoint("vlm", "tiny", root=tmp_path))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    assert results == [tmp_path / "medgemma-demo-tiny-it"] * 2
    assert len(builds) == 1  # the second caller waited for the first and used its result
    config = AutoConfig.from_pretrained(results[0])
    assert demo.is_demo_checkpoint(config)
    assert AutoProcessor.from_pretrained(results[0]).image_seq_length == config.mm_tokens_per_image


def test_ensure_checkpoint_replaces_a_broken_directory(tmp_path: Path) -> None:
    broken = tmp_path / demo.checkpoint_name("text", "tiny")
    broken.mkdir()
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    (tmp_path / ".medgemma-demo-tiny-text-it.tmp-dead").mkdir()  # left by a killed build
    assert demo.ensure_checkpoint("text", "tiny", root=tmp_path) == broken
    assert demo.is_demo_checkpoint(json.loads((broken / "config.json").read_text(encoding="utf-8")))
    assert not list(tmp_path.glob(".*tmp-*"))
    assert not list(tmp_path.glob(".*stale-*"))


def test_default_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(demo.DEMO_DIR_ENV, str(tmp_path))
    assert demo.default_root() == tmp_path
    monkeypatch.delenv(demo.DEMO_DIR_ENV)
    assert demo.default_root() == Path.home() / ".cache" / "medgemma" / "demo"


def test_cli_prints_only_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--kind", "text", "--size", "tiny", "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert out == f"{(tmp_path / 'cli').resolve()}\n"
    assert demo.is_demo_checkpoint(AutoConfig.from_pretrained(out.strip()))


def test_cli_uses_ensure_checkpoint_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(demo.DEMO_DIR_ENV, str(tmp_path))
    assert demo.main(["--kind", "text"]) == 0
    assert capsys.readouterr().out == f"{(tmp_path / 'medgemma-demo-tiny-text-it').resolve()}\n"


# --- the small size -----------------------------------------------------------------------------------


def test_size_specs_are_consistent() -> None:
    for spec in demo_sizes.DEMO_SIZES.values():
        spec.check()
        types = spec.layer_types()
        assert "full_attention" in types
        assert "sliding_attention" in types
    small = demo_sizes.DEMO_SIZES["small"]
    assert (small.image_size, small.patch_size, small.mm_tokens_per_image) == (224, 14, 64)
    assert small.layer_types() == ["sliding_attention"] * 5 + ["full_attention"]


def test_real_medgemma_sizes_make_configs_with_their_own_vocabulary_and_scalar() -> None:
    """The real dimensions (what scripts/gpu_check.py builds) pass check() and reach the config as they are."""
    tokenizer = demo.build_tokenizer()
    for key, spec in demo_sizes.MEDGEMMA_SIZES.items():
        spec.check()
        text = demo_sizes.model_config("vlm", spec, tokenizer, dtype="bfloat16").get_text_config()
        assert text.vocab_size == 262_208 != len(tokenizer)
        assert text.query_pre_attn_scalar == {"4b": 256, "27b": 168}[key]
        assert text.layer_types.count("full_attention") == spec.num_hidden_layers // 6
        assert text.eos_token_id == [1, 106]
        assert not demo.is_demo_checkpoint(text)


def test_small_vlm_runs_an_image_in_memory() -> None:
    """The small dimensions agree end to end (projector pooling, image tokens), without 120 MB on disk."""
    spec = demo_sizes.DEMO_SIZES["small"]
    tokenizer = demo.build_tokenizer()
    config = demo_sizes.model_config("vlm", spec, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = demo._instantiate("vlm", config)
    n_params = sum(p.numel() for p in model.parameters())
    assert 25e6 < n_params < 45e6
    processor = demo.build_processor(tokenizer, image_size=spec.image_size, tokens_per_image=spec.mm_tokens_per_image)
    messages = [{"role": "user", "content": [{"type": "image", "image": _image(size=(300, 200))}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert (inputs["input_ids"] == tokenizer.image_token_id).sum().item() == 64
    with torch.inference_mode():
        logits = model(**inputs).logits
    assert logits.shape[-1] == len(tokenizer)
    assert torch.isfinite(logits).all()


def test_a_checkpoint_of_an_older_format_is_rebuilt(tmp_path: Path) -> None:
    path = demo.ensure_checkpoint("text", "tiny", root=tmp_path)
    config_path = path / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config[demo.DEMO_CONFIG_KEY]["format"] = demo.DEMO_FORMAT - 1
    config_path.write_text(json.dumps(config), encoding="utf-8")
    rebuilt = demo.ensure_checkpoint("text", "tiny", root=tmp_path)
    assert json.loads((rebuilt / "config.json").read_text())[demo.DEMO_CONFIG_KEY]["format"] == demo.DEMO_FORMAT
