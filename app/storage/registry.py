"""Maps a storage kind to its driver class, importing each client library only when used."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, cast

from app.storage.base import BackupStorageDriver

DRIVERS: dict[str, str] = {
    "local": "app.storage.local:LocalDriver",
    "nfs": "app.storage.local:NfsDriver",
    "s3": "app.storage.s3:S3Driver",
    "sftp": "app.storage.sftp:SftpDriver",
    "ftp": "app.storage.ftp:FtpDriver",
}


def get_driver(kind: str, config: Mapping[str, Any]) -> BackupStorageDriver:
    """Build the driver for `kind`; `config` is the storage's config with secrets decrypted."""
    try:
        target = DRIVERS[kind]
    except KeyError:
        known = ", ".join(sorted(DRIVERS))
        raise ValueError(f"unknown storage kind {kind!r} (known: {known})") from None
    module_name, _, class_name = target.partition(":")
    # Importing here keeps aioboto3/asyncssh/aioftp out of processes that never use them.
    driver_class = getattr(importlib.import_module(module_name), class_name)
    return cast(BackupStorageDriver, driver_class(config))
