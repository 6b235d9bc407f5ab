"""Settings from the environment (prefix IBP_); the one place configuration is read."""

from __future__ import annotations

import posixpath
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.logs import LOG_LEVELS

PLACEHOLDER_SECRET = "change-me"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IBP_", env_file=".env", extra="ignore")

    environment: Literal["development", "test", "production"] = "development"
    # Secrets (and URLs that may hold a password) stay out of the settings' repr, so a log
    # line or a traceback that shows the settings shows no secret.
    database_url: str = Field(
        default="postgresql+asyncpg://postgres@127.0.0.1:5432/ibp", repr=False
    )
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", repr=False)
    secret_key: str = Field(default=PLACEHOLDER_SECRET, repr=False)
    # Keys the secrets may still be sealed with (comma-separated): they open stored secrets,
    # never seal new ones, until `ibp rotate-secrets` has sealed everything with secret_key.
    previous_secret_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False)
    session_lifetime_hours: float = Field(default=12.0, gt=0)
    # When set, every personal API token must expire within this many days of its creation.
    max_token_days: int | None = Field(default=None, gt=0, le=36500)
    cors_origins: list[str] = Field(default_factory=list)
    db_pool_size: int = Field(default=10, ge=1)
    # Scheduler knobs: how late a missed run may still run, when a silent job is lost.
    catch_up_grace_hours: float = Field(default=6.0, ge=0)
    # Added to a policy's longest gap between backups before an instance is at risk.
    rpo_grace_hours: float = Field(default=6.0, ge=0)
    stale_backup_minutes: float = Field(default=15.0, gt=0)
    # > 0: the tick re-verifies each instance's newest chain when its last check is older.
    verify_interval_hours: float = Field(default=0.0, ge=0)
    # Request bodies larger than this are refused (413) while they arrive.
    max_body_bytes: int = Field(default=1024 * 1024, ge=1)
    # Login throttling, counted in Redis so it holds across API processes. Every attempt from
    # one client address counts (it bounds the password hashing one address can cause); only
    # failures count for an account, in a short window, so someone else's wrong guesses lock
    # its owner out for one window at most.
    login_attempts_per_address: int = Field(default=30, ge=1)
    login_address_window_seconds: int = Field(default=60, ge=1)
    login_failures_per_account: int = Field(default=5, ge=1)
    login_account_window_seconds: int = Field(default=60, ge=1)
    # Where local-disk storage lives when the service is started by the README's one command.
    data_dir: str = "./var"
    # Directories under which local and NFS storage paths may lie (an admin could otherwise
    # point a storage, and its probe writes, at any directory). Empty: `<data_dir>/backups`,
    # where `ibp setup-local` puts local backups.
    storage_roots: list[str] = Field(default_factory=list)
    # Webhooks may be sent to loopback, private and link-local addresses (tests, a lab);
    # otherwise only to public ones, checked at registration and before every attempt.
    webhooks_allow_private: bool = False
    # When set, GET /metrics answers only `Authorization: Bearer <this>`.
    metrics_token: str | None = Field(default=None, repr=False)
    # Every process's log lines: `text` (one line each) or `json` (one object per line).
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"

    @field_validator("log_format", mode="before")
    @classmethod
    def _log_format(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"{value!r} is not a log level ({', '.join(LOG_LEVELS)})")
        return level

    @field_validator("previous_secret_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(value)
        except ArgumentError:
            raise ValueError(
                "not a database URL (postgresql+asyncpg://user[:password]@host[:port]/database)"
            ) from None
        return value

    @model_validator(mode="after")
    def _storage_roots(self) -> Settings:
        if not self.storage_roots:
            self.storage_roots = [str(Path(self.data_dir).resolve() / "backups")]
        for root in self.storage_roots:
            if not root.startswith("/"):
                raise ValueError(f"IBP_STORAGE_ROOTS: {root!r} is not an absolute path")
        self.storage_roots = [posixpath.normpath(root) for root in self.storage_roots]
        return self

    @model_validator(mode="after")
    def _refuse_weak_secret(self) -> Settings:
        weak = not self.secret_key or self.secret_key == PLACEHOLDER_SECRET
        if self.environment != "development" and (weak or len(self.secret_key) < 32):
            raise ValueError(
                "IBP_SECRET_KEY is missing, the placeholder, or shorter than 32 characters. "
                "It encrypts storage secrets and must be set to a long random value outside "
                "development: python -c 'import secrets; print(secrets.token_urlsafe(48))'"
            )
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
