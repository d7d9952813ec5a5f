"""The structure docs/architecture.md describes: one error base with the CLI's exit codes in one place, the
documented exit-code table, and the import contracts (layers, the request path, no cycles)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import ExitCode, LoraloopError
from deploy.cli import main
from tests.conftest import REPO

PACKAGES = ("core", "feedback", "serving", "retrain", "deploy")


def _modules() -> list[str]:
    names = []
    for pkg in PACKAGES:
        module = importlib.import_module(pkg)
        names += [pkg, *(info.name for info in pkgutil.walk_packages(module.__path__, f"{pkg}."))]
    return [n for n in names if not n.endswith("__main__")]


def test_every_public_error_derives_from_the_one_base() -> None:
    found = {}
    for name in _modules():
        for cls_name, cls in inspect.getmembers(importlib.import_module(name), inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == name and not cls_name.startswith("_"):
                found[f"{name}.{cls_name}"] = cls
    assert len(found) >= 15, sorted(found)  # the walk really saw the packages' errors
    strays = sorted(n for n, cls in found.items() if not issubclass(cls, LoraloopError))
    assert strays == [], f"errors outside core.errors.LoraloopError: {strays}"


def test_documented_exit_codes_are_the_enum() -> None:
    doc = (REPO / "docs" / "architecture.md").read_text()
    table = doc[doc.index("| exit code | meaning |") :]
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", table, flags=re.M)}
    assert documented == {int(code) for code in ExitCode}


def test_cli_exits_with_the_errors_code_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORALOOP_PORT", "9")  # nothing listens on the discard port
    # a refused input (unknown version): usage, 2 -- before any gateway is called
    monkeypatch.setenv("LORALOOP_ADMIN_KEY", "adm-architecture-key")
    assert main(["canary", "start", "nope-v1"]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert err == "loraloop: error: unknown adapter version 'nope-v1'\n"
    # a gateway that does not answer: a failure, 1
    assert main(["rollback", "support"]) == ExitCode.FAILED
    err = capsys.readouterr().err
    assert err.startswith("loraloop: error: cannot reach the gateway at http://127.0.0.1:9") and err.count("\n") == 1


def test_import_contracts_hold_and_can_break(tmp_path: Path) -> None:
    lint = str(Path(sys.executable).parent / "lint-imports")
    kept = subprocess.run([lint], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert kept.returncode == 0, kept.stdout[-3000:]
    assert "3 kept, 0 broken" in kept.stdout
    # the same contracts on a copy of the tree where the gateway imports the controller: broken
    copy = tmp_path / "tree"
    for name in (*PACKAGES, "pyproject.toml"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, copy / name)
    bad = copy / "serving" / "routes.py"
    bad.write_text(bad.read_text() + "\nfrom deploy.controller import decide  # noqa\n")
    broken = subprocess.run([lint], cwd=copy, capture_output=True, text=True, timeout=300,
                            env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(copy)})  # fmt: skip
    assert broken.returncode != 0 and "serving.routes -> deploy.controller" in broken.stdout, broken.stdout[-3000:]
