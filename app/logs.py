"""Log lines: one setup for every process (IBP_LOG_FORMAT text or json, IBP_LOG_LEVEL), the ids
of the job a line belongs to, and a long job's progress every PROGRESS_EVERY_S.

A job sets its ids once (`job_context`); every line logged in its task, its child tasks and
the threads it starts with `asyncio.to_thread` (which copy the context) carries them: in JSON
as fields, in text as `[backup=… instance=… policy=… hypervisor=…]` at the end of the line.
"""

from __future__ import annotations

import contextlib
import logging
import logging.config
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import IO, Any

from pythonjsonlogger.core import RESERVED_ATTRS

from app.units import duration_human, size_human

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# The fields a job's lines carry, in this order; text shows them by their short names.
JOB_FIELDS = {
    "job": "job",
    "backup_id": "backup",
    "restore_id": "restore",
    "instance_id": "instance",
    "policy_id": "policy",
    "hypervisor_id": "hypervisor",
}
MB = 1024 * 1024  # as size_human counts a "MB"
PROGRESS_EVERY_S = 30.0  # a running backup or restore logs how far it is this often

_job: ContextVar[dict[str, str] | None] = ContextVar("ibp_job", default=None)


@contextlib.contextmanager
def job_context(**ids: object) -> Iterator[None]:
    """The ids (JOB_FIELDS) every line logged inside the block carries; None ones are left out."""
    unknown = set(ids) - set(JOB_FIELDS)
    if unknown:
        raise ValueError(f"not job log fields: {sorted(unknown)}")
    token = _job.set({name: str(value) for name, value in ids.items() if value is not None})
    try:
        yield
    finally:
        _job.reset(token)


class JobFields(logging.Filter):
    """Puts the running job's ids on each record, as attributes (JSON shows them as fields)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in (_job.get() or {}).items():
            setattr(record, name, value)
        return True


class TextFormatter(logging.Formatter):
    """The classic line, with the job's ids appended before any traceback."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        ids = " ".join(
            f"{short}={getattr(record, name)}"
            for name, short in JOB_FIELDS.items()
            if getattr(record, name, None) is not None
        )
        return f"{line} [{ids}]" if ids else line


_CHATTY = ("alembic.runtime.plugins",)
# LogRecord attributes JSON leaves out: logging's own (python-json-logger's list, with
# Python 3.12's taskName), and uvicorn's colored copy of the message.
_JSON_SKIPS = (*RESERVED_ATTRS, "taskName", "color_message")


def logging_config(
    log_format: str, log_level: str, stream: IO[str] | None = None
) -> dict[str, Any]:
    """A `logging.config.dictConfig` dict: one handler on the root logger, to stderr (or
    `stream`), in the chosen format. uvicorn takes it as its `log_config` (plain strings only,
    so it pickles to `--workers` processes); its own loggers then write through the root."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {LOG_FORMATS}")
    handler: dict[str, Any] = {
        "class": "logging.StreamHandler",
        "formatter": log_format,
        "filters": ["job"],
        "stream": stream if stream is not None else "ext://sys.stderr",
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"job": {"()": "app.logs.JobFields"}},
        "formatters": {
            "text": {"()": "app.logs.TextFormatter", "fmt": TEXT_FORMAT},
            "json": {
                "()": "pythonjsonlogger.json.JsonFormatter",
                "fmt": "%(levelname)s %(name)s %(message)s",
                "rename_fields": {"levelname": "level", "name": "logger"},
                "timestamp": "time",
                "reserved_attrs": _JSON_SKIPS,
            },
        },
        "handlers": {"default": handler},
        "root": {"level": log_level, "handlers": ["default"]},
        # uvicorn's loggers keep no handler of their own: their lines go through the root's.
        "loggers": {
            **{
                name: {"handlers": [], "propagate": True}
                for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
            },
            # INFO lines that say nothing to an operator (alembic's plugins, at every start);
            # DEBUG still shows them.
            **{name: {"level": "WARNING"} for name in _CHATTY if log_level == "INFO"},
        },
    }


def setup_logging(log_format: str, log_level: str, stream: IO[str] | None = None) -> None:
    """Configure this process's logging (the CLI does it once, from the settings)."""
    logging.config.dictConfig(logging_config(log_format, log_level, stream))


class ProgressLog:
    """Logs a long transfer's progress when PROGRESS_EVERY_S have passed since its first
    advance or its last line: bytes done and total, the mean rate since the first advance
    (the transfer's start, not the job's), and the time left at that rate. Fed with each
    advance (`advance(done, total)`); it never logs on its own."""

    def __init__(
        self, logger: logging.Logger, what: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.logger, self.what, self.clock = logger, what, clock
        self.started: float | None = None
        self.last = 0.0

    def advance(self, done: int, total: int) -> None:
        now = self.clock()
        if self.started is None:
            self.started = self.last = now
        if now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 and total >= done else None
        self.logger.info(
            "%s progress: %s of %s (%d%%), %.1f MB/s, %s left",
            self.what,
            size_human(done),
            size_human(total),
            100 * done // total if total else 0,
            rate / MB,
            duration_human(eta) if eta is not None else "unknown time",
            extra={
                "bytes_done": done,
                "bytes_total": total,
                "rate_mb_s": round(rate / MB, 2),
                "eta_s": round(eta) if eta is not None else None,
            },
        )
