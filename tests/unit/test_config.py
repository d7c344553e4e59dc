"""Settings: defaults, environment parsing, validation, app-name derivation, configuration.yaml, README table."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from medgemma import config
from medgemma.config import (
    DEFAULT_MODEL,
    Settings,
    config_path,
    derive_app_name,
    load_bentoml_config,
    parse_demo_spec,
    settings_table,
)

ROOT = Path(__file__).resolve().parents[2]
TABLE_START = "<!-- settings-table:start -->"
TABLE_END = "<!-- settings-table:end -->"


def env(**values: str) -> dict[str, str]:
    return {f"MEDGEMMA_{k.upper()}": v for k, v in values.items()}


# ------------------------------------------------------------------------------------------------ defaults


def test_defaults_without_any_environment():
    s = Settings.from_env({})
    assert s == Settings()
    assert s.model == DEFAULT_MODEL == "google/medgemma-27b-it"
    assert s.app_name == ""
    assert s.route_prefix == "medgemma-27b-it"
    assert s.load_on_startup is True
    assert s.dtype == "auto"
    assert s.quantization == "none"
    assert s.trust_remote_code is False
    assert s.hf_token == ""
    assert s.default_max_new_tokens == 200  # the seed's default
    assert s.max_new_tokens_cap == 4096
    assert s.dicom_frames == "middle"
    assert s.image_url_domains == ()
    assert s.api_token == ""
    assert s.log_content is False


def test_every_setting_has_help_and_an_env_var():
    for f in dataclasses.fields(Settings):
        assert f.metadata["help"].strip(), f.name
        name = Settings.env_name(f.name)
        assert name == (f.metadata["env"] or f"MEDGEMMA_{f.name.upper()}")
    assert Settings.env_name("hf_token") == "HF_TOKEN"
    assert Settings.env_name("max_new_tokens_cap") == "MEDGEMMA_MAX_NEW_TOKENS_CAP"


def test_from_env_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("MEDGEMMA_MODEL", "google/medgemma-4b-it")
    monkeypatch.setenv("MEDGEMMA_MAX_BATCH_SIZE", "3")
    s = Settings.from_env()
    assert s.model == "google/medgemma-4b-it"
    assert s.max_batch_size == 3


# ------------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "True", "yes", "on", " on "])
def test_truthy_bools(raw):
    assert Settings.from_env(env(load_on_startup="false", log_content=raw)).log_content is True


@pytest.mark.parametrize("raw", ["0", "false", "False", "no", "OFF"])
def test_falsy_bools(raw):
    assert Settings.from_env(env(load_on_startup=raw)).load_on_startup is False


def test_ints_floats_strings_and_secrets():
    s = Settings.from_env(
        {
            **env(
                max_batch_size=" 8 ",
                max_queue="1000",
                load_retry_backoff_s="2.5",
                idle_unload_s="0.25",
                loading_retry_after_s="3",
                model="/models/my-ckpt",
                device_map="cuda:0",
                api_token="s3cret",
            ),
            "HF_TOKEN": "hf_abc",
        }
    )
    assert s.max_batch_size == 8
    assert s.max_queue == 1000
    assert s.load_retry_backoff_s == 2.5
    assert s.idle_unload_s == 0.25
    assert s.loading_retry_after_s == 3
    assert s.model == "/models/my-ckpt"
    assert s.device_map == "cuda:0"
    assert s.api_token == "s3cret"
    assert s.hf_token == "hf_abc"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("dtype", "bfloat16"),
        ("dtype", "float32"),
        ("quantization", "4bit"),
        ("quantization", "8bit"),
        ("dicom_frames", "all"),
        ("dicom_frames", "first"),
    ],
)
def test_literals(name, value):
    assert getattr(Settings.from_env(env(**{name: value})), name) == value


def test_tuples_are_comma_separated_and_trimmed():
    s = Settings.from_env(env(image_url_domains=" a.example.org, b.example.org ,,"))
    assert s.image_url_domains == ("a.example.org", "b.example.org")


def test_empty_values_mean_the_default():
    s = Settings.from_env(env(max_batch_size="", dtype="", load_on_startup=""))
    assert s.max_batch_size == Settings().max_batch_size
    assert s.dtype == "auto"
    assert s.load_on_startup is True


def test_overrides_win_over_the_environment():
    s = Settings.from_env(env(max_batch_size="8"), max_batch_size=2)
    assert s.max_batch_size == 2


def test_replace_returns_a_new_frozen_settings():
    s = Settings()
    t = s.replace(max_queue=5)
    assert t.max_queue == 5
    assert s.max_queue == 256
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.max_queue = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("var", "raw", "why"),
    [
        ("MEDGEMMA_LOAD_ON_STARTUP", "maybe", "true or false"),
        ("MEDGEMMA_MAX_BATCH_SIZE", "many", "not valid"),
        ("MEDGEMMA_MAX_BATCH_SIZE", "1.5", "not valid"),
        ("MEDGEMMA_LOAD_RETRY_BACKOFF_S", "soon", "not valid"),
        ("MEDGEMMA_DTYPE", "int8", "auto, bfloat16, float16, float32"),
        ("MEDGEMMA_QUANTIZATION", "2bit", "none, 8bit, 4bit"),
        ("MEDGEMMA_DICOM_FRAMES", "last", "middle, first, all"),
    ],
)
def test_bad_values_name_the_variable(var, raw, why):
    with pytest.raises(ValueError, match=re.escape(var)) as err:
        Settings.from_env({var: raw})
    assert why in str(err.value)
    assert repr(raw) in str(err.value)


@pytest.mark.parametrize(
    "name",
    ["default_max_new_tokens", "max_new_tokens_cap", "max_batch_size", "max_queue", "max_body_bytes",
     "max_image_bytes", "max_image_pixels", "max_images", "max_text_chars"],
)  # fmt: skip
def test_non_positive_limits_name_the_variable(name):
    var = f"MEDGEMMA_{name.upper()}"
    with pytest.raises(ValueError, match=re.escape(var)):
        Settings.from_env({var: "0"})


def test_default_above_cap_is_refused():
    with pytest.raises(ValueError, match="MEDGEMMA_DEFAULT_MAX_NEW_TOKENS"):
        Settings.from_env(env(default_max_new_tokens="300", max_new_tokens_cap="100"))
    assert Settings.from_env(env(default_max_new_tokens="100", max_new_tokens_cap="100")).max_new_tokens_cap == 100


@pytest.mark.parametrize("bad", ["has space", "a/b", "-leading", "ü"])
def test_bad_app_name_is_refused(bad):
    with pytest.raises(ValueError, match="MEDGEMMA_APP_NAME"):
        Settings.from_env(env(app_name=bad))


# ------------------------------------------------------------------------------------------------ app name


@pytest.mark.parametrize(
    ("model", "app"),
    [
        ("google/medgemma-27b-it", "medgemma-27b-it"),
        ("google/medgemma-4b-it", "medgemma-4b-it"),
        ("google/medgemma-27b-text-it", "medgemma-27b-text-it"),
        ("medgemma-4b-it", "medgemma-4b-it"),
        ("/models/checkpoints/my-ckpt", "my-ckpt"),
        ("/models/checkpoints/my-ckpt/", "my-ckpt"),
        ("./relative/ckpt_v1.2", "ckpt_v1.2"),
        ("/models/weird name!", "weird-name"),
        ("demo", "medgemma-demo-tiny-it"),
        ("demo:small", "medgemma-demo-small-it"),
        ("demo:tiny-text", "medgemma-demo-tiny-text-it"),
        ("demo:small-text", "medgemma-demo-small-text-it"),
    ],
)
def test_app_name_derivation(model, app):
    assert derive_app_name(model) == app
    assert Settings.from_env(env(model=model)).route_prefix == app


def test_demo_names_match_the_demo_module():
    from medgemma.demo import checkpoint_name

    assert derive_app_name("demo:small-text") == checkpoint_name("text", "small")
    assert derive_app_name("demo") == checkpoint_name("vlm", "tiny")


def test_explicit_app_name_wins():
    s = Settings.from_env(env(model="google/medgemma-27b-it", app_name="medgemma-27b"))
    assert s.route_prefix == "medgemma-27b"


def test_checkpoint_dir_name_is_the_app(tiny_vlm):
    assert Settings.from_env(env(model=str(tiny_vlm))).route_prefix == tiny_vlm.name


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("demo", ("vlm", "tiny")),
        ("demo:small", ("vlm", "small")),
        ("demo:tiny-vlm", ("vlm", "tiny")),
        ("demo:tiny-text", ("text", "tiny")),
        ("demo:small-text", ("text", "small")),
    ],
)
def test_parse_demo_spec(spec, parsed):
    assert parse_demo_spec(spec) == parsed


@pytest.mark.parametrize("spec", ["demo:huge", "demo:small-audio", "demo:text"])
def test_bad_demo_spec(spec):
    with pytest.raises(ValueError, match="unknown demo model"):
        parse_demo_spec(spec)


# ------------------------------------------------------------------------------------------------ configuration.yaml


def test_load_bentoml_config_reads_the_service_section(tmp_path):
    path = tmp_path / "configuration.yaml"
    path.write_text(
        "services:\n"
        "  MedGemma:\n"
        "    http:\n"
        "      port: 3456\n"
        "    traffic:\n"
        "      timeout: 7\n"
        "      max_concurrency: 3\n"
        "    workers: 1\n"
        "  Other:\n"
        "    traffic:\n"
        "      timeout: 1\n"
    )
    assert load_bentoml_config(path) == {
        "http": {"port": 3456},
        "traffic": {"timeout": 7, "max_concurrency": 3},
        "workers": 1,
    }
    assert load_bentoml_config(path, service_name="Other") == {"traffic": {"timeout": 1}}
    assert load_bentoml_config(path, service_name="Missing") == {}


def test_load_bentoml_config_missing_or_empty_file(tmp_path):
    assert load_bentoml_config(tmp_path / "nope.yaml") == {}
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_bentoml_config(empty) == {}
    no_services = tmp_path / "other.yaml"
    no_services.write_text("api_server:\n  workers: 2\n")
    assert load_bentoml_config(no_services) == {}


def test_load_bentoml_config_malformed(tmp_path):
    top_list = tmp_path / "list.yaml"
    top_list.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_bentoml_config(top_list)
    bad_section = tmp_path / "section.yaml"
    bad_section.write_text("services:\n  MedGemma: 5\n")
    with pytest.raises(ValueError, match=r"services\.MedGemma"):
        load_bentoml_config(bad_section)


def test_medgemma_config_points_at_another_file(tmp_path, monkeypatch):
    other = tmp_path / "mine.yaml"
    other.write_text("services:\n  MedGemma:\n    traffic:\n      timeout: 42\n")
    assert config_path({"MEDGEMMA_CONFIG": str(other)}) == other
    monkeypatch.setenv("MEDGEMMA_CONFIG", str(other))
    assert load_bentoml_config() == {"traffic": {"timeout": 42}}


def test_default_config_path_is_the_repository_file():
    path = config_path({})
    assert path == ROOT / "configuration.yaml"
    section = load_bentoml_config(path)
    assert section["traffic"]["timeout"] >= 60
    assert section["http"]["port"] == 3000


# ------------------------------------------------------------------------------------------------ README table


def test_settings_table_lists_every_setting():
    table = settings_table()
    lines = table.splitlines()
    assert lines[0] == "| Variable | Default | Meaning |"
    assert len(lines) == 2 + len(dataclasses.fields(Settings))
    for f in dataclasses.fields(Settings):
        assert f"`{Settings.env_name(f.name)}`" in table
    assert "| `MEDGEMMA_LOAD_ON_STARTUP` | `true` |" in table
    assert "| `MEDGEMMA_MODEL` | `google/medgemma-27b-it` |" in table
    assert "| `HF_TOKEN` | `(empty)` |" in table


def test_readme_settings_table_matches_the_code():
    readme = ROOT / "README.md"
    assert readme.is_file(), "README.md is missing"
    text = readme.read_text(encoding="utf-8")
    assert TABLE_START in text, f"README.md has no {TABLE_START} marker"
    assert TABLE_END in text, f"README.md has no {TABLE_END} marker"
    between = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0]
    assert between.strip() == settings_table().strip(), (
        "README.md's settings table is out of date: regenerate it with `python -m medgemma.config`"
    )


def test_module_cli_prints_the_table():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "medgemma.config"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == config.settings_table().strip()
