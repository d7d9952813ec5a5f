"""loraloop's one settings object.

Values come from, highest priority first: keyword arguments, ``LORALOOP_*`` environment variables
(nested fields with ``__``, e.g. ``LORALOOP_BACKENDS__MODE=remote``), then the YAML file given with
``--config``. Every field is documented where it is declared; ``docs/configuration.md`` is the
operator's view of the same thing.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from deploy.config import CycleConfig, PromotionConfig
from feedback.config import StoreConfig

#: Secrets that ship in examples and must never guard a real deployment.
DEFAULT_SECRETS = frozenset({"changeme", "change-me", "changethis", "secret", "password", "admin", "test", "key"})

#: Model names that `init-model` knows how to build or fetch without a hub.
PRESETS = ("tiny", "smollm2")


class ConfigError(Exception):
    """A settings problem, rendered as one line for the operator."""


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
    extra_args: list[str] = Field(default_factory=list, description="More vLLM command-line arguments.")
    startup_timeout_s: float = Field(900.0, gt=0, description="How long to wait for vLLM's /health.")
    restart_backoff_s: float = Field(2.0, ge=0, description="Pause before restarting a dead vLLM.")
    stop_timeout_s: float = Field(20.0, gt=0, description="Grace after SIGTERM before SIGKILL.")


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
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"back-end URL {url!r} must start with http:// or https://")
        return [u.rstrip("/") for u in urls]

    @model_validator(mode="after")
    def _remote_needs_urls(self) -> BackendsConfig:
        if self.mode == "remote" and not self.urls:
            raise ValueError("mode is 'remote' but no back-end urls are configured")
        return self


class Settings(BaseSettings):
    """Everything `loraloop serve` needs, validated at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="LORALOOP_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    model: str = Field(
        "smollm2",
        description="Base model: a preset (`tiny`, `smollm2`), a local directory, or a hub id.",
    )
    quantization: str | None = Field(
        None,
        description="Serve the base quantized with this scheme (see docs/quantization.md; fp8_dynamic runs on "
        "CPUs too). Prepared once with llm-compressor into model_cache_dir; null = unquantized.",
    )
    model_cache_dir: Path = Field(
        Path("~/.cache/loraloop/models"), description="Where presets are prepared (once) and cached."
    )
    host: str = Field("127.0.0.1", description="Gateway bind address.")
    port: int = Field(8000, ge=1, le=65535, description="Gateway port.")
    keepalive_s: int = Field(
        75,
        gt=0,
        description="Seconds an idle client connection is kept open (uvicorn's timeout_keep_alive). Longer "
        "than clients' own pools (httpx, the openai SDK: 5 s), so a client never reuses a connection the "
        "gateway is just closing.",
    )
    api_key: SecretStr | None = Field(
        None, description="Bearer key required on /v1/* (env LORALOOP_API_KEY); unset = open."
    )
    admin_key: SecretStr | None = Field(
        None, description="Bearer key for admin endpoints (env LORALOOP_ADMIN_KEY); unset = admin disabled."
    )
    metrics_require_key: bool = Field(False, description="Require the API key on /metrics too.")
    health_require_key: bool = Field(False, description="Require the API key on /health too.")
    backends: BackendsConfig = Field(
        default_factory=lambda: BackendsConfig(), description="The vLLM servers behind the gateway."
    )
    aliases: dict[str, AliasConfig] = Field(
        default_factory=lambda: {"default": AliasConfig()},
        description="Client-visible model names and what each maps to.",
    )
    adapters: dict[str, AdapterConfig] = Field(
        default_factory=dict, description="LoRA adapters by name, loaded on every back-end."
    )
    adapter_root: Path = Field(
        Path("./adapters"),
        description="Every adapter directory must lie under this root (relative adapter paths start here).",
    )
    max_lora_rank: int = Field(
        16, ge=1, description="Largest adapter rank accepted (and vLLM --max-lora-rank of a managed back-end)."
    )
    state_dir: Path = Field(
        Path("./.loraloop/state"),
        description="Where runtime changes (registered adapters, alias pointers) are kept across restarts.",
    )
    registry_path: Path = Field(
        Path("./.loraloop/registry.duckdb"),
        description="The adapter registry (versions, lineage, status, audit log) and its runs table beside it.",
    )
    promotion: PromotionConfig = Field(
        default_factory=lambda: PromotionConfig(), description="Canary, promotion and rollback (deploy/)."
    )
    cycle: CycleConfig = Field(default_factory=lambda: CycleConfig(), description="The nightly `loraloop cycle`.")
    store: StoreConfig = Field(
        default_factory=lambda: StoreConfig(), description="The feedback event store (see docs/event-store.md)."
    )
    replica_id: str = Field(
        default_factory=lambda: socket.gethostname(),
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
        description="This gateway's writer id in the event store; unique per replica, stable across restarts.",
        json_schema_extra={"doc_default": "the host name"},
    )
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest accepted request body.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log verbosity.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        if cls.model_config.get("yaml_file"):
            sources += (YamlConfigSettingsSource(settings_cls),)
        return sources

    @field_validator("quantization")
    @classmethod
    def _known_scheme(cls, scheme: str | None) -> str | None:
        if scheme is None or scheme.lower() in ("", "none"):
            return None
        from .quantize import get_scheme

        return get_scheme(scheme).name  # QuantizationRefused (a ValueError) names the known schemes

    @field_validator("api_key", "admin_key")
    @classmethod
    def _refuse_default_secrets(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        secret = value.get_secret_value()
        if secret.strip().lower() in DEFAULT_SECRETS or len(secret) < 8:
            raise ValueError("refusing a default or short secret: use at least 8 random characters")
        return value

    @model_validator(mode="after")
    def _aliases_point_at_known_adapters(self) -> Settings:
        if not self.aliases:
            raise ValueError("aliases: at least one alias is needed")
        for name, alias in self.aliases.items():
            if alias.adapter is not None and alias.adapter not in self.adapters:
                raise ValueError(f"alias {name!r} names adapter {alias.adapter!r}, which is not in adapters")
        if (
            self.api_key is not None
            and self.admin_key is not None
            and self.api_key.get_secret_value() == self.admin_key.get_secret_value()
        ):
            raise ValueError("api_key and admin_key must differ")
        return self

    @property
    def cache_dir(self) -> Path:
        return self.model_cache_dir.expanduser()


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from a YAML file, the environment and overrides; raise ConfigError on bad input."""
    cls: type[Settings] = Settings
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        cls = type("Settings", (Settings,), {"model_config": {**Settings.model_config, "yaml_file": path}})
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    except (OSError, ValueError, yaml.YAMLError) as exc:  # YAML syntax errors, unreadable files
        raise ConfigError(f"cannot read settings: {exc}".replace("\n", " ")) from None


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: `field.path: message`, joined with '; '."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "settings"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "invalid settings: " + "; ".join(parts)
