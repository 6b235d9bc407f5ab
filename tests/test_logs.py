"""Log lines as an operator reads them: IBP_LOG_FORMAT and IBP_LOG_LEVEL, the running job's ids
on every line, a long job's progress, and settings that never show a secret."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from app import logs
from app.config import Settings
from app.logs import ProgressLog, job_context, setup_logging

IDS = {
    "job": "backup",
    "backup_id": "b-1",
    "instance_id": "i-1",
    "policy_id": "p-1",
    "hypervisor_id": "h-1",
}


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """setup_logging replaces the root logger's handlers (pytest's own among them)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _captured(log_format: str, log_level: str) -> io.StringIO:
    out = io.StringIO()
    setup_logging(log_format, log_level, out)
    return out


def test_json_lines_carry_the_jobs_ids_as_fields(restore_logging: None) -> None:
    out = _captured("json", "INFO")
    log = logging.getLogger("ibp.test")
    log.info("before the job")
    with job_context(**IDS):
        log.info("in the job: %d disks", 2)
    log.info("after the job")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["message"] for line in lines] == [
        "before the job",
        "in the job: 2 disks",
        "after the job",
    ]
    assert lines[1].items() >= {**IDS, "level": "INFO", "logger": "ibp.test"}.items()
    assert "time" in lines[1]
    assert not set(IDS) & set(lines[0]) and not set(IDS) & set(lines[2])


def test_text_lines_end_with_the_jobs_ids_before_a_traceback(restore_logging: None) -> None:
    out = _captured("text", "INFO")
    log = logging.getLogger("ibp.test")
    with job_context(job="restore", restore_id="r-1", instance_id="i-1", policy_id=None):
        try:
            raise RuntimeError("broken")
        except RuntimeError:
            log.exception("restore failed")
    first, *rest = out.getvalue().splitlines()
    assert first.endswith(" ERROR ibp.test restore failed [job=restore restore=r-1 instance=i-1]")
    assert rest[0] == "Traceback (most recent call last):" and rest[-1] == "RuntimeError: broken"


async def test_lines_inside_a_thread_started_by_the_job_carry_its_ids(
    restore_logging: None,
) -> None:
    """On the suite's event loop: asyncio.run here would leave later tests without one."""
    import asyncio

    out = _captured("json", "INFO")
    with job_context(**IDS):
        await asyncio.to_thread(logging.getLogger("ibp.thread").info, "from a thread")
    assert json.loads(out.getvalue())["backup_id"] == "b-1"


@pytest.mark.parametrize(
    ("level", "shown"),
    [
        ("DEBUG", ["debug", "info", "warning"]),
        ("WARNING", ["warning"]),
        ("INFO", ["info", "warning"]),
    ],
)
def test_the_log_level_filters_lines(restore_logging: None, level: str, shown: list[str]) -> None:
    out = _captured("json", level)
    log = logging.getLogger("ibp.test")
    log.debug("debug")
    log.info("info")
    log.warning("warning")
    assert [json.loads(line)["message"] for line in out.getvalue().splitlines()] == shown


def test_log_settings_are_checked_and_read_in_any_case() -> None:
    settings = Settings(log_format="JSON", log_level="debug")
    assert (settings.log_format, settings.log_level) == ("json", "DEBUG")
    assert (Settings().log_format, Settings().log_level) == ("text", "INFO")
    with pytest.raises(ValueError, match="'verbose' is not a log level"):
        Settings(log_level="verbose")
    with pytest.raises(ValueError, match="log_format"):
        Settings(log_format="xml")


def test_the_settings_repr_shows_no_secret() -> None:
    marker = "marker-7d1c0f3a"
    settings = Settings(
        secret_key=marker * 4,
        previous_secret_keys=f"{marker}-old",  # type: ignore[arg-type]
        database_url=f"postgresql+asyncpg://ibp:{marker}@db/ibp",
        redis_url=f"redis://:{marker}@redis:6379/0",
        metrics_token=marker,
    )
    assert marker not in repr(settings) and marker not in str(settings)


def test_progress_is_logged_every_interval_with_bytes_rate_and_time_left(
    restore_logging: None,
) -> None:
    out = _captured("json", "INFO")
    clock = [100.0]
    progress = ProgressLog(logging.getLogger("ibp.test"), "backup", clock=lambda: clock[0])
    mib = 1024 * 1024
    for second, done in [(0, 0), (10, 100), (29.9, 300), (30, 300), (45, 450), (60, 600)]:
        clock[0] = 100.0 + second
        progress.advance(done * mib, 1200 * mib)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["bytes_done"] for line in lines] == [300 * mib, 600 * mib]
    assert (
        lines[0]["message"] == "backup progress: 300.0 MB of 1.2 GB (25%), 10.0 MB/s, 1m 30s left"
    )
    assert (lines[0]["bytes_total"], lines[0]["rate_mb_s"], lines[0]["eta_s"]) == (
        1200 * mib,
        10.0,
        90,
    )
    assert lines[1]["eta_s"] == 60


def test_progress_interval_is_a_module_constant_tests_can_lower(
    restore_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "PROGRESS_EVERY_S", 0.0)
    out = _captured("text", "INFO")
    clock = [0.0]
    progress = ProgressLog(logging.getLogger("ibp.test"), "restore", clock=lambda: clock[0])
    clock[0] = 5.0  # the job loaded its row: the transfer's clock starts at its first advance
    progress.advance(0, 10)  # no time has passed: no rate, no time left yet
    clock[0] = 6.0
    progress.advance(5, 10)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("restore progress: 0 B of 10 B (0%), 0.0 MB/s, unknown time left")
    assert lines[1].endswith("restore progress: 5 B of 10 B (50%), 0.0 MB/s, 1s left")
    assert len(lines) == 2
