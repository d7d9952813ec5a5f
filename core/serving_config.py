"""The gateway's settings slices: aliases, adapters and the vLLM back-ends (`aliases:`, `adapters:` and
`backends:` of the one Settings object, core/settings.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator


def http_urls(urls: list[str], what: str) -> list[str]:
    """``urls`` without trailing slashes; ValueError naming ``what`` for one that is not http(s)."""
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{what} {url!r} must start with http:// or https://")
    return [u.rstrip("/") for u in urls]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingDefaults(_Strict):
    """Default sampling parameters of an alias; a request's own values win."""

    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Sampling temperature.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_tokens: int | None = Field(None, ge=1, description="Completion length limit in tokens.")


class FewShotExample(_Strict):
    """One worked example put before the user's messages (chat) or prompt (completions)."""

    user: str = Field(description="The example's user turn.")
    assistant: str = Field(description="The answer the model should imitate.")


class AliasConfig(_Strict):
    """What a client-visible model name (alias) maps to."""

    adapter: str | None = Field(
        None, description="Name of a LoRA adapter from `adapters` that serves this alias; null = the base."
    )
    system_prompt: str | None = Field(
        None, description="System message put first unless the request brings its own system message."
    )
    few_shot: list[FewShotExample] = Field(
        default_factory=list, description="Examples inserted between the system prompt and the request."
    )
    defaults: SamplingDefaults = Field(
        default_factory=lambda: SamplingDefaults(), description="Sampling defaults a request may override."
    )
    log_text: bool = Field(True, description="Store prompt and completion text in the event store (privacy switch).")


class AdapterConfig(_Strict):
    """A LoRA adapter loaded into every back-end at start-up (and whenever a back-end (re)joins)."""

    path: Path = Field(description="Directory with adapter_config.json and adapter_model.safetensors.")


#: Chat templates shipped with the gateway (serving/templates), by the name `tool_calling.chat_template` takes.
BUILTIN_CHAT_TEMPLATES = ("smollm2-tools",)


class ToolCallingConfig(_Strict):
    """Tool calling on the managed vLLM: its tool-call parser and the chat template that renders tools."""

    parser: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="vLLM --tool-call-parser; setting it turns tool calling on (with --enable-auto-tool-choice). "
        "`pythonic` for SmolLM2 with the `smollm2-tools` template (calls as `[f(a=1)]`, no special tokens); "
        "`hermes`, `llama3_json`, ... for models trained on those formats. Unset: no tool calling.",
    )
    chat_template: str | None = Field(
        None,
        description="vLLM --chat-template: `smollm2-tools` (shipped: SmolLM2's ChatML with tools in the system "
        "turn and past calls in the pythonic form) or the path of a Jinja file. Unset: the model's own template.",
    )
    compact_json: bool = Field(
        True,
        description="JSON that vLLM constrains (the arguments under a named or `required` tool choice, "
        "`response_format`) is written without whitespace between its tokens (vLLM --structured-outputs-config "
        "disable_any_whitespace, which vLLM takes only with a named backend: xgrammar, so a schema xgrammar cannot "
        "compile is refused instead of going to guidance). Small models otherwise tend to fill the arguments with "
        "whitespace until `max_tokens`.",
    )

    @field_validator("chat_template")
    @classmethod
    def _template_exists(cls, value: str | None) -> str | None:
        if value is not None and value not in BUILTIN_CHAT_TEMPLATES and not Path(value).expanduser().is_file():
            names = ", ".join(BUILTIN_CHAT_TEMPLATES)
            raise ValueError(f"chat_template {value!r} is neither a shipped template ({names}) nor a file")
        return value

    @model_validator(mode="after")
    def _template_needs_parser(self) -> ToolCallingConfig:
        if self.chat_template is not None and self.parser is None:
            raise ValueError("chat_template is set but parser is not: set both (a parser turns tool calling on)")
        return self


