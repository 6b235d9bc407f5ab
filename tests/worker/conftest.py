"""Fixtures for jobs that run against real libvirt, real storage and committed transactions."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from arq.connections import ArqRedis
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.config import Settings
from app.main import create_app
from app.models import BackupPolicy, BackupStorage, Hypervisor, Instance, User
from app.security import secret_box
from tests.factories import create_instance, create_location, create_policy, create_user
from tests.virt.conftest import libvirtd, make_vm  # noqa: F401  (fixtures shared with virt)
from tests.virt.vmkit import VM, VMFactory
from worker.jobs import RESOURCES, JobContext, Resources


@pytest.fixture
def real_sessionmaker(committed_engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(committed_engine, expire_on_commit=False, autoflush=False)


@pytest.fixture
async def real_client(
    settings: Settings,
    real_sessionmaker: async_sessionmaker[AsyncSession],
    arq_redis: ArqRedis,
) -> AsyncIterator[httpx.AsyncClient]:
    """The API over committed transactions, so jobs run by the test see what it wrote."""
    app = create_app(settings)
    app.state.sessionmaker = real_sessionmaker
    app.state.arq = arq_redis
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test/api/v1") as c:
        yield c


@pytest.fixture
def worker_ctx(
    real_sessionmaker: async_sessionmaker[AsyncSession], settings: Settings, arq_redis: ArqRedis
) -> JobContext:
    return {RESOURCES: Resources(settings, real_sessionmaker, arq_redis), "job_try": 1}


@dataclass
class World:
    """One VM on one hypervisor with local storage, owned by a user with a policy."""

    vm: VM
    user: User
    storage: BackupStorage
    storage_dir: Path
    hypervisor: Hypervisor
    instance: Instance
    policy: BackupPolicy

    async def point_storage(
        self,
        maker: async_sessionmaker[AsyncSession],
        kind: str,
        config: dict[str, Any],
        secrets: dict[str, str],
    ) -> None:
        """Make the world's storage another kind (committed: jobs read it in their sessions)."""
        async with maker() as session:
            await session.execute(
                update(BackupStorage)
                .where(BackupStorage.id == self.storage.id)
                .values(
                    kind=kind,
                    config=config,
                    secrets_encrypted=secret_box().encrypt(secrets) if secrets else None,
                )
            )
            await session.commit()


WorldFactory = Callable[..., Awaitable[World]]


def local_storage(root: Path) -> BackupStorage:
    return BackupStorage(
        id=uuid.uuid4(),
        name=f"local-{uuid.uuid4().hex[:6]}",
        kind="local",
        config={"path": str(root)},
        status="unknown",
    )


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    """A hypervisor's scratch folder, short as the backup's NBD socket in it needs (pytest's
    tmp_path is too long for a unix socket's path)."""
    path = Path(tempfile.mkdtemp(prefix="ibp-scratch-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_world(
    make_vm: VMFactory,  # noqa: F811
    real_sessionmaker: async_sessionmaker[AsyncSession],
    tmp_path: Path,
    scratch_dir: Path,
) -> WorldFactory:
    """Builds a World whose policy has exactly the settings the test passes."""

    async def build(
        *, backup_device: str, max_incremental_chain: int, retention_count: int
    ) -> World:
        vm = make_vm("job")
        storage_dir = tmp_path / "storage"
        storage_dir.mkdir()
        async with real_sessionmaker() as session:
            user = await create_user(session, timezone="Europe/Paris")
            location = await create_location(session, backup_price_per_gb_month="0.05")
            storage = local_storage(storage_dir)
            session.add(storage)
            await session.flush()
            hypervisor = Hypervisor(
                id=uuid.uuid4(),
                name=f"hv-{uuid.uuid4().hex[:6]}",
                location_id=location.id,
                libvirt_uri=vm.uri,
                backup_storage_id=storage.id,
                max_concurrent_backups=2,
                scratch_dir=str(scratch_dir),
            )
            session.add(hypervisor)
            await session.flush()
            policy = await create_policy(
                session,
                user,
                backup_device=backup_device,
                max_incremental_chain=max_incremental_chain,
                retention_count=retention_count,
            )
            instance = await create_instance(
                session,
                user,
                hypervisor_id=hypervisor.id,
                domain_name=vm.name,
                backup_policy_id=policy.id,
                disks=[
                    {"target": "vda", "boot": True, "size_bytes": 64 * 1024**2},
                    {"target": "vdb", "boot": False, "size_bytes": 32 * 1024**2},
                ],
            )
            await session.commit()
        return World(vm, user, storage, storage_dir, hypervisor, instance, policy)

    return build


@pytest.fixture
async def world(make_world: WorldFactory) -> World:
    return await make_world(backup_device="all", max_incremental_chain=6, retention_count=3)
