"""retrain.run.publish: a gated adapter is validated and copied under the adapter root atomically, with the
settings' default (relative) root as with an absolute one."""

from __future__ import annotations

from pathlib import Path

import pytest

from retrain.run import RunFailed, publish


@pytest.mark.parametrize("relative", [True, False])
def test_publish_under_a_relative_or_absolute_root(
    tmp_path: Path, adapter_root: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, relative: bool
) -> None:
    monkeypatch.chdir(tmp_path)
    root = Path("adapters") if relative else tmp_path / "adapters"
    final = publish(adapter_root / "support-v1", root, "support-v7", base=str(tiny_model_dir), max_rank=16)
    assert final == (tmp_path / "adapters" / "support-v7") and (final / "adapter_config.json").is_file()
    assert [p.name for p in (tmp_path / "adapters").iterdir()] == ["support-v7"]  # no staging left behind
    with pytest.raises(RunFailed, match="already exists"):
        publish(adapter_root / "support-v1", root, "support-v7", base=str(tiny_model_dir), max_rank=16)
