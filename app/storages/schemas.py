"""Backup storage configs, one model per kind; secrets are accepted but never returned."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from app.schemas import Name, RequestBody, Schema
from app.values import StorageKind, StorageStatus

SECRET_FIELDS: dict[str, tuple[str, ...]] = {
    "local": (),
    "nfs": (),
    "s3": ("secret_access_key",),
    "sftp": ("password", "private_key"),
    "ftp": ("password",),
}

# The config fields that decide where a kind's secrets are sent, or who may read them on the
# way: changing one needs the secrets given again in the same request, or a stored password
# would go to whatever host an update names (region picks the AWS endpoint, path_style the
# host name a bucket is reached at, host_key whom SFTP trusts, tls whether FTP sends the
# password in clear). Kinds without secrets have none.
DESTINATION_FIELDS: dict[str, tuple[str, ...]] = {
    "local": (),
    "nfs": (),
    "s3": ("endpoint_url", "region", "bucket", "access_key_id", "path_style"),
    "sftp": ("host", "port", "username", "host_key"),
    "ftp": ("host", "port", "username", "tls"),
}


def _absolute(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError("must be an absolute path")
    if "\x00" in path or "/../" in f"{path}/":
        raise ValueError("must not contain '..' or NUL")
    return path


AbsolutePath = Annotated[str, Field(min_length=1, max_length=1000), AfterValidator(_absolute)]
Host = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9.\-:\[\]]+$")]
Port = Annotated[int, Field(ge=1, le=65535)]
Secret = Annotated[str, Field(min_length=1, max_length=16384)]
_HOST_KEY = re.compile(
    r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/=]+( .*)?$"
)


class _Config(RequestBody):
    pass


class LocalConfig(_Config):
    path: AbsolutePath = Field(description="Directory on the hypervisor that holds backups.")


class NfsConfig(_Config):
    path: AbsolutePath = Field(description="Where the NFS share is mounted on the hypervisor.")
    server: str | None = Field(default=None, max_length=255)
    export: str | None = Field(default=None, max_length=1000)


class S3Config(_Config):
    endpoint_url: str | None = Field(
        default=None, pattern=r"^https?://[^\s/]+(/.*)?$", description="For S3-compatible servers."
    )
    region: str = Field(default="us-east-1", min_length=1, max_length=64)
    bucket: str = Field(pattern=r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
    prefix: str = Field(default="", max_length=500, pattern=r"^[^\x00]*$")
    access_key_id: str = Field(min_length=1, max_length=256)
    secret_access_key: Secret
    path_style: bool = False


class SftpConfig(_Config):
    host: Host
    port: Port = 22
    username: str = Field(min_length=1, max_length=100)
    path: AbsolutePath
    password: Secret | None = None
    private_key: Secret | None = None
    host_key: str = Field(
        max_length=16384,
        description="The server's public key line, pinned (no trust on first use).",
    )

    @model_validator(mode="after")
    def _credentials(self) -> SftpConfig:
        if not self.password and not self.private_key:
            raise ValueError("either password or private_key is required")
        if not _HOST_KEY.match(self.host_key.strip()):
            raise ValueError("host_key must be a public key line such as 'ssh-ed25519 AAAA...'")
        return self


class FtpConfig(_Config):
    host: Host
    port: Port = 21
    username: str = Field(min_length=1, max_length=100)
    password: Secret
    path: AbsolutePath = "/"
    tls: bool = Field(default=False, description="Explicit FTPS (AUTH TLS).")


CONFIG_MODELS: dict[str, type[_Config]] = {
    "local": LocalConfig,
    "nfs": NfsConfig,
    "s3": S3Config,
    "sftp": SftpConfig,
    "ftp": FtpConfig,
}


class LocalStorageCreate(RequestBody):
    kind: Literal["local"]
    name: Name
    config: LocalConfig


class NfsStorageCreate(RequestBody):
    kind: Literal["nfs"]
    name: Name
    config: NfsConfig


class S3StorageCreate(RequestBody):
    kind: Literal["s3"]
    name: Name
    config: S3Config


class SftpStorageCreate(RequestBody):
    kind: Literal["sftp"]
    name: Name
    config: SftpConfig


class FtpStorageCreate(RequestBody):
    kind: Literal["ftp"]
    name: Name
    config: FtpConfig


BackupStorageCreate = Annotated[
    LocalStorageCreate | NfsStorageCreate | S3StorageCreate | SftpStorageCreate | FtpStorageCreate,
    Field(discriminator="kind"),
]


class BackupStorageUpdate(RequestBody):
    name: Name | None = None
    config: dict[str, Any] | None = Field(
        default=None,
        description="Fields to change; omitted fields (and secrets) keep their values. "
        "A secret set to null is removed. Changing where secrets go (host, port, username, "
        "endpoint, bucket... per kind) needs the secrets given again in the same request: "
        "the stored ones are never sent to a new destination. A local or NFS path must lie "
        "under one of the server's storage roots (IBP_STORAGE_ROOTS).",
    )


class BackupStorageRead(Schema):
    id: uuid.UUID
    name: str
    kind: StorageKind
    config: dict[str, Any] = Field(description="Settings without secrets.")
    secrets_set: list[str] = Field(description="Which secrets are stored (never their values).")
    status: StorageStatus = Field(
        description="'checking' while a check job runs on a hypervisor's worker; poll until "
        "it is 'ok' or 'error'."
    )
    last_error: str | None
    last_checked_at: datetime | None
    created_at: datetime
    updated_at: datetime
