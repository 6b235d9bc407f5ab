"""Backup storage drivers behind one async Protocol; use `get_driver(kind, config)`."""

from app.storage.base import (
    CHUNK_SIZE,
    BackupStorageDriver,
    CheckResult,
    ObjectInfo,
    ObjectNotFound,
    PartialUpload,
    PutResult,
    StorageError,
    StorageFull,
    StorageUnreachable,
    iter_file,
)
from app.storage.files import write_stream_to_file
from app.storage.registry import get_driver

__all__ = [
    "CHUNK_SIZE",
    "BackupStorageDriver",
    "CheckResult",
    "ObjectInfo",
    "ObjectNotFound",
    "PartialUpload",
    "PutResult",
    "StorageError",
    "StorageFull",
    "StorageUnreachable",
    "get_driver",
    "iter_file",
    "write_stream_to_file",
]
