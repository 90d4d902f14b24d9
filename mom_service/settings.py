"""The service's settings, from the environment (a `.env` file in the working directory is read too; real
environment variables win). Every variable is documented in docs/configuration.md."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from dotenv import dotenv_values
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """The service's environment; a `.env` file in the working directory is read too, real variables win."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    api_token: str | None = None
    admin_token: SecretStr | None = None  # the admin API's bearer token(s), comma-separated; unset: /admin/ is 503
    mom_config: str | None = None
    mom_config_watch: bool = False  # reload the config when its file changes (SIGHUP and /admin/reload always do)
    mom_wheel_cache: str | None = None  # `mom-service demo`: where the llama-cpp-python wheel is kept
    allowed_cors_origins: str = ""
    database_url: str = "sqlite+aiosqlite:///./data/mom.db"
    redis_url: str | None = None
    langfuse_public_key: str | None = None
    langfuse_secret_key: str | None = None
    langfuse_host: str | None = None
    langfuse_base_url: str | None = None
    litellm_verbose: bool = False
    mom_max_body_bytes: int = Field(default=32 * 1024 * 1024, gt=0)
    mom_max_in_flight: int = Field(default=512, gt=0)  # chat requests answered at once; beyond: 429
    mom_rate_limit_rpm: int = Field(default=0, ge=0)  # chat requests per minute per bearer token; 0: no limit
    mom_rate_limit_timeout_ms: int = Field(default=250, gt=0)  # each Redis operation of the rate limits
    mom_key_cache_seconds: float = Field(default=5.0, ge=0)  # an API key's record is cached this long per replica
    mom_key_spend_cache_seconds: float = Field(default=1.0, ge=0)  # a key's spend, far from its budget, cached
    mom_metrics_max_keys: int = Field(default=50, ge=0)  # API keys with series of their own in /metrics; more: `other`
    mom_circuit_failures: int = Field(default=5, ge=0)  # consecutive failures that open an LLM's circuit; 0: off
    mom_circuit_cooldown_seconds: float = Field(default=30.0, gt=0)
    mom_shutdown_grace_seconds: float = Field(default=20.0, ge=0)  # SIGTERM: time in-flight answers get to finish
    mom_cache_enabled: bool = True  # the response cache, for the MoM models whose `cache.enabled` is true
    mom_cache_max_bytes: int = Field(default=256 * 1024 * 1024, gt=0)  # in-process cache size bound
    mom_cache_timeout_ms: int = Field(default=250, gt=0)  # each Redis operation; slower is a miss
    mom_lean_calls: bool = True  # OpenAI-compatible servers called over aiohttp, not LiteLLM (see providers/caller.py)
    mom_usage_queue_size: int = Field(default=10_000, gt=0)
    mom_allow_private_image_urls: bool = False
    mom_max_images: int = Field(default=20, ge=0)
    mom_max_messages: int = Field(default=2000, gt=0)  # messages in one chat request; beyond: 400
    mom_max_text_chars: int = Field(default=4 * 1024 * 1024, gt=0)  # characters of text in one request; beyond: 400
    mom_max_image_bytes: int = Field(default=20 * 1024 * 1024, gt=0)  # each image URL the service downloads
    mom_image_fetch_timeout_seconds: float = Field(default=10.0, gt=0)  # each download, from connect to last byte
    mom_responses_ttl_days: int = Field(default=30, ge=1)  # stored Responses (store: true) are kept this long
    # the progress stream (GET /v1/progress/{id}): a run is forgotten this long after its last event
    mom_progress_ttl_seconds: float = Field(default=600.0, gt=0)
    mom_progress_max_deltas: int = Field(default=1000, gt=0)  # deltas kept per run (the oldest dropped first)
    mom_progress_max_subscribers: int = Field(default=8, gt=0)  # readers of one run at once, per replica; beyond: 429
    mom_progress_max_runs: int = Field(default=1000, gt=0)  # runs kept in process (without REDIS_URL)
    # the key of thinking blocks' signatures (Anthropic's Messages surface); unset: derived from API_TOKEN
    mom_signing_key: SecretStr | None = None
    mom_mcp_enabled: bool = False  # the MCP server: /mcp (streamable HTTP) and `mom-service mcp` (stdio)
    # `mom-service mcp` (stdio): whose requests they are (cache, rate limit); unset: the first of API_TOKEN
    mom_mcp_token: SecretStr | None = None
    metrics_public: bool = False
    mom_ui_enabled: bool = True  # the web pages at /ui (playground, usage dashboard); false: /ui answers 404
    log_format: Literal["text", "json"] = "text"
    log_content: bool = False  # log the last user message (truncated); off: no message content in any log
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)

    @property
    def api_tokens(self) -> tuple[bytes, ...]:
        """The accepted bearer tokens (a comma-separated list allows rotation), as bytes for a constant-time compare."""
        if not self.api_token:
            return ()
        return tuple(t.strip().encode() for t in self.api_token.split(",") if t.strip())

    @property
    def admin_tokens(self) -> tuple[bytes, ...]:
        """The accepted admin tokens (comma-separated, for rotation), as bytes for a constant-time compare."""
        if self.admin_token is None:
            return ()
        raw = self.admin_token.get_secret_value()
        return tuple(t.strip().encode() for t in raw.split(",") if t.strip())

    @property
    def cors_origins(self) -> list[str]:
        return [o.strip() for o in self.allowed_cors_origins.split(",") if o.strip()]


def environment(env_file: str | Path = ".env") -> dict[str, str]:
    """Variables for provider keys: the `.env` file overlaid by the real environment."""
    values = {k: v for k, v in dotenv_values(env_file).items() if v is not None}
    values.update(os.environ)
    return values
