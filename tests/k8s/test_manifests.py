"""The kustomize overlays render offline, validate strictly against Kubernetes' schemas, and use the
ports, paths, settings keys, commands and vLLM flags that the code uses."""

from __future__ import annotations

import asyncio
import copy
import importlib
import os
import re
import secrets
import shlex
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from core.serving_config import ManagedBackendConfig
from core.settings import Settings, load_settings
from serving.managed import vllm_command, vllm_env
from tests.k8s import contract
from tests.k8s.manifests import (
    K8S,
    OVERLAYS,
    REPO,
    Obj,
    all_containers,
    config_map,
    container,
    env_of,
    find,
    mounts,
    one,
    pod_labels,
    pod_spec,
    render,
    selector_matches,
    workloads,
)

try:
    import kubernetes_validate
except ImportError:  # a dev dependency: fail the validation tests loudly rather than skip them
    kubernetes_validate = None

CRD_GROUPS = ("monitoring.coreos.com/",)
CONFIG_PATH = "/etc/loraloop/config.yaml"


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def objs(overlay: str) -> tuple[Obj, ...]:
    return render(f"overlays/{overlay}")


# --- settings as the pods see them ---------------------------------------------------------------


def config_yaml(objs: tuple[Obj, ...]) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(config_map(objs, "loraloop-config")["data"]["config.yaml"])
    return data


def pod_env(objs: tuple[Obj, ...], w: Obj, c: Obj, secret_values: dict[str, str]) -> dict[str, str]:
    """The container's environment with ConfigMap, Secret and pod-name references resolved."""
    out = {}
    for name, e in env_of(c).items():
        if "value" in e:
            out[name] = str(e["value"])
            continue
        ref = e["valueFrom"]
        if "configMapKeyRef" in ref:
            cm = one(objs, "ConfigMap", ref["configMapKeyRef"]["name"])
            out[name] = cm["data"][ref["configMapKeyRef"]["key"]]
        elif "secretKeyRef" in ref:
            assert ref["secretKeyRef"]["name"] == contract.SECRET_NAME
            out[name] = secret_values[ref["secretKeyRef"]["key"]]
        elif ref.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            out[name] = f"{w['metadata']['name']}-0"
    return out


def loadable_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """config.yaml without the pending keys the settings do not declare yet (each validated by the model
    that owns its section today)."""
    cfg = dict(cfg)
    for key, model_path in contract.PENDING_SETTINGS.items():
        if key in cfg and key not in Settings.model_fields:
            module, _, cls = model_path.rpartition(".")
            getattr(importlib.import_module(module), cls).model_validate(cfg.pop(key))
    return cfg


def pod_settings(
    objs: tuple[Obj, ...],
    workload: Obj,
    container_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    **overrides: Any,
) -> Settings:
    """The settings `loraloop --config ...` builds inside that container."""
    c = container(workload, container_name)
    args = [*c.get("command", []), *c.get("args", [])]
    assert args[args.index("--config") + 1] == CONFIG_PATH
    secret_values = {key: f"{key.lower()}-{secrets.token_hex(16)}" for key in contract.SECRET_KEYS}
    for name in list(os.environ):
        if name.startswith("LORALOOP_"):
            monkeypatch.delenv(name)
    for name, value in pod_env(objs, workload, c, secret_values).items():
        if name.startswith("LORALOOP_"):
            monkeypatch.setenv(name, value)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(loadable_config(config_yaml(objs))))
    return load_settings(path, **overrides)


# --- rendering and schema validation -------------------------------------------------------------


EXPECTED_KINDS = {
    ("Namespace", "loraloop"),
    ("ConfigMap", "loraloop-config"),
    ("ConfigMap", "loraloop-grafana-dashboard"),
    ("Service", "loraloop-gateway"),
    ("Service", "loraloop-gateway-peers"),
    ("Service", "loraloop-vllm"),
    ("PersistentVolumeClaim", "loraloop-models"),
    ("PersistentVolumeClaim", "loraloop-adapters"),
    ("PersistentVolumeClaim", "loraloop-events"),
    ("PersistentVolumeClaim", "loraloop-cycle-state"),
    ("StatefulSet", "loraloop-gateway"),
    ("StatefulSet", "loraloop-vllm"),
    ("CronJob", "loraloop-cycle"),
    ("Job", "loraloop-model-init"),
    ("PodDisruptionBudget", "loraloop-gateway"),
    ("PodDisruptionBudget", "loraloop-vllm"),
    ("NetworkPolicy", "loraloop-vllm"),
    ("ServiceMonitor", "loraloop-gateway"),
    ("ServiceMonitor", "loraloop-vllm"),
    ("PrometheusRule", "loraloop"),
}


