"""Configuration: the documented TOML shape, env overrides, profiles, readable errors, exit code 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from config import ConfigError, GatewaySettings, load_settings

EXACT_SHAPE = """
[server]
host = "127.0.0.1"
port = 8080

[[models]]
name = "minilm"               # what clients send as `model`
profile = "all-minilm-l6-v2"  # a built-in profile; inline fields may override or define a new one

[[backends]]
name = "primary"
kind = "llamacpp"             # llamacpp | tei | elastic | openai  (tei/elastic/openai arrive in issue 3)
model = "minilm"
url = "http://127.0.0.1:8081"
priority = 0                  # lower is tried first
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "gateway.toml"
    p.write_text(text)
    return p


def test_exact_documented_shape_loads(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, EXACT_SHAPE))
    assert s.server.port == 8080
    assert s.models[0].name == "minilm"
    profile = s.profile("minilm")
    assert (profile.dimension, profile.pooling, profile.prompts, profile.max_input_tokens) == (384, "mean", {}, 256)
    b = s.backends[0]
    assert (b.name, b.kind, b.model, str(b.url), b.priority) == (
        "primary",
        "llamacpp",
        "minilm",
        "http://127.0.0.1:8081/",
        0,
    )


def test_environment_overrides_file_with_nested_delimiter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDDING_GATEWAY_SERVER__PORT", "9123")
    monkeypatch.setenv("EMBEDDING_GATEWAY_SERVER__MAX_INPUTS", "7")
    s = load_settings(write(tmp_path, EXACT_SHAPE))
    assert s.server.port == 9123 and s.server.max_inputs == 7
    assert s.server.host == "127.0.0.1"  # untouched keys keep the file's values


def test_config_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.cli import _load

    monkeypatch.setenv("EMBEDDING_GATEWAY_CONFIG", str(write(tmp_path, EXACT_SHAPE)))
    assert _load(None).backends[0].name == "primary"


def test_builtin_jina_profiles() -> None:
    from config import BUILTIN_PROFILES

    small = BUILTIN_PROFILES["jina-embeddings-v5-text-small-text-matching"]
    assert small.dimension == 1024 and small.pooling == "last" and small.max_input_tokens == 32768
    assert small.allowed_dimensions == (32, 64, 128, 256, 512, 768, 1024)
    assert small.prompts == {"query": "Query: ", "document": "Document: "} and small.default_prompt_name == "document"
    nano = BUILTIN_PROFILES["jina-embeddings-v5-text-nano-text-matching"]
    assert nano.dimension == 768 and nano.allowed_dimensions[-1] == 768 and nano.max_input_tokens == 8192


def test_inline_fields_override_profile(tmp_path: Path) -> None:
    text = EXACT_SHAPE.replace(
        'profile = "all-minilm-l6-v2"  #',
        'profile = "all-minilm-l6-v2"\nmatryoshka_dimensions = [64, 128]\nprompts = { query = "q: " }\n#',
    )
    p = load_settings(write(tmp_path, text)).profile("minilm")
    assert p.allowed_dimensions == (64, 128, 384)
    assert p.prompts == {"query": "q: "} and p.default_prompt_name is None


def test_inline_profile_without_builtin(tmp_path: Path) -> None:
    text = EXACT_SHAPE.replace('profile = "all-minilm-l6-v2"', 'dimension = 8\npooling = "cls"\nmax_input_tokens = 16')
    assert load_settings(write(tmp_path, text)).profile("minilm").dimension == 8


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (('profile = "all-minilm-l6-v2"', 'profile = "nope"'), "models[0]: unknown profile 'nope'"),
        (('url = "http://127.0.0.1:8081"', 'url = "not a url"'), "backends[0].url"),
        (('model = "minilm"\nurl', 'model = "other"\nurl'), "serves model 'other'"),
        (('kind = "llamacpp"', 'kind = "carrier-pigeon"'), "backends[0]"),
        (("port = 8080", 'port = "eighty"'), "server.port"),
        (("priority = 0", "priority = 0\nbogus = 1"), "backends[0].bogus"),
        (('profile = "all-minilm-l6-v2"', 'profile = "all-minilm-l6-v2"\nmatryoshka_dimensions = [999]'), "matryoshka"),
        (
            ('profile = "all-minilm-l6-v2"', 'profile = "all-minilm-l6-v2"\ndefault_prompt_name = "query"'),
            "default_prompt_name",
        ),
    ],
)
def test_invalid_config_names_the_field(tmp_path: Path, change: tuple[str, str], needle: str) -> None:
    assert change[0] in EXACT_SHAPE
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, EXACT_SHAPE.replace(change[0], change[1], 1)))
    assert needle in str(info.value)


