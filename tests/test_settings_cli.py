"""Settings validation (one-line errors), the generated config docs, and the CLI's error handling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core.config_docs import render
from core.errors import ConfigError
from core.settings import load_settings
from deploy.cli import main

REPO = Path(__file__).resolve().parent.parent


def test_yaml_then_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: 9001\nbackends:\n  mode: remote\n  urls: ['http://vllm-a:8000/']\naliases:\n  x: {}\n")
    monkeypatch.setenv("LORALOOP_PORT", "9002")
    monkeypatch.setenv("LORALOOP_API_KEY", "a-long-random-key")
    monkeypatch.setenv("LORALOOP_BACKENDS__HEALTH_INTERVAL_S", "0.5")
    s = load_settings(cfg)
    assert s.port == 9002 and s.backends.urls == ["http://vllm-a:8000"]
    assert s.backends.health_interval_s == 0.5 and s.backends.mode == "remote"
    assert s.api_key is not None and s.api_key.get_secret_value() == "a-long-random-key"
    assert list(s.aliases) == ["x"]


@pytest.mark.parametrize(
    ("yaml_text", "env", "fragment"),
    [
        ("backends: {mode: remote}\n", {}, "backends: Value error, mode is 'remote' but no back-end urls"),
        ("prot: 1\n", {}, "prot: Extra inputs are not permitted"),
        ("aliases: {a: {adapter: nope}}\n", {}, "names adapter 'nope', which is not in adapters"),
        ("port: 0\n", {}, "port: Input should be greater than or equal to 1"),
        ("{}\n", {"LORALOOP_API_KEY": "changeme"}, "api_key: refusing a default or short secret"),
        ("{}\n", {"LORALOOP_ADMIN_KEY": "short"}, "admin_key: refusing a default or short secret"),
        ("aliases: {a: {defaults: {temperature: 9}}}\n", {}, "aliases.a.defaults.temperature"),
        ("backends: {urls: ['vllm:8000']}\n", {}, "must start with http:// or https://"),
        (": : :\n", {}, "cannot read settings"),
    ],
)
def test_bad_settings_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, yaml_text: str, env: dict[str, str], fragment: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert fragment.replace("Value error, ", "") in message


def test_missing_config_file_and_same_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.yaml")
    monkeypatch.setenv("LORALOOP_API_KEY", "same-key-for-both")
    monkeypatch.setenv("LORALOOP_ADMIN_KEY", "same-key-for-both")
    with pytest.raises(ConfigError, match="must differ"):
        load_settings()


def test_config_docs_are_current() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text()
    assert doc.strip() == render().strip(), "run: python -m core.config_docs > docs/configuration.md"


def test_recipe_docs_are_current_and_every_field_is_described() -> None:
    from retrain.recipe_docs import render as render_recipes

    doc = (REPO / "docs" / "recipes.md").read_text()
    assert doc.strip() == render_recipes().strip(), "run: python -m retrain.recipe_docs > docs/recipes.md"
    for text in (doc, render()):
        rows = [line for line in text.splitlines() if line.startswith("| `")]
        assert len(rows) > 40 and all(not line.rstrip().endswith("|  |") for line in rows)


def test_cli_reports_bad_config_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("backends: {mode: remote}\n")
    assert main(["--config", str(cfg), "serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loraloop: error: invalid settings:") and "\n" not in err


def test_cli_init_model_tiny(tmp_path: Path) -> None:
    dst = tmp_path / "tiny"
    run = subprocess.run([sys.executable, "-m", "deploy.cli", "init-model", str(dst), "--preset", "tiny"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (dst / "config.json").is_file() and (dst / "model.safetensors").is_file()
    again = subprocess.run([sys.executable, "-m", "deploy.cli", "init-model", str(dst)], capture_output=True, text=True)
    assert again.returncode == 2 and "not empty" in again.stderr and len(again.stderr.strip().splitlines()) == 1


def test_readme_settings_example_is_valid(tmp_path: Path) -> None:
    import re

    block = re.search(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert block is not None
    cfg = tmp_path / "readme.yaml"
    cfg.write_text(block.group(1))
    settings = load_settings(cfg)
    assert settings.aliases["support"].adapter == "support-v3"