def test_overlay_renders_everything_in_one_namespace(objs: tuple[Obj, ...]) -> None:
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    generated = {(k, n) for k, n in names if k == "ConfigMap" and n.startswith("loraloop-config-")}
    assert names - generated == EXPECTED_KINDS - {("ConfigMap", "loraloop-config")}
    assert len(generated) == 1
    for o in objs:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == "loraloop", f"{o['kind']}/{o['metadata']['name']}"


def test_base_renders() -> None:
    assert find(render("base"), "StatefulSet", "loraloop-gateway")


def validator() -> Any:
    if kubernetes_validate is None:
        pytest.fail("kubernetes-validate is not installed: pip install kubernetes-validate")
    return kubernetes_validate


@pytest.mark.parametrize("k8s_version", contract.K8S_VERSIONS)
def test_overlay_validates_strictly(objs: tuple[Obj, ...], k8s_version: str) -> None:
    kubernetes_validate = validator()
    checked = 0
    for o in objs:
        if o["apiVersion"].startswith(CRD_GROUPS):
            continue  # not in the validator's schemas: test_custom_resources_are_well_formed
        kubernetes_validate.validate(o, k8s_version, strict=True)
        checked += 1
    assert checked >= 16


def test_the_validator_is_strict() -> None:
    kubernetes_validate = validator()
    sts = copy.deepcopy(one(render("overlays/gpu"), "StatefulSet", "loraloop-gateway"))
    sts["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, contract.K8S_VERSIONS[0], strict=True)


# The fields of the Prometheus Operator's CRDs (monitoring.coreos.com/v1) that these manifests may use.
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _LABELS},
    "additionalProperties": False,
}
_DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h|d|w|y))+$"}
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "properties": {"matchLabels": _LABELS},
                    "additionalProperties": False,
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                        },
                    },
                },
            },
        },
    },
}
_RULE = {
    "type": "object",
    "required": ["alert", "expr"],
    "additionalProperties": False,
    "properties": {
        "alert": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
        "expr": {"type": "string"},
        "for": _DURATION,
        "labels": _LABELS,
        "annotations": _LABELS,
    },
}
PROMETHEUS_RULE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {"name": {"type": "string"}, "rules": {"type": "array", "items": _RULE}},
                    },
                }
            },
        },
    },
}


def test_custom_resources_are_well_formed(objs: tuple[Obj, ...]) -> None:
    schemas = {"ServiceMonitor": SERVICE_MONITOR, "PrometheusRule": PROMETHEUS_RULE}
    crs = [o for o in objs if o["apiVersion"].startswith(CRD_GROUPS)]
    assert {o["kind"] for o in crs} == set(schemas)
    for o in crs:
        jsonschema.validate(o, schemas[o["kind"]])


# --- settings, secrets and the keys they use -----------------------------------------------------


def documented_settings() -> tuple[set[str], set[str]]:
    """Top-level keys and LORALOOP_* variables listed in docs/configuration.md."""
    text = (REPO / "docs" / "configuration.md").read_text()
    keys = set(re.findall(r"^\| `([a-z_]+)` \|", text, re.MULTILINE))
    env = set(re.findall(r"`(LORALOOP_[A-Z0-9_<>]+)`", text))
    return keys, env


def test_config_keys_are_documented(objs: tuple[Obj, ...]) -> None:
    keys, env = documented_settings()
    unknown = set(config_yaml(objs)) - keys - set(contract.PENDING_SETTINGS)
    assert not unknown, f"config.yaml uses keys docs/configuration.md does not list: {unknown}"
    for w in workloads(objs):
        for c in all_containers(w):
            for name in env_of(c):
                if name.startswith("LORALOOP_"):
                    assert name in env, f"{w['metadata']['name']}/{c['name']}: {name} is not a documented variable"


