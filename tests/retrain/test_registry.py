"""The adapter registry: versions, transitions (allowed and refused), audit log, several processes."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from core.registry import Registry, RegistryConfig, RegistryError


def _reg(tmp_path: Path) -> Registry:
    return Registry(RegistryConfig(path=tmp_path / "reg" / "registry.duckdb", adapter_root=tmp_path / "adapters"))


def test_versions_transitions_and_audit(tmp_path: Path) -> None:
    reg = _reg(tmp_path)
    assert reg.next_version("support") == ("support-v1", 1)
    v1 = reg.register_candidate(
        "support",
        tmp_path / "adapters/support-v1",
        base_model="/m/tiny",
        data_watermark="2026-01-01T00:00:00+00:00",
        recipe_hash="abc",
        metrics={"em": 0.5},
    )
    assert (v1.version, v1.number, v1.status) == ("support-v1", 1, "candidate")
    assert reg.next_version("support") == ("support-v2", 2)
    assert reg.next_version("other") == ("other-v1", 1)
    reg.transition("support-v1", "canary", actor="ci", reason="gate passed", figures={"em": 0.5})
    champ = reg.transition("support-v1", "champion", actor="alice", reason="canary ok")
    assert champ.status == "champion" and reg.champion("support") == reg.get("support-v1")
    v2 = reg.register_candidate("support", "p2", base_model="/m/tiny", parent="support-v1")
    assert v2.parent == "support-v1" and v2.version == "support-v2"
    reg.transition("support-v2", "champion", actor="bob", reason="better")
    assert reg.get("support-v1").status == "retired"
    assert reg.champion("support").version == "support-v2"  # type: ignore[union-attr]
    assert [v.version for v in reg.list("support")] == ["support-v1", "support-v2"]
    assert [v.version for v in reg.list(status="retired")] == ["support-v1"]
    log = reg.audit("support")
    assert [(e["version"], e["from_status"], e["to_status"]) for e in log] == [
        ("support-v1", None, "candidate"),
        ("support-v1", "candidate", "canary"),
        ("support-v1", "canary", "champion"),
        ("support-v2", None, "candidate"),
        ("support-v1", "champion", "retired"),
        ("support-v2", "candidate", "champion"),
    ]
    assert log[1]["actor"] == "ci" and log[1]["reason"] == "gate passed" and log[1]["figures"] == {"em": 0.5}
    assert log[0]["figures"] == {"em": 0.5} and log[0]["at"] is not None


def test_refused_transitions(tmp_path: Path) -> None:
    reg = _reg(tmp_path)
    reg.register_candidate("a", "p", base_model="b")
    reg.transition("a-v1", "rejected", actor="gate", reason="slice regressed")
    before = reg.audit()
    for to in ("champion", "canary", "candidate", "retired"):
        with pytest.raises(RegistryError, match="not allowed"):
            reg.transition("a-v1", to, actor="x", reason="y")
    with pytest.raises(RegistryError, match="unknown status"):
        reg.transition("a-v1", "golden", actor="x", reason="y")
    with pytest.raises(RegistryError, match="unknown adapter version"):
        reg.transition("a-v9", "champion", actor="x", reason="y")
    with pytest.raises(RegistryError, match="actor"):
        reg.register_candidate("a", "p", base_model="b") and reg.transition("a-v2", "canary", actor="", reason="")
    with pytest.raises(RegistryError, match="next version"):
        reg.register_candidate("a", "p", base_model="b", version="a-v7")
    with pytest.raises(RegistryError, match="unknown adapter version"):
        reg.register_candidate("a", "p", base_model="b", parent="zzz-v1")
    with pytest.raises(RegistryError, match="invalid alias"):
        reg.next_version("../etc")
    assert reg.get("a-v1").status == "rejected"
    assert len(reg.audit()) == len(before) + 1  # only the a-v2 registration


def _register_many(path: str, n: int) -> None:
    reg = Registry(RegistryConfig(path=Path(path)))
    for _ in range(n):
        reg.register_candidate("multi", "p", base_model="b")


def test_several_processes(tmp_path: Path) -> None:
    path = tmp_path / "r.duckdb"
    Registry(RegistryConfig(path=path))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_register_many, args=(str(path), 5)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    reg = Registry(RegistryConfig(path=path))
    assert sorted(v.number for v in reg.list("multi")) == list(range(1, 16))
