"""The Prometheus metrics: every metric's name, help and labels, and the catalog's gauges.

Two kinds, observed in two places:
- Events (counters, histograms) are counted where they happen, in the process they happen
  in: a job's outcome by the job skeleton (worker/jobs.py) once the outcome is committed, the
  tick by the control worker, a storage check by the worker that ran it. Each process serves
  its own on /metrics (`ibp worker --metrics-port`, the API's `GET /metrics`).
- Gauges of the catalog's state (jobs queued and running per hypervisor, per policy the age of
  the oldest last good backup) are read from PostgreSQL, the one source of truth, by the API
  at each scrape (`read_catalog`, async), then rendered by a collector from that snapshot.
  Not kept by the control worker: any `ibp worker` may run a given minute's tick, so gauges set
  there would be fresh in one process and stale in the others.

Labels are bounded: job type or target, status, storage kind, hypervisor name, policy id;
never a backup, restore, instance or user, and no names or emails of tenants.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import Backup, BackupPolicy, Hypervisor, Instance, Restore
from app.values import BackupStatus

MiB = 1024 * 1024
# Jobs take from seconds (a small incremental) to hours (a full of a big disk).
DURATION_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 43200)
SIZE_BUCKETS = tuple(float(MiB * 4**n) for n in range(11))  # 1 MiB .. 1 TiB
RATE_BUCKETS = tuple(float(MiB * n) for n in (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048))
TICK_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

COMPLETED = "completed"
FAILED = "failed"


@dataclass(frozen=True)
class JobMetrics:
    """The metrics of one kind of hypervisor job (backup, restore), fed by the job skeleton."""

    total: Counter
    duration: Histogram
    size: Histogram
    type_label: str
    rate: Histogram | None = None

    def finished(self, kind: str, status: str, seconds: float, size: int | None) -> None:
        """A job's outcome is recorded: `kind` its type (or target), `size` the bytes it
        moved when it completed."""
        labels = {self.type_label: kind}
        self.total.labels(**labels, status=status).inc()
        self.duration.labels(**labels, status=status).observe(seconds)
        if status == COMPLETED and size is not None:
            self.size.labels(**labels).observe(size)
            if self.rate is not None and seconds > 0:
                self.rate.labels(**labels).observe(size / seconds)


BACKUPS = JobMetrics(
    Counter(
        "ibp_backups",
        "Backup jobs run to an outcome by this worker, by type (full, incremental) and status",
        ["type", "status"],
    ),
    Histogram(
        "ibp_backup_duration_seconds",
        "Backup jobs' duration from claim to recorded outcome",
        ["type", "status"],
        buckets=DURATION_BUCKETS,
    ),
    Histogram(
        "ibp_backup_size_bytes",
        "Bytes a completed backup stored (its qcow2 images)",
        ["type"],
        buckets=SIZE_BUCKETS,
    ),
    "type",
    Histogram(
        "ibp_backup_throughput_bytes_per_second",
        "A completed backup's stored bytes over its duration",
        ["type"],
        buckets=RATE_BUCKETS,
    ),
)

RESTORES = JobMetrics(
    Counter(
        "ibp_restores",
        "Restore jobs run to an outcome by this worker, by target (in_place, new_disk) and status",
        ["target", "status"],
    ),
    Histogram(
        "ibp_restore_duration_seconds",
        "Restore jobs' duration from claim to recorded outcome",
        ["target", "status"],
        buckets=DURATION_BUCKETS,
    ),
    Histogram(
        "ibp_restore_size_bytes",
        "Bytes of backup chain a completed restore read from storage",
        ["target"],
        buckets=SIZE_BUCKETS,
    ),
    "target",
)

TICK_SECONDS = Histogram(
    "ibp_scheduler_tick_duration_seconds",
    "The control worker's minute tick: reaping, re-sending, dispatching, verifications",
    buckets=TICK_BUCKETS,
)
TICK_DISPATCHED = Counter("ibp_scheduler_dispatched", "Backups the scheduler tick created and sent")
TICK_SKIPPED = Counter(
    "ibp_scheduler_skipped",
    "Scheduled runs the tick skipped: missed while down, previous backup still running, "
    "nothing to do for the plan",
)
TICK_REAPED = Counter(
    "ibp_scheduler_reaped",
    "Work the tick failed because no worker ran it (worker lost, never started, unattended)",
    ["kind"],
)
STORAGE_CHECKS = Counter(
    "ibp_storage_checks",
    "Storage checks run by this worker, by storage kind and result",
    ["kind", "result"],
)

WEBHOOK_ATTEMPTS = Counter(
    "ibp_webhook_attempts",
    "Webhook delivery attempts by this worker, by result: succeeded, retrying (failed, tried "
    "again later), gave_up (the delivery's last attempt failed)",
    ["result"],
)
WEBHOOK_DISABLED = Counter(
    "ibp_webhook_endpoints_disabled", "Webhook endpoints this worker disabled for failing"
)

# --- The catalog's state, read at scrape time ---------------------------------------------


@dataclass
class CatalogSnapshot:
    """What PostgreSQL says at one instant; None when it could not be read."""

    # (hypervisor name, kind) -> count
    queued: dict[tuple[str, str], int] = field(default_factory=dict)
    running: dict[tuple[str, str], int] = field(default_factory=dict)
    # policy id -> seconds since the oldest of its instances' last good backups
    oldest_good_age: dict[uuid.UUID, float] = field(default_factory=dict)
    # policy id -> its instances that have no good backup at all
    without_good: dict[uuid.UUID, int] = field(default_factory=dict)
    up: bool = True


JOB_KINDS: dict[str, type[Backup] | type[Restore]] = {"backup": Backup, "restore": Restore}


async def read_catalog(session: AsyncSession, now: datetime) -> CatalogSnapshot:
    """Jobs queued and running per hypervisor, and per policy the oldest last good backup.

    A good backup is completed with all its files on storage. Every hypervisor appears (zeros
    included), so a queue that drains reads 0 rather than vanishing.
    """
    snap = CatalogSnapshot()
    names = (await session.scalars(select(Hypervisor.name))).all()
    for name in names:
        for kind in JOB_KINDS:
            snap.queued[(name, kind)] = 0
            snap.running[(name, kind)] = 0
    for kind, model in JOB_KINDS.items():
        rows = await session.execute(
            select(Hypervisor.name, model.status, func.count())
            .join(Instance, Instance.hypervisor_id == Hypervisor.id)
            .join(model, model.instance_id == Instance.id)
            .where(model.status.in_((BackupStatus.PENDING, BackupStatus.IN_PROGRESS)))
            .group_by(Hypervisor.name, model.status)
        )
        for name, status, count in rows:
            into = snap.queued if status == BackupStatus.PENDING else snap.running
            into[(name, kind)] = count

    last_good = (
        select(
            Instance.backup_policy_id.label("policy_id"),
            func.max(Backup.completed_at).label("at"),
        )
        .select_from(Instance)
        .join(BackupPolicy, BackupPolicy.id == Instance.backup_policy_id)
        .outerjoin(
            Backup,
            (Backup.instance_id == Instance.id)
            & (Backup.status == BackupStatus.COMPLETED)
            & Backup.files_missing_at.is_(None),
        )
        .group_by(Instance.backup_policy_id, Instance.id)
        .subquery()
    )
    policies = await session.execute(
        select(
            last_good.c.policy_id,
            func.min(last_good.c.at),
            func.count().filter(last_good.c.at.is_(None)),
        ).group_by(last_good.c.policy_id)
    )
    for policy_id, oldest, never in policies:
        if oldest is not None:
            snap.oldest_good_age[policy_id] = max(0.0, (now - oldest).total_seconds())
        snap.without_good[policy_id] = never
    return snap


class CatalogCollector(Collector):
    """Renders one snapshot; built per scrape (collect() is sync: the reading was done)."""

    def __init__(self, snap: CatalogSnapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        snap = self.snap
        up = GaugeMetricFamily(
            "ibp_catalog_up", "1 when this scrape could read the catalog (PostgreSQL), else 0"
        )
        up.add_metric([], 1.0 if snap.up else 0.0)
        yield up
        if not snap.up:
            return
        for name, counts, what in (
            ("ibp_jobs_queued", snap.queued, "pending"),
            ("ibp_jobs_running", snap.running, "in progress"),
        ):
            family = GaugeMetricFamily(
                name, f"Backups and restores {what}, per hypervisor", labels=["hypervisor", "kind"]
            )
            for (hypervisor, kind), count in sorted(counts.items()):
                family.add_metric([hypervisor, kind], float(count))
            yield family
        age = GaugeMetricFamily(
            "ibp_policy_oldest_good_backup_age_seconds",
            "Per policy: seconds since the last good backup of its least recently backed-up "
            "instance (those with none: ibp_policy_instances_without_good_backup)",
            labels=["policy"],
        )
        for policy_id, seconds in sorted(snap.oldest_good_age.items()):
            age.add_metric([str(policy_id)], seconds)
        yield age
        never = GaugeMetricFamily(
            "ibp_policy_instances_without_good_backup",
            "Per policy: attached instances that have no good backup yet",
            labels=["policy"],
        )
        for policy_id, count in sorted(snap.without_good.items()):
            never.add_metric([str(policy_id)], float(count))
        yield never


def render(snap: CatalogSnapshot) -> bytes:
    """This process's metrics, then the catalog's: the API's /metrics body."""
    catalog = CollectorRegistry(auto_describe=False)
    catalog.register(CatalogCollector(snap))
    return generate_latest(REGISTRY) + generate_latest(catalog)