@pytest.mark.parametrize(
    "workload", [("StatefulSet", "loraloop-gateway", "gateway"), ("CronJob", "loraloop-cycle", "cycle")]
)
def test_pods_settings_load(
    objs: tuple[Obj, ...], workload: tuple[str, str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kind, name, container_name = workload
    w = one(objs, kind, name)
    s = pod_settings(objs, w, container_name, tmp_path, monkeypatch)
    assert s.backends.mode == "remote"
    assert s.host == "0.0.0.0"
    assert s.api_key is not None and s.admin_key is not None and s.backends.api_key is not None
    assert not s.health_require_key, "the kubelet probes /health without a key"
    assert not s.metrics_require_key, "Prometheus and the liveness probe read /metrics without a key"
    if kind == "StatefulSet":  # each replica writes the event store under its stable pod name
        ref = env_of(container(w, container_name))["LORALOOP_REPLICA_ID"]["valueFrom"]["fieldRef"]
        assert ref["fieldPath"] == "metadata.name" and s.replica_id == f"{name}-0"
    else:  # never the writer id of a gateway replica
        assert not s.replica_id.startswith("loraloop-gateway")


def test_default_looking_keys_are_refused(
    objs: tuple[Obj, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Secret's placeholder in docs/kubernetes.md would not start a gateway."""
    from core.errors import ConfigError

    sts = one(objs, "StatefulSet", "loraloop-gateway")
    with pytest.raises(ConfigError, match="api_key"):
        pod_settings(objs, sts, "gateway", tmp_path, monkeypatch, api_key="changeme")


def test_no_secret_in_git(objs: tuple[Obj, ...]) -> None:
    assert not find(objs, "Secret"), "secrets are created by hand (docs/kubernetes.md), never committed"
    used = set()
    for w in workloads(objs):
        for c in all_containers(w):
            for name, e in env_of(c).items():
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == contract.SECRET_NAME
                    used.add(ref["key"])
                elif "KEY" in name and "value" in e:
                    raise AssertionError(f"{name} has a literal value in {w['metadata']['name']}")
    assert used == contract.SECRET_KEYS
    doc = (REPO / "docs" / "kubernetes.md").read_text()
    command = doc[doc.index(f"kubectl -n loraloop create secret generic {contract.SECRET_NAME}") :]
    command = command[: command.index("```")]
    for key in contract.SECRET_KEYS:
        assert f"--from-literal={key}=" in command, f"docs/kubernetes.md's secret command lacks {key}"


# --- wiring: ports, URLs, paths, volumes ---------------------------------------------------------


def container_port(c: Obj, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    return int(ports[name])


def arg_value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_gateway_ports(objs: tuple[Obj, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sts = one(objs, "StatefulSet", "loraloop-gateway")
    s = pod_settings(objs, sts, "gateway", tmp_path, monkeypatch)
    assert container_port(container(sts, "gateway"), "http") == s.port
    for svc_name in ("loraloop-gateway", "loraloop-gateway-peers"):
        (port,) = one(objs, "Service", svc_name)["spec"]["ports"]
        assert port["targetPort"] == "http" and port["port"] == s.port


def replica_urls(objs: tuple[Obj, ...], sts_name: str) -> list[str]:
    """One URL per pod of a StatefulSet, by its stable DNS name under the governing headless Service."""
    sts = one(objs, "StatefulSet", sts_name)
    svc = one(objs, "Service", sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None", f"{svc['metadata']['name']} must be headless"
    assert svc["spec"].get("publishNotReadyAddresses") is True
    (port,) = svc["spec"]["ports"]
    assert selector_matches(svc["spec"]["selector"], pod_labels(sts))
    name, host = sts["metadata"]["name"], svc["metadata"]["name"]
    return [f"http://{name}-{i}.{host}:{port['port']}" for i in range(sts["spec"]["replicas"])]


def test_gateway_balances_over_every_vllm_replica(
    objs: tuple[Obj, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = pod_settings(objs, one(objs, "StatefulSet", "loraloop-gateway"), "gateway", tmp_path, monkeypatch)
    assert s.backends.urls == replica_urls(objs, "loraloop-vllm")
    vllm = one(objs, "StatefulSet", "loraloop-vllm")
    c = container(vllm, "vllm")
    port = container_port(c, "http")
    assert int(arg_value(c["args"], "--port")) == port
    assert {u.rsplit(":", 1)[1] for u in s.backends.urls} == {str(port)}


def test_gateway_urls_name_every_gateway_replica(objs: tuple[Obj, ...]) -> None:
    urls = yaml.safe_load(config_map(objs, "loraloop-config")["data"]["gateway-urls"])
    assert urls == replica_urls(objs, "loraloop-gateway")


def pvc_mount(objs: tuple[Obj, ...], w: Obj, container_name: str, path: Path, claim: str, *, read_only: bool) -> None:
    m = mounts(w, container_name)
    where = f"{w['metadata']['name']}/{container_name}"
    assert str(path) in m, f"{where} does not mount {path}"
    mount, volume = m[str(path)]
    assert volume.get("persistentVolumeClaim", {}).get("claimName") == claim, f"{where}: {path} is not PVC {claim}"
    assert bool(mount.get("readOnly")) == read_only, f"{where}: {path} readOnly should be {read_only}"
    pvc = one(objs, "PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], f"{claim} is mounted by many pods"


def test_shared_stores_are_mounted_where_the_settings_point(
    objs: tuple[Obj, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = one(objs, "StatefulSet", "loraloop-gateway")
    cycle = one(objs, "CronJob", "loraloop-cycle")
    vllm = one(objs, "StatefulSet", "loraloop-vllm")
    s = pod_settings(objs, gateway, "gateway", tmp_path, monkeypatch)
    store_root = Path(config_yaml(objs)["store"]["root"])
    model = Path(s.model)
    assert model.is_absolute() and model.parent != Path("/"), "the model lives in a directory on PVC loraloop-models"

    pvc_mount(objs, gateway, "gateway", s.adapter_root, "loraloop-adapters", read_only=True)
    pvc_mount(objs, gateway, "gateway", store_root, "loraloop-events", read_only=False)
    pvc_mount(objs, gateway, "gateway", model.parent, "loraloop-models", read_only=True)
    _, state_volume = mounts(gateway, "gateway")[str(s.state_dir)]
    assert "claimTemplate" in state_volume, "each gateway replica keeps its state_dir on a volume of its own"

    pvc_mount(objs, cycle, "cycle", s.adapter_root, "loraloop-adapters", read_only=False)
    pvc_mount(objs, cycle, "cycle", store_root, "loraloop-events", read_only=False)
    pvc_mount(objs, cycle, "cycle", model.parent, "loraloop-models", read_only=True)
    # the registry and the cycle's status live on the shared cycle-state volume: written by the job, read
    # by every gateway replica for the loraloop_champion_* / loraloop_cycle_* metrics
    pvc_mount(objs, cycle, "cycle", s.cycle.state_dir, "loraloop-cycle-state", read_only=False)
    pvc_mount(objs, gateway, "gateway", s.cycle.state_dir, "loraloop-cycle-state", read_only=False)
    assert s.registry_path.parent == s.cycle.state_dir
    assert container(cycle, "cycle")["workingDir"] == str(s.cycle.state_dir), "relative default paths must persist"

    # vLLM loads adapters by the absolute path the gateway sends: the same mount path.
    pvc_mount(objs, vllm, "vllm", s.adapter_root, "loraloop-adapters", read_only=True)
    pvc_mount(objs, vllm, "vllm", model.parent, "loraloop-models", read_only=True)
    _, shm = mounts(vllm, "vllm")["/dev/shm"]
    assert shm["emptyDir"]["medium"] == "Memory"

    model_init = one(objs, "Job", "loraloop-model-init")
    pvc_mount(objs, model_init, "model-init", model.parent, "loraloop-models", read_only=False)

    # the config file the pods are started with is the ConfigMap's config.yaml
    for w, name in ((gateway, "gateway"), (cycle, "cycle")):
        _, volume = mounts(w, name)[str(Path(CONFIG_PATH).parent)]
        assert volume["configMap"]["name"] == config_map(objs, "loraloop-config")["metadata"]["name"]
        assert volume["configMap"]["items"] == [{"key": "config.yaml", "path": Path(CONFIG_PATH).name}]


def test_pods_wait_for_the_configured_model(
    objs: tuple[Obj, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = pod_settings(objs, one(objs, "StatefulSet", "loraloop-gateway"), "gateway", tmp_path, monkeypatch)
    for name in ("loraloop-gateway", "loraloop-vllm"):
        (init,) = pod_spec(one(objs, "StatefulSet", name))["initContainers"]
        assert f"[ -f {s.model}/config.json ]" in init["command"][-1]
    script = container(one(objs, "Job", "loraloop-model-init"), "model-init")["command"][-1]
    assert f"test -f {s.model}/config.json ||" in script


# --- commands ------------------------------------------------------------------------------------


def loraloop_argv(c: Obj) -> list[str]:
    """The arguments after `loraloop` (directly, or inside an `sh -c` script)."""
    argv = [*c.get("command", []), *c.get("args", [])]
    if argv[:2] == ["sh", "-c"]:
        script = argv[2].split("||")[-1]
        argv = shlex.split(script)
    assert argv[0] == "loraloop", argv
    return argv[1:]


def subcommands() -> set[str]:
    from deploy.cli import build_parser

    parser = build_parser()
    (action,) = [a for a in parser._actions if a.dest == "command"]
    return set(action.choices)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "where",
    [
        ("StatefulSet", "loraloop-gateway", "gateway"),
        ("CronJob", "loraloop-cycle", "cycle"),
        ("Job", "loraloop-model-init", "model-init"),
    ],
)
def test_loraloop_commands_parse(objs: tuple[Obj, ...], where: tuple[str, str, str]) -> None:
    from deploy.cli import build_parser

    kind, name, container_name = where
    argv = loraloop_argv(container(one(objs, kind, name), container_name))
    sub = next(a for a in argv if not a.startswith("-") and a != CONFIG_PATH)
    if sub not in subcommands():
        assert sub in contract.FUTURE_SUBCOMMANDS, f"`loraloop {sub}` does not exist and is not declared future"
        return
    args = build_parser().parse_args(argv)
    assert args.command == sub


def test_gateway_runs_serve(objs: tuple[Obj, ...]) -> None:
    from deploy.cli import build_parser, cmd_serve

    argv = loraloop_argv(container(one(objs, "StatefulSet", "loraloop-gateway"), "gateway"))
    assert build_parser().parse_args(argv).func is cmd_serve


# --- vLLM ------------------------------------------------------------------------------------------


def test_vllm_runs_managed_flags(
    overlay: str, objs: tuple[Obj, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The vLLM servers get exactly the command line and environment serving/managed.py gives a
    managed back-end on that device, for the gateway's model, served name and rank."""
    device = contract.OVERLAY_DEVICE[overlay]
    s = pod_settings(objs, one(objs, "StatefulSet", "loraloop-gateway"), "gateway", tmp_path, monkeypatch)
    c = container(one(objs, "StatefulSet", "loraloop-vllm"), "vllm")
    command, args = c["command"], c["args"]
    env = {k: e["value"] for k, e in env_of(c).items() if "value" in e}

    # the knobs an operator sizes; everything else must be what managed.py derives
    tunables: dict[str, Any] = {"max_loras": int(arg_value(args, "--max-loras"))}
    if "--max-model-len" in args:
        tunables["max_model_len"] = int(arg_value(args, "--max-model-len"))
    if device == "cpu":
        tunables["cpu_kvcache_gib"] = int(env["VLLM_CPU_KVCACHE_SPACE"])
    cfg = ManagedBackendConfig(host="0.0.0.0", port=container_port(c, "http"), **tunables)
    expected = vllm_command(s.model, s.backends.served_model_name, cfg, device, s.max_lora_rank)
    assert command[0] in ("python", "python3")
    assert [*command[1:], *args] == expected[1:]

    for name in list(os.environ):
        if name.startswith("VLLM_"):
            monkeypatch.delenv(name)
    expected_env = {k: v for k, v in vllm_env(cfg, device, s.backends.keepalive_s).items() if k not in os.environ}
    assert expected_env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert {k: env.get(k) for k in expected_env} == expected_env
    assert "--enable-lora" in args and arg_value(args, "--served-model-name") == s.backends.served_model_name


def gpus(c: Obj) -> str | None:
    return c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")


def test_gpus_only_in_the_gpu_overlay(overlay: str, objs: tuple[Obj, ...]) -> None:
    vllm = container(one(objs, "StatefulSet", "loraloop-vllm"), "vllm")
    cycle = container(one(objs, "CronJob", "loraloop-cycle"), "cycle")
    gateway = container(one(objs, "StatefulSet", "loraloop-gateway"), "gateway")
    if overlay == "gpu":
        assert gpus(vllm) == "1" and gpus(cycle) == "1"
        assert vllm["resources"]["requests"]["nvidia.com/gpu"] == "1"
    else:
        assert gpus(vllm) is None and gpus(cycle) is None
        assert env_of(vllm)["VLLM_TARGET_DEVICE"]["value"] == "cpu"
    assert gpus(gateway) is None


# --- probes, routes, services --------------------------------------------------------------------


def gateway_routes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, objs: tuple[Obj, ...]) -> set[str]:
    from serving.app import build_app

    sts = one(objs, "StatefulSet", "loraloop-gateway")
    s = pod_settings(
        objs, sts, "gateway", tmp_path, monkeypatch, state_dir=str(tmp_path / "state"), store={"root": str(tmp_path)}
    )
    app = build_app(s)  # remote mode: nothing starts; the base's config.json is not here (a warning)
    asyncio.run(app.state.pool.client.aclose())
    return {getattr(r, "path", "") for r in app.routes}


def http_probes(c: Obj) -> dict[str, str]:
    return {
        kind: c[kind]["httpGet"]["path"]
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
        if "httpGet" in c.get(kind, {})
    }


def test_gateway_probes_hit_real_routes(objs: tuple[Obj, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = container(one(objs, "StatefulSet", "loraloop-gateway"), "gateway")
    probes = http_probes(c)
    assert probes["readinessProbe"] == "/health"
    # /health is 503 while vLLM is down: a liveness probe on it would restart every gateway then
    assert probes["livenessProbe"] != "/health" and probes["startupProbe"] != "/health"
    routes = gateway_routes(tmp_path, monkeypatch, objs)
    assert set(probes.values()) <= routes
    for sm in find(objs, "ServiceMonitor", "loraloop-gateway"):
        assert {e["path"] for e in sm["spec"]["endpoints"]} <= routes


def test_vllm_probes(objs: tuple[Obj, ...]) -> None:
    c = container(one(objs, "StatefulSet", "loraloop-vllm"), "vllm")
    assert http_probes(c) == {"startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/health"}
    # the start-up allowance covers a managed back-end's startup_timeout_s
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= ManagedBackendConfig().startup_timeout_s
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[kind]["httpGet"]["port"] == "http"


def test_services_and_monitors_select_one_workload(objs: tuple[Obj, ...]) -> None:
    services = find(objs, "Service")
    for svc in services:
        matched = [w for w in workloads(objs) if selector_matches(svc["spec"]["selector"], pod_labels(w))]
        assert len(matched) == 1, f"Service {svc['metadata']['name']} selects {len(matched)} workloads"
        port_names = {p["name"] for c in pod_spec(matched[0])["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
    for sm in find(objs, "ServiceMonitor"):
        selected = [
            s for s in services if selector_matches(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert len(selected) == 1, f"ServiceMonitor {sm['metadata']['name']} selects {len(selected)} Services"
        assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in selected[0]["spec"]["ports"]}
    for pdb in find(objs, "PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"]
        assert len([w for w in workloads(objs) if selector_matches(sel, pod_labels(w))]) == 1


def test_vllm_only_reachable_from_loraloop(objs: tuple[Obj, ...]) -> None:
    policy = one(objs, "NetworkPolicy", "loraloop-vllm")
    vllm = one(objs, "StatefulSet", "loraloop-vllm")
    assert selector_matches(policy["spec"]["podSelector"]["matchLabels"], pod_labels(vllm))
    (rule,) = policy["spec"]["ingress"]
    allowed = next(p["podSelector"]["matchExpressions"][0]["values"] for p in rule["from"] if "podSelector" in p)
    for name, kind in (("loraloop-gateway", "StatefulSet"), ("loraloop-cycle", "CronJob")):
        assert pod_labels(one(objs, kind, name))["app.kubernetes.io/component"] in allowed


# --- pods: security, resources, the nightly job --------------------------------------------------


def dockerfile_uid() -> int:
    text = (REPO / "docker" / "gateway.Dockerfile").read_text()
    (user,) = re.findall(r"^USER (\d+)", text, re.MULTILINE)
    return int(user)


def test_pods_run_unprivileged(objs: tuple[Obj, ...]) -> None:
    uid = dockerfile_uid()
    for w in workloads(objs):
        where = f"{w['kind']}/{w['metadata']['name']}"
        sc = pod_spec(w)["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == uid and sc["fsGroup"] == uid, where
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
        for c in all_containers(w):
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False, f"{where}/{c['name']}"
            assert csc["capabilities"] == {"drop": ["ALL"]}, f"{where}/{c['name']}"
            assert "privileged" not in csc and "runAsUser" not in csc
            limits, requests = c["resources"]["limits"], c["resources"]["requests"]
            assert "memory" in limits and "memory" in requests and "cpu" in requests, f"{where}/{c['name']}"
    # read-only root file systems where nothing JIT-compiles
    for c in all_containers(one(objs, "StatefulSet", "loraloop-gateway")):
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
    for name in ("loraloop-vllm",):
        for c in pod_spec(one(objs, "StatefulSet", name))["initContainers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert container(one(objs, "Job", "loraloop-model-init"), "model-init")["securityContext"]["readOnlyRootFilesystem"]


def test_cycle_cronjob(objs: tuple[Obj, ...]) -> None:
    cron = one(objs, "CronJob", "loraloop-cycle")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["timeZone"]
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    # the job must end well before the stalled-cycle alert (26 h) could blame a hanging run
    assert job["activeDeadlineSeconds"] < 26 * 3600
    gateway_env = env_of(container(one(objs, "StatefulSet", "loraloop-gateway"), "gateway"))
    cycle_env = env_of(container(cron, "cycle"))
    for name, e in gateway_env.items():
        if name.startswith("LORALOOP_") and name != "LORALOOP_REPLICA_ID":
            assert cycle_env.get(name) == e, f"the cycle job gets {name} like the gateway"


# --- images ---------------------------------------------------------------------------------------


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_images_are_built_here_or_pinned_upstream(overlay: str, objs: tuple[Obj, ...]) -> None:
    from packaging.requirements import Requirement

    extras = pyproject()["project"]["optional-dependencies"]
    (cpu_pin,) = [Requirement(r) for r in extras["cpu"] if r.startswith("vllm-cpu")]
    (gpu_req,) = [Requirement(r) for r in extras["gpu"] if Requirement(r).name == "vllm"]
    cpu_version = next(iter(cpu_pin.specifier)).version
    images = {c["image"] for w in workloads(objs) for c in all_containers(w)}
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", f"{image}: pin a tag"
        if name == contract.UPSTREAM_VLLM_IMAGE:
            version = tag.removeprefix("v")
            assert overlay == "gpu"
            assert gpu_req.specifier.contains(version), f"{image} is outside the gpu extra's {gpu_req}"
            assert version == cpu_version, f"{image}: the CPU build tested here is vllm-cpu {cpu_version}"
            trainer = (REPO / contract.IMAGES["trainer"]).read_text()
            assert f"ARG VLLM_VERSION={version}" in trainer, "the trainer's vLLM must match the serving image"
            continue
        short = name.rsplit("/", 1)[-1]
        assert short in contract.IMAGES, f"{image}: no Dockerfile builds it"
        assert (REPO / contract.IMAGES[short]).is_file()


def test_overlay_directories_are_listed() -> None:
    assert sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir()) == sorted(OVERLAYS)
    assert set(OVERLAYS) == set(contract.OVERLAY_DEVICE)


def test_documented_commands_parse() -> None:
    """Every `loraloop ...` command in docs/kubernetes.md's code blocks is accepted by the CLI."""
    from deploy.cli import build_parser

    doc = (REPO / "docs" / "kubernetes.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", doc, re.DOTALL)
    commands = [
        "--config " + line.split("loraloop --config ", 1)[1]
        for block in blocks
        for line in block.replace("\\\n", " ").splitlines()
        if re.search(r"(^|\s)loraloop --config", line)
    ]
    assert len(commands) >= 2
    for command in commands:
        argv = shlex.split(command.split(";")[0])
        assert build_parser().parse_args(argv).command == "adapters"
