"""`loraloop config check|show` and the global `--config` option, through the CLI's main: problems one line each
with exit 2, nothing created, effective values with their sources and secrets masked."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from core.errors import ExitCode
from deploy.cli import build_parser, main


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in ("LORALOOP_API_KEY", "LORALOOP_ADMIN_KEY", "LORALOOP_PORT", "LORALOOP_MODEL"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def write(path: Path, data: dict[str, object]) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_check_passes_a_valid_config_and_creates_nothing(
    workdir: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(workdir / "ok.yaml", {"model": str(tiny_model_dir), "port": 8123})
    assert main(["config", "check", config]) == ExitCode.OK
    out = capsys.readouterr().out
    assert out.startswith("settings OK (") and str(workdir / ".loraloop" / "registry.duckdb") in out
    assert main(["registry", "list", "--config", config]) == ExitCode.OK  # a read: nothing created either
    assert sorted(p.name for p in workdir.iterdir()) == ["ok.yaml"]


def test_check_names_every_problem_on_its_own_line(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "adapters" / "a1").mkdir(parents=True)
    recipe = write(workdir / "recipe.yaml", {"model": {"base": "x"}, "train": {"method": "nope"}})
    config = write(workdir / "bad.yaml", {
        "model": "./nowhere", "adapters": {"a1": {"path": "a1"}}, "aliases": {"support": {"adapter": "a1"}},
        "cycle": {"aliases": {"support": {"recipe": recipe}, "other": {"recipe": "absent.yaml"}}},
    })  # fmt: skip
    assert main(["--config", config, "config", "check"]) == ExitCode.USAGE
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines == [
        "error: model: unknown model './nowhere': not a preset (tiny, smollm2), an existing directory or a hub id "
        "(org/name)",
        f"error: adapters.a1.path: {workdir / 'adapters' / 'a1'} has no adapter_config.json",
        "error: cycle.aliases.other: is not an alias in `aliases`",
        "error: cycle.aliases.other.recipe: cannot read recipe absent.yaml: [Errno 2] No such file or directory: "
        "'absent.yaml'",
        f"error: cycle.aliases.support.recipe: recipe {recipe}: train.method: Input should be 'sft' or 'dpo' "
        "(1 error(s))",
        "error: admin_key: the nightly cycle needs the admin key (LORALOOP_ADMIN_KEY)",
    ]
    assert captured.err == f"loraloop: error: 6 problem(s) in the settings ({config})\n"
    # validation errors: each on its own line too
    invalid = write(workdir / "invalid.yaml", {"port": 0, "keepalive_s": -1, "log_level": "loud"})
    assert main(["config", "check", invalid]) == ExitCode.USAGE
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[1].strip() for line in out] == ["port", "keepalive_s", "log_level"], out
    assert sorted(p.name for p in workdir.iterdir()) == ["adapters", "bad.yaml", "invalid.yaml", "recipe.yaml"]


def test_show_gives_values_sources_and_masks_secrets(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(workdir / "s.yaml", {"model": "tiny", "store": {"export_lag_s": 60}})
    monkeypatch.setenv("LORALOOP_PORT", "8124")
    monkeypatch.setenv("LORALOOP_ADMIN_KEY", "a-real-admin-secret-1")
    assert main(["config", "show", config, "--json"]) == ExitCode.OK
    rows = {r["key"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["model"] == {"key": "model", "value": "tiny", "source": "file"}
    assert rows["store.export_lag_s"]["value"] == 60 and rows["store.export_lag_s"]["source"] == "file"
    assert rows["port"] == {"key": "port", "value": 8124, "source": "env LORALOOP_PORT"}
    assert rows["admin_key"]["value"] == "**********" and rows["admin_key"]["source"] == "env LORALOOP_ADMIN_KEY"
    assert rows["host"]["source"] == "default" and rows["store.root"]["value"] == ".loraloop/events"
    assert main(["config", "show", config]) == ExitCode.OK
    text = capsys.readouterr().out
    assert "a-real-admin-secret-1" not in text and "(env LORALOOP_PORT)" in text


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    found = {path: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_commands(sub, (*path, name)))
    return found


def test_every_subcommand_takes_and_lists_the_global_options(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    commands = _commands(build_parser())
    assert ("events", "status") in commands and ("experiments", "create") in commands and len(commands) > 20
    for path, parser in commands.items():
        assert "--config FILE" in parser.format_help(), path
    config = write(workdir / "s.yaml", {"store": {"root": str(workdir / "elsewhere")}})
    for argv in (["--config", config, "events", "status"], ["events", "status", "--config", config],
                 ["events", "--config", config, "status"]):  # fmt: skip
        assert main(argv) == ExitCode.OK, argv
        assert json.loads(capsys.readouterr().out)["root"] == str(workdir / "elsewhere")


def test_check_warns_when_the_cycle_would_start_runs_that_skip(
    workdir: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORALOOP_ADMIN_KEY", "adm-config-check-key")
    recipe = write(workdir / "r.yaml", {"model": {"base": str(tiny_model_dir)}, "data": {"prepare": {"min_rows": 40}}})
    cycle = {"aliases": {"support": {"recipe": recipe, "min_new_rows": 30}}}
    config = write(workdir / "c.yaml", {"model": str(tiny_model_dir), "aliases": {"support": {}}, "cycle": cycle})
    assert main(["config", "check", config]) == ExitCode.OK  # a warning does not fail the check
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        "warning: cycle.aliases.support.min_new_rows: 30 < 50 (the recipe's min_rows 40 over its train share): "
        "quiet nights will start runs that then skip"
    )
    assert out[1].startswith("settings OK")
