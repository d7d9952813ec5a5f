"""Every bench command written down (docs/*.md, README.md, the Makefile, the bench scripts' docstrings) runs
as written, with tiny sizes, and prints its result, so a documented command cannot break silently (issue 14).

The commands are read from those texts, so a newly documented one is run too; one whose script has no entry
in BENCHES fails and says so. Those that need a real vLLM share one tiny-model server (`integration`), handed
to them with `--vllm-url`: a vLLM start costs about a minute here, one per command would cost several.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"


def sources() -> list[Path]:
    return [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md", REPO / "Makefile", *sorted(BENCH.glob("*.py"))]


# `python bench/X.py …` or `python -m bench.X …` in backticks (up to the closing one, which may be on the next
# line), or starting a line (the Makefile's recipes, indented docstring lines: to the end of the line)
TICKED = re.compile(r"`python (bench/[a-z_]\w*\.py|-m bench\.[a-z_]\w*)([^`]{0,400})`")
LINE = re.compile(r"^[ \t]*python (bench/[a-z_]\w*\.py|-m bench\.[a-z_]\w*)(.*)$", re.MULTILINE)
PLACEHOLDER = re.compile(r"[A-Z][A-Z_]*")


@dataclass
class Command:
    target: str  # `bench/X.py` or `-m bench.X`, as documented
    args: tuple[str, ...]  # outside [...]: given as written (placeholders such as PORT filled in)
    optional: set[str] = field(default_factory=set)  # the --flags inside [...]: each must exist
    where: set[str] = field(default_factory=set)

    @property
    def script(self) -> str:
        return self.target.removeprefix("-m bench.").removeprefix("bench/").removesuffix(".py")

    @property
    def text(self) -> str:
        return " ".join(["python", self.target, *self.args])


def split_synopsis(rest: str) -> tuple[tuple[str, ...], set[str]]:
    """`--a x [--b [--c 1]] PORT` -> (("--a", "x", "PORT"), {"--b", "--c"})."""
    given: list[str] = []
    optional: list[str] = []
    depth = 0
    for ch in rest:
        depth += ch == "["
        (optional if depth or ch == "]" else given).append(ch)
        depth -= ch == "]"
    return tuple("".join(given).split()), set(re.findall(r"--[\w-]+", "".join(optional)))


def documented_commands() -> list[Command]:
    found: dict[tuple[str, tuple[str, ...]], Command] = {}
    for path in sources():
        text = path.read_text()
        for match in [*TICKED.finditer(text), *LINE.finditer(text)]:
            args, optional = split_synopsis(match[2])
            cmd = found.setdefault((match[1], args), Command(match[1], args))
            cmd.optional |= optional
            cmd.where.add(f"{path.relative_to(REPO)}:{text.count(chr(10), 0, match.start()) + 1}")
    return sorted(found.values(), key=lambda c: c.text)


@dataclass(frozen=True)
class Bench:
    tiny: tuple[str, ...] = ()  # flags that make it finish in seconds ({tiny}: the session's tiny model)
    result: str = ""  # what its result line looks like (a regex); "" for a server, which is probed instead
    vllm: tuple[str, ...] = ()  # flags that point it at the shared vLLM server ({vllm}): integration


# the tiny model is built once for the session: each bench building its own imports torch and transformers
MODEL = ("--model", "{tiny}")


# fmt: off
BENCHES = {
    "serving_load": Bench(
        ("--concurrency", "2", "--blocks", "1", "--requests-per-slot", "1", "--min-requests", "2",
         "--max-tokens", "4", "--step-ms", "5", *MODEL),
        r"(?m)^\s+2 gateway\s+\d+\.\d{3} \(",
        vllm=("--vllm-url", "{vllm}"),
    ),
    "gateway_cpu": Bench(("--concurrency", "4", "--requests", "16", "--tokens", "16", "--step-ms", "1", "--rounds", "1",
                          *MODEL), r"gateway / stand-in upstream CPU: \d+\.\d+x"),
    "gateway_overhead": Bench(("--requests", "10", "--chunks", "100", "--streams", "2", *MODEL),
                              r"per request .* ms \(TTFT.*\n.*per streamed chunk \(100-chunk stream\): .* us"),
    # the gateway part (--gateway-requests) is bench/store_gateway.py, run on its own below
    "store": Bench(("--events", "20000", "--ingest", "2000", "--repeat", "1", "--gateway-requests", "0"),
                   r"ratio \d+\.\d+x best(?s:.*)report over 20,000 events: .* ratio \d+\.\d+x of the budget"),
    "store_gateway": Bench(("--requests", "2", *MODEL), r"logging on, durable vs off: median .* ms over 2 interleaved",
                           vllm=("--vllm-url", "{vllm}")),
    "adapters": Bench(("--switches", "2", "--rounds", "1", "--concurrency", "2", *MODEL),
                      r"repoint -> first request(?s:.*)ratio \d+\.\d+", vllm=("--vllm-url", "{vllm}")),
    "adapter_memory": Bench(("--cycles", "3", *MODEL), r"USS .* KiB/cycle", vllm=("--vllm-url", "{vllm}")),
    "adapter_check": Bench(("--repeats", "5", "--rank", "16", *MODEL), r"rank 16 / rank 1: check \d+\.\d+"),
    "rollback": Bench(("--rounds", "1", *MODEL), r"rollback / repoint ratio \d+\.\d+", vllm=("--vllm-url", "{vllm}")),
    "train": Bench(("--rows", "16", "--batch", "8", "--repeats", "1", *MODEL), r"recipe \(TRL\) .* ratio +\d+\.\d+x"),
    "standin_vllm": Bench(), "emulated_engine": Bench(), "hop_proxy": Bench(), "tcp_relay": Bench(),
}
# fmt: on


def needs_vllm(cmd: Command) -> bool:
    # serving_load's emulated engine stands in for vLLM
    return bool(BENCHES.get(cmd.script, Bench()).vllm) and "emulated" not in cmd.args


def params() -> list[object]:
    return [
        pytest.param(cmd, id=cmd.text, marks=[pytest.mark.integration] if needs_vllm(cmd) else [])
        for cmd in documented_commands()
    ]


def argv(cmd: Command, *extra: str) -> list[str]:
    target = cmd.target.split() if cmd.target.startswith("-m ") else [cmd.target]
    return [sys.executable, *target, *extra]


def command_env() -> dict[str, str]:
    # as from a shell: nothing on PYTHONPATH, so a script that cannot find the repository's packages fails here
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_docs_document_bench_commands() -> None:
    """The collector still finds what is written (a changed notation must not make the test vacuous)."""
    found = {cmd.text for cmd in documented_commands()}
    assert {"python bench/serving_load.py", "python bench/store.py", "python -m bench.train"} <= found, found


def test_no_bench_module_is_named_like_an_importable_package() -> None:
    """`python bench/X.py` puts bench/ first on sys.path: bench/serving.py once hid the `serving` package."""
    names = {p.stem for p in BENCH.glob("*.py")}
    repo_packages = {p.parent.name for p in REPO.glob("*/__init__.py")}
    importable = repo_packages | set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    assert not names & importable, f"rename these bench modules: {sorted(names & importable)}"
    assert "bench" not in importable - repo_packages, "an installed `bench` would be run by `python -m bench.X`"


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCH.glob("*.py") if "__main__" in p.read_text()))
def test_every_bench_script_starts_both_ways_and_has_its_documented_flags(script: str) -> None:
    """`python bench/X.py --help` and `python -m bench.X --help` both work, and every flag the docs show for
    the script (bracketed ones too) is one it accepts."""
    forms = [[sys.executable, f"bench/{script}.py", "--help"], [sys.executable, "-m", f"bench.{script}", "--help"]]

    def run(args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, cwd=REPO, env=command_env(), capture_output=True, text=True, timeout=180)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, forms))
    for args, res in zip(forms, results, strict=True):
        assert res.returncode == 0 and "usage:" in res.stdout, f"{' '.join(args[1:])}:\n{res.stdout}{res.stderr}"
    usage = results[0].stdout.split("\n\n")[0]  # not the description below it: that is the docstring itself
    accepted = set(re.findall(r"--[\w-]+", usage))
    for cmd in documented_commands():
        if cmd.script == script:
            flags = cmd.optional | {a for a in cmd.args if a.startswith("--")}
            assert flags <= accepted, f"{cmd.text} ({', '.join(sorted(cmd.where))}): no {sorted(flags - accepted)}"


@pytest.fixture(scope="module")
def bench_vllm(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One vLLM CPU server (tiny model, LoRA on, 4 adapters per batch) for every command that needs one."""
    from core.serving_config import ManagedBackendConfig
    from serving.managed import vllm_command, vllm_env

    cfg = ManagedBackendConfig(port=free_port(), max_model_len=512, max_loras=4)
    log = tmp_path_factory.mktemp("bench-vllm") / "vllm.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(vllm_command(str(tiny_model_dir), "base", cfg, "cpu"), env=vllm_env(cfg, "cpu"),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{cfg.port}"
    try:
        deadline = time.monotonic() + 600
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the bench vLLM did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def unload_adapters(url: str) -> None:
    """What a bench left loaded on the shared vLLM goes: the next bench may load its own adapter under the
    same name (alpha, ...), from another directory, which vLLM would take as already loaded."""
    for model in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]:
        if model.get("parent"):  # a LoRA adapter, not the base
            httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": model["id"]}, timeout=60)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("cmd", params())