class ManagedBackendConfig(_Strict):
    """How `loraloop serve` starts its own vLLM server when `backends.mode` is `managed`."""

    host: str = Field("127.0.0.1", description="Interface the child vLLM server binds to.")
    port: int = Field(8100, ge=1, le=65535, description="Port of the child vLLM server.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="`auto` picks cuda when torch sees a GPU, else the CPU build's flags."
    )
    dtype: str | None = Field(None, description="vLLM --dtype; default float32 on CPU, auto on GPU.")
    gpu_memory_utilization: float | None = Field(
        None, gt=0.0, le=1.0, description="vLLM --gpu-memory-utilization; default 0.3 on CPU, 0.9 on GPU."
    )
    max_model_len: int | None = Field(None, ge=16, description="vLLM --max-model-len (context length).")
    max_loras: int = Field(4, ge=1, description="vLLM --max-loras: adapters active in one batch.")
    cpu_kvcache_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU, in GiB.")
    tool_calling: ToolCallingConfig = Field(
        default_factory=lambda: ToolCallingConfig(), description="Tool calling (OpenAI `tools`); off by default."
    )
    extra_args: list[str] = Field(default_factory=list, description="More vLLM command-line arguments.")
    startup_timeout_s: float = Field(900.0, gt=0, description="How long to wait for vLLM's /health.")
    restart_backoff_s: float = Field(2.0, ge=0, description="Pause before restarting a dead vLLM.")
    stop_timeout_s: float = Field(20.0, gt=0, description="Grace after SIGTERM before SIGKILL.")

    @model_validator(mode="after")
    def _tool_calling_set_once(self) -> ManagedBackendConfig:
        flags = {"--enable-auto-tool-choice", "--tool-call-parser", "--chat-template"}
        if self.tool_calling.compact_json:
            flags.add("--structured-outputs-config")
        twice = sorted(flags.intersection(a.split("=")[0].split(".")[0] for a in self.extra_args))
        if self.tool_calling.parser is not None and twice:
            raise ValueError(f"extra_args repeat what tool_calling sets ({', '.join(twice)}): keep one of them")
        return self


class BackendsConfig(_Strict):
    """The vLLM OpenAI servers behind the gateway."""

    mode: Literal["managed", "remote"] = Field(
        "managed", description="`managed`: start one local vLLM; `remote`: use the servers in `urls`."
    )
    urls: list[str] = Field(default_factory=list, description="Base URLs of remote vLLM servers.")
    served_model_name: str = Field(
        "base", description="Name vLLM serves the base model under (its --served-model-name)."
    )
    api_key: SecretStr | None = Field(None, description="Bearer key the vLLM servers expect, if any.")
    health_interval_s: float = Field(5.0, gt=0, description="Seconds between health checks of a back-end.")
    health_timeout_s: float = Field(3.0, gt=0, description="Timeout of one health check.")
    unhealthy_after: int = Field(
        3,
        ge=1,
        description="Health checks in a row that must time out before a back-end leaves the rotation (a "
        "busy vLLM can miss one). An answer other than 200, or a failed connection (refused, reset), takes it "
        "out at once.",
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="Connect timeout for forwarded requests.")
    request_timeout_s: float = Field(600.0, gt=0, description="Read timeout for forwarded requests.")
    keepalive_s: float = Field(
        4.0,
        gt=0,
        description="How long an idle connection to vLLM is kept for reuse. Keep it below the vLLM servers' "
        "own keep-alive (VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s by default); a managed vLLM is started with "
        "this plus 5 s.",
    )
    managed: ManagedBackendConfig = Field(
        default_factory=lambda: ManagedBackendConfig(), description="The managed vLLM child process."
    )

    @field_validator("urls")
    @classmethod
    def _urls_are_http(cls, urls: list[str]) -> list[str]:
        return http_urls(urls, "back-end URL")

    @model_validator(mode="after")
    def _remote_needs_urls(self) -> BackendsConfig:
        if self.mode == "remote" and not self.urls:
            raise ValueError("mode is 'remote' but no back-end urls are configured")
        return self
