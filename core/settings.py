"""loraloop's one settings object, at the bottom of the import graph: every layer reads its slice from here
(`store:` for feedback/, `aliases:`/`backends:` for serving/, `promotion:`/`cycle:` for deploy/).

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
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from core import paths
from core.deploy_config import CycleConfig, PromotionConfig
from core.errors import ConfigError
from core.quantization import get_scheme
from core.serving_config import AdapterConfig, AliasConfig, BackendsConfig
from core.store_config import StoreConfig

#: Secrets that ship in examples and must never guard a real deployment.
DEFAULT_SECRETS = frozenset({"changeme", "change-me", "changethis", "secret", "password", "admin", "test", "key"})

#: Model names that `init-model` knows how to build or fetch without a hub.
PRESETS = ("tiny", "smollm2")


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
    model_cache_dir: Path = Field(paths.MODEL_CACHE_DIR, description="Where presets are prepared (once) and cached.")
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
        paths.ADAPTER_ROOT,
        description="Every adapter directory must lie under this root (relative adapter paths start here).",
    )
    max_lora_rank: int = Field(
        16, ge=1, description="Largest adapter rank accepted (and vLLM --max-lora-rank of a managed back-end)."
    )
    state_dir: Path = Field(
        paths.GATEWAY_STATE_DIR,
        description="Where runtime changes (registered adapters, alias pointers) are kept across restarts.",
    )
    registry_path: Path = Field(
        paths.REGISTRY_PATH,
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

    @property
    def runs_path(self) -> Path:
        """The runs table, beside the registry."""
        return paths.runs_path(self.registry_path)

    @property
    def admin_url(self) -> str:
        """This machine's gateway, as the CLI and the controller reach it when no URL is configured."""
        return f"http://{self.host}:{self.port}"


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
        raise ConfigError(format_validation_error(exc), problems=validation_problems(exc)) from None
    except (OSError, ValueError, yaml.YAMLError) as exc:  # YAML syntax errors, unreadable files
        raise ConfigError(f"cannot read settings: {exc}".replace("\n", " ")) from None


def validation_problems(exc: ValidationError) -> list[str]:
    """One line per problem: `field.path: message`."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "settings"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return parts


def format_validation_error(exc: ValidationError) -> str:
    """Every problem on one line, joined with '; '."""
    return "invalid settings: " + "; ".join(validation_problems(exc))
