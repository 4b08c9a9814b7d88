from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import ConfigError, ProxyConfig, load_config, reference_markdown


def test_defaults_need_no_file() -> None:
    cfg = load_config(environ={})
    assert cfg == ProxyConfig()
    assert cfg.server.port == 8080 and cfg.timeouts.read_s > 0


def test_yaml_env_and_overrides_layer(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("server:\n  port: 9000\n  host: 0.0.0.0\nbackends:\n  - url: http://a:8000\n")
    cfg = load_config(f, environ={"RIGHTSIZER_SERVER__PORT": "9100"},
                      overrides={"server": {"host": "127.0.0.1"}})  # fmt: skip
    assert cfg.server.port == 9100  # env over file
    assert cfg.server.host == "127.0.0.1"  # flag over env and file
    assert cfg.backends[0].name == "a:8000"


@pytest.mark.parametrize(
    ("yaml_text", "key", "reason"),
    [
        ("server:\n  prot: 1\n", "server.prot", "unknown key"),
        ("timeouts:\n  read_s: soon\n", "timeouts.read_s", "expected a number"),
        ("backends:\n  - name: x\n", "backends[0].url", "required key is missing"),
        ("backends:\n  - url: ftp://x\n", "backends[0].url", "not an http(s) URL"),
        ("backends:\n  - url: http://x\n    dialect: vllmm\n", "backends[0].dialect", "unknown dialect"),
        ("health:\n  interval_s: -1\n", "health.interval_s", "must not be negative"),
        ("server: 3\n", "server", "expected a mapping"),
        ("backends: http://x\n", "backends", "expected a list"),
        ("request_log:\n  log_prompts: 1\n", "request_log.log_prompts", "expected a boolean"),
    ],
    ids=["unknown-key", "wrong-type", "missing", "bad-url", "bad-dialect", "negative",
         "not-mapping", "not-list", "bool"],
)  # fmt: skip
def test_errors_name_file_key_and_reason(
    tmp_path: Path, yaml_text: str, key: str, reason: str
) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(f, environ={})
    assert info.value.key == key
    assert reason in info.value.reason
    assert str(f) in str(info.value)


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", environ={})
    f = tmp_path / "x.yaml"
    f.write_text("server: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f, environ={})


def test_shipped_example_config_loads() -> None:
    cfg = load_config(Path(__file__).parents[3] / "configs" / "proxy.yaml", environ={})
    assert cfg.backends, "the example names at least one backend"


def test_reference_covers_every_field() -> None:
    text = "\n".join(reference_markdown())
    for key in ("server.port", "timeouts.read_s", "backends[].url", "request_log.log_prompts"):
        assert f"`{key}`" in text


def test_readme_config_reference_is_current() -> None:
    readme = (Path(__file__).parents[3] / "README.md").read_text()
    missing = [line for line in reference_markdown() if line not in readme]
    assert not missing, "regenerate the README's config reference:\n" + "\n".join(missing)