def test_secrets_are_never_rendered(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, EXACT_SHAPE.replace("priority = 0", 'priority = 0\napi_key = "hunter2-secret"')))
    assert s.backends[0].api_key is not None and s.backends[0].api_key.get_secret_value() == "hunter2-secret"
    assert "hunter2" not in repr(s) and "hunter2" not in s.model_dump_json()


def test_cli_invalid_config_exits_2_with_one_readable_message(tmp_path: Path) -> None:
    bad = write(tmp_path, EXACT_SHAPE.replace('url = "http://127.0.0.1:8081"', "url = 12"))
    r = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    assert "backends[0].url" in r.stderr and "Traceback" not in r.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(tmp_path / "nope.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def test_models_and_backends_must_cross_reference() -> None:
    with pytest.raises(Exception, match="have no \\[\\[backends\\]\\]"):
        GatewaySettings.model_validate(
            {
                "models": [{"name": "a", "profile": "all-minilm-l6-v2"}, {"name": "b", "profile": "all-minilm-l6-v2"}],
                "backends": [{"name": "x", "kind": "llamacpp", "model": "a", "url": "http://h"}],
            }
        )


def test_env_references_in_strings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = EXACT_SHAPE.replace("priority = 0", 'priority = 0\napi_key = "${TEST_KEY}"')
    monkeypatch.setenv("TEST_KEY", "s3cret")
    key = load_settings(write(tmp_path, text)).backends[0].api_key
    assert key is not None and key.get_secret_value() == "s3cret"
    monkeypatch.delenv("TEST_KEY")
    with pytest.raises(ConfigError, match=r"backends\[0\].api_key: environment variable TEST_KEY is not set"):
        load_settings(write(tmp_path, text))


@pytest.mark.parametrize(
    ("backend", "needle"),
    [
        ({"kind": "tei"}, "url"),
        ({"kind": "tei", "url": "http://t", "prompt_mode": "both"}, "prompt_mode"),
        ({"kind": "elastic", "inference_id": "x"}, "exactly one of `url` or `cloud_id`"),
        (
            {
                "kind": "elastic",
                "url": "http://e",
                "inference_id": "x",
                "api_key": "a",
                "username": "u",
                "password": "p",
            },
            "at most one",
        ),
        ({"kind": "elastic", "url": "http://e"}, "inference_id"),
        ({"kind": "openai"}, "url"),
        ({"kind": "tei", "url": "http://u:p@t", "api_key": "k"}, "`url` carries user:password"),
        ({"kind": "elastic", "url": "http://u:p@e", "inference_id": "x", "api_key": "a"}, "user:password in `url`"),
    ],
)
def test_backend_kinds_validate(tmp_path: Path, backend: dict[str, str], needle: str) -> None:
    import json

    table = "\n".join(f"{k} = {json.dumps(v)}" for k, v in {"name": "b", "model": "minilm", **backend}.items())
    text = EXACT_SHAPE.split("[[backends]]")[0] + "[[backends]]\n" + table + "\n"
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_settings(write(tmp_path, text))


def _jina(**model: object) -> dict[str, object]:
    return {
        "models": [{"name": "jina", "profile": "jina-embeddings-v5-text-small-text-matching", **model}],
        "backends": [{"name": "x", "kind": "tei", "model": "jina", "url": "http://h"}],
    }


def test_tasks_extend_the_profile_and_must_name_its_prompts() -> None:
    table = GatewaySettings.model_validate(_jina(tasks={"code.query": "query"})).profile("jina").task_table
    assert table["code.query"] == "query" and table["text-matching"] == "document"
    assert table["search_query"] == "query" and "separation" not in table
    with pytest.raises(Exception, match="name prompts the model does not have"):
        GatewaySettings.model_validate(_jina(tasks={"code.query": "code"}))


def test_aliases_name_a_prompt_and_never_shadow_a_model() -> None:
    with pytest.raises(Exception, match="alias 'jq': prompt 'q' is not one of the model's prompts"):
        GatewaySettings.model_validate(_jina(aliases=[{"name": "jq", "prompt": "q"}]))
    with pytest.raises(Exception, match="repeated: \\['jina'\\]"):
        GatewaySettings.model_validate(_jina(aliases=[{"name": "jina", "prompt": "query"}]))
    ok = GatewaySettings.model_validate(_jina(aliases=[{"name": "jina-query", "prompt": "query"}]))
    assert ok.models[0].aliases[0].prompt == "query"


def test_unknown_fields_setting() -> None:
    assert GatewaySettings.model_validate(_jina()).server.unknown_fields == "reject"
    with pytest.raises(Exception, match="unknown_fields"):
        GatewaySettings.model_validate({**_jina(), "server": {"unknown_fields": "warn"}})
