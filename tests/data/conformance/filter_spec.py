#!/usr/bin/env python3
# ruff: noqa
# fmt: off
# Vendored verbatim from ../shared/conformance (see README.md here); only these three lines were added.
"""Filter the OpenAI OpenAPI spec down to a few paths, pruning unreachable components.
usage: filter_spec.py IN.yaml OUT.yaml [/chat/completions /completions /models /models/{model}]
"""
import sys, json, yaml
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
import os
src, dst = sys.argv[1], sys.argv[2]
# PIN_MODELS=a,b : replace request-body `model` and /models/{model} path param with an enum of served ids,
# so generated requests reach real models instead of 404ing.
PIN = [m for m in os.environ.get("PIN_MODELS", "").split(",") if m]
keep = sys.argv[3:] or ["/chat/completions", "/completions", "/models", "/models/{model}"]
spec = yaml.load(open(src), Loader=Loader)
paths = {p: spec["paths"][p] for p in keep}
# keep only POST /chat/completions (drop GET list of stored completions), GET /models*, POST /completions
if "/chat/completions" in paths:
    paths["/chat/completions"] = {k: v for k, v in paths["/chat/completions"].items() if k in ("post", "parameters")}
if "/models/{model}" in paths:
    paths["/models/{model}"] = {k: v for k, v in paths["/models/{model}"].items() if k in ("get", "parameters")}
spec["paths"] = paths
# SSE: describe each event (OpenAPI 3.2 itemSchema style, which schemathesis 4.x validates):
# `data` is either the literal [DONE] or a JSON chunk matching the stream schema.
# Also fills a spec gap: POST /completions with stream=true returns SSE but only JSON is documented.
def sse(ref):
    return {"itemSchema": {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
        {"const": "[DONE]"},
        {"type": "string", "not": {"const": "[DONE]"}, "contentMediaType": "application/json",
         "contentSchema": {"$ref": ref}}]}}}}
# spec gap: no stream-chunk schema for legacy completions; real streams send finish_reason null
# until the last chunk (and choices=[] on the include_usage chunk), so derive a relaxed copy.
import copy
_cs = spec.get("components", {}).get("schemas", {})
if "CreateCompletionResponse" in _cs:
    chunk = copy.deepcopy(_cs["CreateCompletionResponse"])
    fr = chunk["properties"]["choices"]["items"]["properties"]["finish_reason"]
    chunk["properties"]["choices"]["items"]["properties"]["finish_reason"] = {"anyOf": [fr, {"type": "null"}]}
    _cs["CreateCompletionStreamChunk"] = chunk
for path, ref in (("/chat/completions", "#/components/schemas/CreateChatCompletionStreamResponse"),
                  ("/completions", "#/components/schemas/CreateCompletionStreamChunk")):
    try:
        paths[path]["post"]["responses"]["200"]["content"]["text/event-stream"] = sse(ref)
    except KeyError:
        pass
spec.pop("webhooks", None)
spec.pop("x-oaiMeta", None)
# prune components by $ref reachability
comps = spec.get("components", {})
def refs(o, out):
    if isinstance(o, dict):
        r = o.get("$ref")
        if isinstance(r, str) and r.startswith("#/components/"):
            out.add(tuple(r[len("#/components/"):].split("/", 1)))
        for v in o.values(): refs(v, out)
    elif isinstance(o, list):
        for v in o: refs(v, out)
seen, todo = set(), set()
refs(paths, todo)
refs(spec.get("security", []), todo)
while todo:
    k = todo.pop()
    if k in seen: continue
    seen.add(k)
    sec, name = k
    node = comps.get(sec, {}).get(name)
    if node is not None:
        refs(node, todo)
new = {}
for sec, name in seen:
    if name in comps.get(sec, {}):
        new.setdefault(sec, {})[name] = comps[sec][name]
new["securitySchemes"] = comps.get("securitySchemes", {})
spec["components"] = new
if PIN:
    pinned = {"type": "string", "enum": PIN}
    def pin(o, depth=0):
        if isinstance(o, dict):
            props = o.get("properties")
            if isinstance(props, dict) and "model" in props:
                props["model"] = {"type": "string", "enum": list(PIN)}
            for v in o.values(): pin(v)
        elif isinstance(o, list):
            for v in o: pin(v)
    for name in ("CreateChatCompletionRequest", "CreateCompletionRequest", "CreateModelResponseProperties"):
        if name in new.get("schemas", {}): pin(new["schemas"][name])
# FORCE_STREAM=1 : make `stream` always true in generated requests (so SSE chunks get schema-validated)
if os.environ.get("FORCE_STREAM") == "1":
    def force(o):
        if isinstance(o, dict):
            props = o.get("properties")
            if isinstance(props, dict) and "stream" in props:
                props["stream"] = {"type": "boolean", "enum": [True]}
                o["required"] = sorted(set(o.get("required", [])) | {"stream"})
            for v in o.values(): force(v)
        elif isinstance(o, list):
            for v in o: force(v)
    for name in ("CreateChatCompletionRequest", "CreateCompletionRequest"):
        if name in new.get("schemas", {}): force(new["schemas"][name])
    for prm in spec["paths"].get("/models/{model}", {}).get("get", {}).get("parameters", []):
        if prm.get("name") == "model": prm["schema"] = {"type": "string", "enum": list(PIN)}
with open(dst, "w") as f:
    yaml.dump(spec, f, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=10**6)
print(f"kept paths={list(paths)} components={sum(len(v) for v in new.values())}", file=sys.stderr)
