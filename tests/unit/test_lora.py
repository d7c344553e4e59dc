"""Per-token LoRA (medgemma.lora) on the real tiny Gemma 3 models, against PEFT's merge_and_unload, without a server."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from medgemma import lora as lora_mod
from medgemma.config import Settings
from medgemma.demo_lora import build_adapter, load_base, merged_model
from medgemma.engine import Engine
from medgemma.errors import AdapterFailed, AdapterLoading, NotFound
from medgemma.loader import load_model
from medgemma.lora import LoraSet, rows_active
from medgemma.protocol import GenerationRequest, ImagePart, Message, SamplingParams, TextPart
from tests.lora_refs import loaded_with, reference_tokens

torch.set_grad_enabled(False)


@pytest.fixture(scope="module")
def adapters(tiny_vlm, tiny_text, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        # Google's notebook layout: every linear layer (vision tower too) + lm_head and embed_tokens copies
        "notebook": build_adapter(tiny_vlm, root / "notebook", seed=1, style="notebook", rank=4),
        "attention": build_adapter(tiny_vlm, root / "attention", seed=2, style="attention", rank=8),
        "rslora": build_adapter(tiny_vlm, root / "rslora", seed=3, style="attention", rank=16, rslora=True),
        "text": build_adapter(tiny_text, root / "text", seed=4, style="notebook", rank=4),
    }


def lora_set(base: Path, adapters: dict[str, Path], **limits) -> tuple[torch.nn.Module, LoraSet]:
    model = load_base(base)
    ls = LoraSet(model, max_adapters=limits.get("max_adapters", 8), max_rank=limits.get("max_rank", 64))
    for name, path in adapters.items():
        ls.register(name, str(path))
        ls.load(name)
    return model, ls


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8))


def test_mixed_rows_equal_each_adapter_merged(tiny_vlm, adapters):
    """One forward pass over rows with two adapters and the base equals each merged model on its own row, in both
    ways of adding the deltas (few tokens: stacked; many tokens: grouped by adapter)."""
    names = {"notebook": adapters["notebook"], "attention": adapters["attention"]}
    model, ls = lora_set(tiny_vlm, names)
    assert [a["state"] for a in ls.listing()] == ["ready", "ready"]
    refs = [load_base(tiny_vlm), merged_model(tiny_vlm, names["notebook"]), merged_model(tiny_vlm, names["attention"])]
    for length in (10, 200):  # 3 x 10 tokens <= DENSE_MAX_TOKENS < 3 x 200
        ids = torch.randint(200, 900, (3, length), generator=torch.Generator().manual_seed(length))
        with rows_active(ls, [-1, 0, 1]):
            ours = model(input_ids=ids).logits
        for row, ref in enumerate(refs):
            theirs = ref(input_ids=ids[row : row + 1]).logits[0]
            assert torch.allclose(ours[row], theirs, atol=2e-5, rtol=0), (length, row)
        # the adapters change the logits a lot more than that tolerance: the comparison can fail
        assert (refs[1](input_ids=ids[:1]).logits - refs[0](input_ids=ids[:1]).logits).abs().max() > 0.1
    with rows_active(ls, [-1, -1, -1]):  # all base: exactly the base
        assert torch.equal(model(input_ids=ids).logits, refs[0](input_ids=ids).logits)


def test_packed_token_layout(tiny_vlm, adapters):
    """The index is per token, so one row may hold tokens of several adapters (the packed (1, T) layout): each
    token's projection gets its own adapter's delta."""
    model, ls = lora_set(tiny_vlm, {"a": adapters["attention"], "b": adapters["rslora"]})
    ref_a, ref_b = merged_model(tiny_vlm, adapters["attention"]), merged_model(tiny_vlm, adapters["rslora"])
    layer, ref_la, ref_lb = (m.model.language_model.layers[0].self_attn.q_proj for m in (model, ref_a, ref_b))
    x = torch.randn(1, 300, layer.in_features)
    index = torch.tensor([[0] * 100 + [-1] * 100 + [1] * 100])
    with ls.active(index):
        out = layer(x)[0]
    assert torch.allclose(out[:100], ref_la(x[0, :100]), atol=1e-5)
    assert torch.allclose(out[100:200], layer.base(x[0, 100:200]), atol=1e-6)
    assert torch.allclose(out[200:], ref_lb(x[0, 200:]), atol=1e-5)


def test_images_go_through_the_adapted_vision_tower(tiny_vlm, adapters):
    """The notebook adapter changes the vision tower: image rows through the engine equal the merged model."""
    loaded = load_model(Settings(model=str(tiny_vlm)))
    ls = LoraSet(loaded.model, max_adapters=2, max_rank=64)
    ls.register("nb", str(adapters["notebook"]))
    ls.load("nb")
    assert ls.adapters["nb"].vision_tower
    engine = Engine(loaded, max_batch_size=8, lora=ls)
    engine.start()
    try:
        reqs = [
            GenerationRequest(
                [Message("user", (TextPart(f"Describe image {i}"), ImagePart(image(i), {})))],
                SamplingParams.resolve(max_new_tokens=12),
                adapter=adapter,
            )
            for i, adapter in enumerate(["nb", None, "nb"])
        ]
        handles = [engine.submit(engine.prepare(r)) for r in reqs]  # batched together: one vision-tower call
        ours = [h.wait_sync(60).token_ids for h in handles]
    finally:
        engine.stop()
    merged = loaded_with(tiny_vlm, adapters["notebook"])
    base = loaded_with(tiny_vlm, None)
    assert ours[0] == reference_tokens(merged, reqs[0])
    assert ours[1] == reference_tokens(base, reqs[1])
    assert ours[2] == reference_tokens(merged, reqs[2])
    assert ours[0] != reference_tokens(base, reqs[0])


def test_text_only_model_with_embedding_and_head_copies(tiny_text, adapters):
    model, ls = lora_set(tiny_text, {"t": adapters["text"]})
    info = ls.adapters["t"]
    assert info.modules_to_save == ["embed_tokens", "lm_head"]
    assert not info.vision_tower
    ids = torch.randint(200, 900, (2, 12))
    with rows_active(ls, [0, -1]):
        ours = model(input_ids=ids).logits
    assert torch.allclose(ours[0], merged_model(tiny_text, adapters["text"])(input_ids=ids[:1]).logits[0], atol=2e-5)
    assert torch.equal(ours[1], load_base(tiny_text)(input_ids=ids[1:]).logits[0])


def test_listing_reports_rank_targets_and_memory(tiny_vlm, adapters):
    _, ls = lora_set(tiny_vlm, {"nb": adapters["notebook"], "rs": adapters["rslora"]})
    nb, rs = ls.listing()
    assert nb["rank"] == 4 and nb["alpha"] == 8.0
    assert {"q_proj", "down_proj", "fc1", "out_proj"} <= set(nb["target_modules"])
    assert nb["modules_to_save"] == ["embed_tokens", "lm_head"]
    assert rs["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"] and rs["use_rslora"] is True
    assert ls.memory_bytes == ls.adapters["nb"].memory_bytes + ls.adapters["rs"].memory_bytes > 0
    assert nb["memory_mb"] > rs["memory_mb"]  # the embedding and head copies are the bulk


def rewrite(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "adapter_model.safetensors"))
    config = json.loads((dst / "adapter_config.json").read_text())
    tensors, config = change(tensors, config)
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def test_adapters_saved_with_older_transformers_names_load(tiny_vlm, adapters, tmp_path):
    """Before transformers 4.52 the language model lived at `language_model.model.*`: such adapters still match."""

    def legacy(t, c):
        old = {}
        for k, v in t.items():
            old[k.replace("base_model.model.model.language_model.", "base_model.model.language_model.model.")] = v
        return old, c

    path = rewrite(adapters["attention"], tmp_path / "legacy", legacy)
    model, ls = lora_set(tiny_vlm, {"old": path})
    assert ls.adapters["old"].state == "ready", ls.adapters["old"].error
    ids = torch.randint(200, 900, (1, 9))
    with rows_active(ls, [0]):
        ours = model(input_ids=ids).logits
    assert torch.allclose(ours, merged_model(tiny_vlm, adapters["attention"])(input_ids=ids).logits, atol=2e-5)


def _drop_first_lora_row(t, c):
    key = next(k for k in t if k.endswith("q_proj.lora_B.weight"))
    t[key] = torch.zeros(t[key].shape[0] + 1, t[key].shape[1])
    return t, c


BROKEN = {
    "missing": (None, "does not exist"),
    "not-peft": (lambda d: (d / "adapter_config.json").unlink(), "has no adapter_config.json"),
    "corrupt": (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00" * 64), "could not be read"),
    "dora": (lambda d: _config(d, use_dora=True), "DoRA"),
    "bias": (lambda d: _config(d, bias="all"), "bias"),
    "not-lora": (lambda d: _config(d, peft_type="PREFIX_TUNING"), "only LoRA"),
}


def _config(d: Path, **changes) -> None:
    config = json.loads((d / "adapter_config.json").read_text())
    config.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_adapters_are_stored_errors(tiny_vlm, adapters, tmp_path, kind):
    change, words = BROKEN[kind]
    path = tmp_path / kind
    if change is not None:
        shutil.copytree(adapters["attention"], path)
        change(path)
    _, ls = lora_set(tiny_vlm, {"broken": path, "good": adapters["attention"]})
    info = ls.adapters["broken"]
    assert info.state == "failed" and words in info.error, info.error
    assert ls.adapters["good"].state == "ready"  # the others are unaffected
    with pytest.raises(AdapterFailed) as err:
        ls.index_of("broken")
    assert err.value.status_code == 503 and words in err.value.body()["loading_error"]


def test_wrong_shapes_and_foreign_layers_are_refused(tiny_vlm, tiny_text, adapters, tmp_path):
    shapes = rewrite(adapters["attention"], tmp_path / "shapes", _drop_first_lora_row)
    _, ls = lora_set(tiny_vlm, {"shapes": shapes})
    assert "trained on another base model" in ls.adapters["shapes"].error
    # An image+text adapter that adapts the vision tower, on the text-only model: refused, saying which layer.
    _, ls = lora_set(tiny_text, {"vlm-adapter": adapters["notebook"]})
    assert "vision tower" in ls.adapters["vlm-adapter"].error


def test_projector_targets_are_refused(tiny_vlm, adapters, tmp_path):
    def projector(t, c):
        t["base_model.model.model.multi_modal_projector.mm_input_projection.lora_A.weight"] = torch.zeros(4, 32)
        t["base_model.model.model.multi_modal_projector.mm_input_projection.lora_B.weight"] = torch.zeros(32, 4)
        return t, c

    _, ls = lora_set(tiny_vlm, {"proj": rewrite(adapters["attention"], tmp_path / "proj", projector)})
    assert "multimodal projector" in ls.adapters["proj"].error


def test_limits_on_rank_and_count(tiny_vlm, adapters):
    _, ls = lora_set(tiny_vlm, {"big": adapters["rslora"], "small": adapters["notebook"]}, max_rank=8)
    assert "MEDGEMMA_MAX_LORA_RANK=8" in ls.adapters["big"].error
    assert ls.adapters["small"].state == "ready"
    _, ls = lora_set(tiny_vlm, {"one": adapters["attention"], "two": adapters["notebook"]}, max_adapters=1)
    assert ls.adapters["one"].state == "ready"
    assert "MEDGEMMA_MAX_LORA_ADAPTERS=1" in ls.adapters["two"].error


def test_unknown_adapter_is_a_404(tiny_vlm, adapters):
    _, ls = lora_set(tiny_vlm, {"a": adapters["attention"]})
    with pytest.raises(NotFound) as err:
        ls.index_of("nope")
    assert err.value.param == "adapter" and "served: a" in err.value.message
    with pytest.raises(NotFound):
        lora_mod.resolve_adapter(None, "a")  # no adapters configured at all
    assert lora_mod.resolve_adapter(None, None) == -1


def test_no_adapter_in_the_batch_costs_no_lora_work(tiny_vlm, adapters):
    _, ls = lora_set(tiny_vlm, {"a": adapters["attention"]})
    with rows_active(ls, [-1, -1]):
        assert ls._active is None  # nothing is planned or indexed for a base-only batch
    with rows_active(ls, [0, -1]):
        assert ls._active is not None


def test_adapter_loaded_while_the_engine_decodes_is_installed_between_steps(tiny_vlm, adapters):
    """Loading happens on another thread; layers are only swapped between forward passes, and the running
    request (base) is not disturbed by an adapter arriving mid-generation."""
    loaded = load_model(Settings(model=str(tiny_vlm)))
    ls = LoraSet(loaded.model, max_adapters=2, max_rank=64)
    ls.register("late", str(adapters["notebook"]))
    engine = Engine(loaded, max_batch_size=4, lora=ls)
    engine.start()
    try:
        base_req = GenerationRequest(
            [Message("user", (TextPart("Tell me about the heart"),))], SamplingParams.resolve(max_new_tokens=150)
        )
        with pytest.raises(AdapterLoading) as err:  # not loaded yet: 202
            engine.prepare(GenerationRequest(base_req.messages, base_req.params, adapter="late"))
        assert err.value.status_code == 202
        running = engine.submit(engine.prepare(base_req))
        deadline = time.monotonic() + 30
        while engine.steps < 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        ls.load("late")  # the engine is decoding: the install waits for a step boundary
        assert ls.adapters["late"].state == "ready"
        adapted = GenerationRequest(base_req.messages, SamplingParams.resolve(max_new_tokens=12), adapter="late")
        ours = engine.submit(engine.prepare(adapted)).wait_sync(60).token_ids
        base_tokens = running.wait_sync(120).token_ids
    finally:
        engine.stop()
    assert base_tokens == reference_tokens(loaded_with(tiny_vlm, None), base_req)
    assert ours == reference_tokens(loaded_with(tiny_vlm, adapters["notebook"]), adapted)
