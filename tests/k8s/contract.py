"""What the Kubernetes manifests may rely on before the code has it, in one place.

Each entry is something another part of loraloop is adding now; once it exists, the checks test the
real thing (a pending name that has landed is checked like any other) and the entry can go.
"""

from __future__ import annotations

#: `loraloop` subcommands the manifests run that the CLI does not have yet.
FUTURE_SUBCOMMANDS: frozenset[str] = frozenset()  # every subcommand the manifests run exists now

#: Top-level settings keys that config.yaml may use before serving/settings.py declares them, each with
#: the pydantic model ("module.Class") that validates its section meanwhile. (`store` has landed.)
PENDING_SETTINGS: dict[str, str] = {}

#: `loraloop_*` series the dashboard and the alerts use before any registry defines them.
PENDING_METRICS: frozenset[str] = frozenset()  # the registry/cycle metrics come from serving.registry_metrics now

#: vLLM's own series the dashboard and the alerts use (checked against vLLM's source when installed).
VLLM_METRICS = frozenset(
    {
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds",
        "vllm:generation_tokens",
    }
)

#: Series of Prometheus itself and of kube-state-metrics the alerts use.
OTHER_METRICS = frozenset({"up", "kube_cronjob_status_last_successful_time"})

#: The overlays, and the device whose flags (serving/managed.py) their vLLM servers use.
OVERLAY_DEVICE = {"gpu": "cuda", "cpu": "cpu"}

#: Kubernetes releases the manifests are validated against: the oldest supported and the newest whose
#: schemas kubernetes-validate 1.37 bundles.
K8S_VERSIONS = ("1.30.0", "1.37.0")

#: The Secret every pod takes its keys from; it is created by hand (docs/kubernetes.md), never in git.
SECRET_NAME = "loraloop-keys"
SECRET_KEYS = frozenset({"LORALOOP_API_KEY", "LORALOOP_ADMIN_KEY", "LORALOOP_BACKENDS__API_KEY"})

#: Image name (last path component) -> the Dockerfile that builds it; vllm/vllm-openai is upstream's.
IMAGES = {
    "gateway": "docker/gateway.Dockerfile",
    "trainer": "docker/trainer.Dockerfile",
    "vllm-cpu": "docker/vllm-cpu.Dockerfile",
}
UPSTREAM_VLLM_IMAGE = "vllm/vllm-openai"
