"""docs/api.md against the app: every endpoint of the OpenAPI document has its section and nothing else does,
every request-body field is listed, every JSON body example (the page's and the OpenAPI document's) validates
against the schema, and the curl and Python examples run against a real gateway and vLLM."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from core.settings import Settings
from serving.app import build_app
from tests.conftest import ADMIN_KEY, API_KEY, REPO, LiveGateway, free_port, start_gateway

DOC = (REPO / "docs" / "api.md").read_text()
HEADING = re.compile(r"^### (GET|POST|PUT|PATCH|DELETE) (/\S*)$", re.M)


def openapi() -> dict[str, Any]:
    settings = Settings(model="tiny", backends={"mode": "remote", "urls": ["http://127.0.0.1:9"]},
                        admin_key="adm-api-docs-key", replica_id="docs")  # fmt: skip
    spec: dict[str, Any] = build_app(settings).openapi()
    return spec


def sections() -> dict[tuple[str, str], str]:
    """(method, path) -> the section's text, up to the next heading."""
    out = {}
    for m in HEADING.finditer(DOC):
        following = re.compile(r"^##+ ", re.M).search(DOC, m.end())
        out[(m.group(1), m.group(2))] = DOC[m.end() : following.start() if following else len(DOC)]
    return out


def request_schema(spec: dict[str, Any], method: str, path: str) -> dict[str, Any] | None:
    body = spec["paths"][path][method.lower()].get("requestBody")
    if body is None:
        return None
    schema: dict[str, Any] = body["content"]["application/json"]["schema"]
    return {**schema, "components": spec["components"]}  # `#/components/...` references resolve in place


def test_every_endpoint_has_its_section_and_no_more() -> None:
    spec = openapi()
    served = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    assert set(sections()) == served


def test_every_body_field_is_listed_and_every_example_validates() -> None:
    spec = openapi()
    checked = 0
    for (method, path), text in sections().items():
        schema = request_schema(spec, method, path)
        if schema is None:
            continue
        props = schema.get("properties") or spec["components"]["schemas"][schema["$ref"].split("/")[-1]]["properties"]
        if path.startswith("/v1/") and "completions" in path:
            continue  # OpenAI's own bodies: the page points at OpenAI's reference rather than listing them
        table = text[text.index("| field | type | required | meaning |") :].split("\n\n")[0]
        listed = set(re.findall(r"^\| `(\w+)` \|", table, flags=re.M))
        assert listed == set(props), (method, path, set(props) ^ listed)
        examples = re.findall(r"Body:\n\n```json\n(.*?)\n```", text, flags=re.S)
        assert examples, (method, path)
        for example in examples:
            jsonschema.validate(json.loads(example), schema)
            checked += 1
    assert checked == 6
    for name in ("FeedbackIn", "RegisterAdapter", "PointAlias", "CreateExperiment", "UpdateExperiment"):
        component = spec["components"]["schemas"][name]
        assert component["examples"], name
        for example in component["examples"]:
            jsonschema.validate(example, {**component, "components": spec["components"]})


def test_a_broken_example_is_caught() -> None:
    spec = openapi()
    schema = request_schema(spec, "POST", "/v1/feedback")
    assert schema is not None
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"request_id": "r", "kind": "stars"}, schema)


# ------------------------------------------------------------------------------------- the examples, run

#: The order the examples run in: a story (the page is ordered as a reference).
RUN_ORDER = [
    ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/responses"), ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"), ("POST", "/v1/feedback"), ("GET", "/health"), ("GET", "/metrics"),
    ("POST", "/admin/adapters"), ("GET", "/admin/adapters"), ("PUT", "/admin/aliases/{alias}"),
    ("GET", "/admin/aliases"), ("POST", "/admin/experiments"), ("GET", "/admin/experiments"),
    ("PATCH", "/admin/experiments/{experiment_id}"), ("GET", "/admin/experiments/{experiment_id}/report"),
    ("POST", "/admin/experiments/{experiment_id}/stop"), ("DELETE", "/admin/adapters/{name}"),
]  # fmt: skip


@pytest.fixture
def docs_gateway(live_gateway: LiveGateway, tiny_model_dir: Path, label_adapters: Path, tmp_path: Path) -> Any:
    """A gateway with the page's aliases (`default`, `support`) and adapter root (`support-v3`), in front of the
    session's vLLM."""
    root = tmp_path / "adapters"
    shutil.copytree(label_adapters / "alpha", root / "support-v3")
    vllm = f"http://127.0.0.1:{live_gateway.settings.backends.managed.port}"
    settings = Settings(
        model=str(tiny_model_dir), port=free_port(), api_key=API_KEY, admin_key=ADMIN_KEY, replica_id="docs",
        backends={"mode": "remote", "urls": [vllm], "health_interval_s": 1.0}, adapter_root=str(root),
        state_dir=str(tmp_path / "state"), store={"root": str(tmp_path / "events"), "flush_interval_s": 0.02},
        aliases={"default": {"defaults": {"max_tokens": 8}}, "support": {}}, registry_path=str(tmp_path / "r.duckdb"),
    )  # fmt: skip
    gateway = start_gateway(settings, None)
    yield gateway
    gateway.stop()


@pytest.mark.integration
def test_the_curl_and_python_examples_run(docs_gateway: LiveGateway) -> None:
    found = sections()
    env = {**os.environ, "LORALOOP_URL": docs_gateway.url, "LORALOOP_API_KEY": API_KEY,
           "LORALOOP_ADMIN_KEY": ADMIN_KEY}  # fmt: skip
    assert set(RUN_ORDER) == set(found)
    ran = 0
    for key in RUN_ORDER:
        for block in re.findall(r"```bash\n(.*?)\n```", found[key], flags=re.S):
            command = block.replace("curl -s ", "curl -sS --fail-with-body ")
            proc = subprocess.run(["bash", "-euo", "pipefail", "-c", command], env=env, capture_output=True, text=True,
                                  timeout=120)  # fmt: skip
            assert proc.returncode == 0, (key, command, proc.stdout[-500:], proc.stderr[-500:])
            assert proc.stdout.strip(), (key, command)
            ran += 1
    assert ran == len(RUN_ORDER)
    python = "\n".join(re.findall(r"```python\n(.*?)\n```", DOC, flags=re.S))
    python = python.replace("http://127.0.0.1:8000", docs_gateway.url).replace('"sk-..."', repr(API_KEY))
    proc = subprocess.run([sys.executable, "-c", python], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    answer_id, adapter = proc.stdout.split()[:2]
    assert answer_id.startswith("chatcmpl-") and adapter == "base"