def test_documented_bench_command_runs(cmd: Command, request: pytest.FixtureRequest) -> None:
    where = ", ".join(sorted(cmd.where))
    assert (BENCH / f"{cmd.script}.py").is_file(), f"{cmd.text} ({where}): no bench/{cmd.script}.py"
    bench = BENCHES.get(cmd.script)
    assert bench is not None, f"{cmd.text} ({where}): add tiny flags and its result line to BENCHES"
    if not bench.result:
        probe_server(cmd, where, request)
        return
    extra = [*bench.tiny, *(bench.vllm if needs_vllm(cmd) else ())]
    values = {}
    if any("{tiny}" in flag for flag in extra):
        values["tiny"] = str(request.getfixturevalue("tiny_model_dir"))
    if needs_vllm(cmd):
        values["vllm"] = request.getfixturevalue("bench_vllm")
        request.addfinalizer(lambda: unload_adapters(values["vllm"]))
    args = argv(cmd, *cmd.args, *(flag.format(**values) for flag in extra))
    timeout = 420 if needs_vllm(cmd) else 240
    started = time.monotonic()
    try:
        res = subprocess.run(args, cwd=REPO, env=command_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        out = e.output.decode(errors="replace") if isinstance(e.output, bytes) else e.output or ""
        pytest.fail(f"{' '.join(args[1:])} ({where}) took over {timeout} s:\n{out[-3000:]}")
    print(f"{' '.join(args[1:])}: {time.monotonic() - started:.1f} s")  # its own time, without fixtures (-s)
    assert res.returncode == 0, f"{' '.join(args[1:])} ({where}) exited {res.returncode}:\n{res.stdout[-3000:]}"
    assert re.search(bench.result, res.stdout), f"{' '.join(args[1:])}: no result line /{bench.result}/:\n{res.stdout}"


@pytest.fixture(scope="module")
def standin_upstream() -> Iterator[str]:
    """A stand-in vLLM for the proxies to forward to."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.standin_vllm", str(port), "0"], cwd=REPO)
    try:
        wait_listening(port, proc, "the stand-in upstream")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def probe_server(cmd: Command, where: str, request: pytest.FixtureRequest) -> None:
    """A server (its command takes a PORT): started as documented, it must stream a completion, then stop."""
    port = free_port()
    values = {"PORT": str(port), "SERVED_MODEL": "base", "UPSTREAM_HOST": "127.0.0.1"}
    if any(a.startswith("UPSTREAM") for a in cmd.args):
        upstream = request.getfixturevalue("standin_upstream")
        values |= {"UPSTREAM_URL": upstream, "UPSTREAM_PORT": upstream.rsplit(":", 1)[1]}
    args = []
    for a in cmd.args:
        if PLACEHOLDER.fullmatch(a):
            assert a in values, f"{cmd.text} ({where}): no value for {a}: add one to probe_server"
            a = values[a]
        args.append(a)
    assert "PORT" in cmd.args, f"{cmd.text} ({where}): no result regex in BENCHES, and not a server (no PORT)"
    proc = subprocess.Popen(argv(cmd, *args), cwd=REPO, env=command_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        wait_listening(port, proc, cmd.text)
        body = {"model": "base", "prompt": "x", "max_tokens": 3, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30) as resp:
            lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
        assert resp.status_code == 200 and len(lines) == 4 and lines[-1] == "data: [DONE]", lines
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    # uvicorn stops cleanly on SIGTERM; the bare uvloop relay dies of it: either is a clean stop
    assert proc.returncode in (0, -signal.SIGTERM), f"{cmd.text} ({where}) exited {proc.returncode}:\n{out}"


def wait_listening(port: int, proc: subprocess.Popen[str] | subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 90
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                out = proc.communicate(timeout=30)[0] or ""
                out = out.decode(errors="replace") if isinstance(out, bytes) else out
                pytest.fail(f"{what} did not start (exit {proc.returncode}):\n{out}")
            time.sleep(0.2)
