"""Admin inventory: locations, backup storages (validated, secrets encrypted), hypervisors,
instances (admins write; users read their own)."""

from __future__ import annotations

import asyncio
import socket
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from arq.connections import ArqRedis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.engine.storage_access import driver_config
from app.models import BackupStorage, Hypervisor, Worker
from app.queues import hypervisor_queue
from app.security import SecretBox
from app.storages.schemas import SECRET_FIELDS
from tests.api.helpers import (
    admin_with_headers,
    assert_page,
    assert_problem,
    create_storage,
    user_with_headers,
)
from tests.factories import create_hypervisor, create_instance, create_location, create_user

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


# --- locations --------------------------------------------------------------------------------


async def test_location_crud_with_decimal_string_price(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    created = await client.post(
        "/locations",
        json={"name": "Frankfurt", "backup_price_per_gb_month": "0.05"},
        headers=headers,
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["name"] == "Frankfurt"
    assert body["backup_price_per_gb_month"] == "0.05"
    loc_id = body["id"]

    read = (await client.get(f"/locations/{loc_id}", headers=headers)).json()
    assert read["backup_price_per_gb_month"] == "0.05"

    patched = await client.patch(
        f"/locations/{loc_id}", json={"backup_price_per_gb_month": None}, headers=headers
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["backup_price_per_gb_month"] is None
    assert patched.json()["name"] == "Frankfurt"

    listed = (await client.get("/locations", headers=headers)).json()
    assert loc_id in [loc["id"] for loc in listed["items"]]

    assert (await client.delete(f"/locations/{loc_id}", headers=headers)).status_code == 204
    assert_problem(await client.get(f"/locations/{loc_id}", headers=headers), 404)


async def test_location_price_without_pricing_is_null(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    created = await client.post("/locations", json={"name": "Nowhere"}, headers=headers)
    assert created.status_code == 201
    assert created.json()["backup_price_per_gb_month"] is None


async def test_location_duplicate_name_is_409(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    await create_location(session, name="Dup")
    assert_problem(await client.post("/locations", json={"name": "Dup"}, headers=headers), 409)


async def test_location_negative_price_is_422(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    response = await client.post(
        "/locations", json={"name": "X", "backup_price_per_gb_month": "-1"}, headers=headers
    )
    assert_problem(response, 422, field="backup_price_per_gb_month")


async def test_location_with_hypervisors_cannot_be_deleted(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    hv = await create_hypervisor(session)
    assert_problem(await client.delete(f"/locations/{hv.location_id}", headers=headers), 409)


# --- backup storages --------------------------------------------------------------------------

VALID_CONFIGS: dict[str, dict[str, Any]] = {
    "local": {"path": "/srv/backups"},
    "nfs": {"path": "/mnt/nfs", "server": "nfs.example.com", "export": "/exports/b"},
    "s3": {
        "bucket": "my-backups",
        "access_key_id": "AKIAEXAMPLE",
        "secret_access_key": "s3-secret-plaintext-value",
        "endpoint_url": "https://minio.example.com",
    },
    "sftp": {
        "host": "sftp.example.com",
        "username": "backup",
        "path": "/data",
        "password": "sftp-secret-plaintext-value",
        "host_key": HOST_KEY,
    },
    "ftp": {
        "host": "ftp.example.com",
        "username": "backup",
        "password": "ftp-secret-plaintext-value",
    },
}
SECRETS = {
    "local": {},
    "nfs": {},
    "s3": {"secret_access_key": "s3-secret-plaintext-value"},
    "sftp": {"password": "sftp-secret-plaintext-value"},
    "ftp": {"password": "ftp-secret-plaintext-value"},
}


@pytest.mark.parametrize("kind", sorted(VALID_CONFIGS))
async def test_storage_of_each_kind_is_created_and_secrets_never_returned(
    client: httpx.AsyncClient, session: AsyncSession, kind: str
) -> None:
    _, headers = await admin_with_headers(session)
    payload = {"name": f"{kind}-store", "kind": kind, "config": VALID_CONFIGS[kind]}
    created = await client.post("/backup-storages", json=payload, headers=headers)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["kind"] == kind
    assert body["status"] == "unknown"
    assert body["secrets_set"] == sorted(SECRETS[kind])
    for name, secret in SECRETS[kind].items():
        assert name not in body["config"]
        assert secret not in created.text
    responses = [
        await client.get(f"/backup-storages/{body['id']}", headers=headers),
        await client.get("/backup-storages", headers=headers),
    ]
    for response in responses:
        assert response.status_code == 200
        for secret in SECRETS[kind].values():
            assert secret not in response.text

    row = (
        await session.execute(
            text("SELECT config::text, secrets_encrypted FROM backup_storages WHERE id = :id"),
            {"id": uuid.UUID(body["id"])},
        )
    ).one()
    config_text, encrypted = row
    for secret in SECRETS[kind].values():
        assert secret not in config_text
        assert encrypted is not None and secret not in encrypted
    if not SECRETS[kind]:
        assert encrypted is None


@pytest.mark.parametrize(
    ("kind", "config", "field"),
    [
        ("local", {"path": "relative/dir"}, "config.path"),
        ("local", {}, "config.path"),
        ("local", {"path": "/a/../etc"}, "config.path"),
        ("local", {"path": "/ok", "surprise": 1}, "config.surprise"),
        ("nfs", {"server": "x"}, "config.path"),
        ("s3", {**VALID_CONFIGS["s3"], "bucket": "Bad_Bucket!"}, "config.bucket"),
        ("s3", {k: v for k, v in VALID_CONFIGS["s3"].items() if k != "bucket"}, "config.bucket"),
        ("s3", {**VALID_CONFIGS["s3"], "endpoint_url": "ftp://x"}, "config.endpoint_url"),
        (
            "s3",
            {k: v for k, v in VALID_CONFIGS["s3"].items() if k != "secret_access_key"},
            "config.secret_access_key",
        ),
        ("sftp", {**VALID_CONFIGS["sftp"], "port": 70000}, "config.port"),
        ("sftp", {**VALID_CONFIGS["sftp"], "host_key": "not a key"}, "config"),
        ("ftp", {**VALID_CONFIGS["ftp"], "path": "rel"}, "config.path"),
        (
            "ftp",
            {k: v for k, v in VALID_CONFIGS["ftp"].items() if k != "password"},
            "config.password",
        ),
    ],
)
async def test_storage_bad_config_is_422_naming_the_field(
    client: httpx.AsyncClient, session: AsyncSession, kind: str, config: dict[str, Any], field: str
) -> None:
    _, headers = await admin_with_headers(session)
    payload = {"name": "bad", "kind": kind, "config": config}
    response = await client.post("/backup-storages", json=payload, headers=headers)
    body = assert_problem(response, 422)
    fields = [e["field"] for e in body["errors"]]
    assert field in fields, fields


async def test_sftp_storage_needs_password_or_private_key(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    config = {k: v for k, v in VALID_CONFIGS["sftp"].items() if k != "password"}
    response = await client.post(
        "/backup-storages", json={"name": "s", "kind": "sftp", "config": config}, headers=headers
    )
    body = assert_problem(response, 422)
    assert "password or private_key" in body["detail"]
    with_key = {**config, "private_key": "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n"}
    ok = await client.post(
        "/backup-storages", json={"name": "s", "kind": "sftp", "config": with_key}, headers=headers
    )
    assert ok.status_code == 201, ok.text
    assert ok.json()["secrets_set"] == ["private_key"]


async def test_unknown_storage_kind_is_422(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    response = await client.post(
        "/backup-storages",
        json={"name": "x", "kind": "tape", "config": {"path": "/x"}},
        headers=headers,
    )
    assert_problem(response, 422, field="kind")


async def test_storage_patch_keeps_secrets_not_resent(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    created = (
        await client.post(
            "/backup-storages",
            json={"name": "s3", "kind": "s3", "config": VALID_CONFIGS["s3"]},
            headers=headers,
        )
    ).json()
    patched = await client.patch(
        f"/backup-storages/{created['id']}",
        json={"name": "renamed", "config": {"prefix": "elsewhere/"}},
        headers=headers,
    )
    assert patched.status_code == 200, patched.text
    body = patched.json()
    assert body["name"] == "renamed"
    assert body["config"]["prefix"] == "elsewhere/"
    assert body["config"]["access_key_id"] == "AKIAEXAMPLE"
    assert body["secrets_set"] == ["secret_access_key"]
    assert "s3-secret-plaintext-value" not in patched.text

    from app.engine.storage_access import driver_config
    from app.models import BackupStorage

    row = await session.get(BackupStorage, uuid.UUID(created["id"]))
    assert row is not None
    await session.refresh(row)
    assert driver_config(row)["secret_access_key"] == "s3-secret-plaintext-value"


async def test_storage_patch_with_bad_config_is_422_naming_config_field(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    storage = await create_storage(session)
    response = await client.patch(
        f"/backup-storages/{storage.id}", json={"config": {"path": "nope"}}, headers=headers
    )
    assert_problem(response, 422, field="config.path")


async def test_storage_removing_the_only_sftp_secret_is_422(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    created = (
        await client.post(
            "/backup-storages",
            json={"name": "sf", "kind": "sftp", "config": VALID_CONFIGS["sftp"]},
            headers=headers,
        )
    ).json()
    response = await client.patch(
        f"/backup-storages/{created['id']}", json={"config": {"password": None}}, headers=headers
    )
    assert_problem(response, 422)


async def test_storage_duplicate_name_is_409(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    await create_storage(session, name="taken")
    response = await client.post(
        "/backup-storages",
        json={"name": "taken", "kind": "local", "config": {"path": "/srv/backups/x"}},
        headers=headers,
    )
    assert_problem(response, 409)


async def test_storage_used_by_hypervisor_cannot_be_deleted(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    storage = await create_storage(session)
    await create_hypervisor(session, backup_storage_id=storage.id)
    assert_problem(await client.delete(f"/backup-storages/{storage.id}", headers=headers), 409)
    unused = await create_storage(session)
    assert (
        await client.delete(f"/backup-storages/{unused.id}", headers=headers)
    ).status_code == 204


async def test_storage_check_answers_202_at_once_and_queues_a_job_without_connecting(
    client: httpx.AsyncClient, session: AsyncSession, arq_redis: ArqRedis
) -> None:
    _, headers = await admin_with_headers(session)
    with socket.socket() as listener:  # a storage server that would hold a connection forever
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        config = {**VALID_CONFIGS["ftp"], "host": "127.0.0.1", "port": listener.getsockname()[1]}
        storage = await create_storage(session, "ftp", config, {"password": "pw"})
        hypervisor = await _served_hypervisor(session, storage.id)
        response = await asyncio.wait_for(
            client.post(f"/backup-storages/{storage.id}/check", headers=headers), timeout=5
        )
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "checking"
    assert response.json()["last_error"] is None
    queued = await arq_redis.zscore(hypervisor_queue(hypervisor.id), f"check:{storage.id}")
    assert queued is not None
    read = (await client.get(f"/backup-storages/{storage.id}", headers=headers)).json()
    assert read["status"] == "checking"


async def _served_hypervisor(session: AsyncSession, storage_id: uuid.UUID) -> Hypervisor:
    """A hypervisor using the storage, with a live worker."""
    hypervisor = await create_hypervisor(session, backup_storage_id=storage_id)
    now = datetime.now(UTC)
    worker = Worker(id=uuid.uuid4(), hypervisor_id=hypervisor.id, host="h", pid=1, started_at=now)
    worker.seen_at = now
    session.add(worker)
    await session.flush()
    return hypervisor


async def test_storage_check_needs_a_hypervisor_whose_worker_runs(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    storage = await create_storage(session)
    alone = await client.post(f"/backup-storages/{storage.id}/check", headers=headers)
    assert "attach it to one first" in assert_problem(alone, 409)["detail"]
    hypervisor = await create_hypervisor(session, backup_storage_id=storage.id)
    unserved = await client.post(f"/backup-storages/{storage.id}/check", headers=headers)
    detail = assert_problem(unserved, 409)["detail"]
    assert f"No worker is running for hypervisor {hypervisor.name}" in detail
    read = (await client.get(f"/backup-storages/{storage.id}", headers=headers)).json()
    assert read["status"] == "unknown"


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        ("local", "/etc"),
        ("local", "/srv/backups-elsewhere"),
        ("nfs", "/var/lib"),
    ],
)
async def test_storage_path_outside_the_storage_roots_is_422(
    client: httpx.AsyncClient, session: AsyncSession, kind: str, path: str
) -> None:
    _, headers = await admin_with_headers(session)
    payload = {"name": "p", "kind": kind, "config": {**VALID_CONFIGS[kind], "path": path}}
    body = assert_problem(await client.post("/backup-storages", json=payload, headers=headers), 422)
    assert [e["field"] for e in body["errors"]] == ["config.path"]
    assert "/srv/backups" in body["detail"]

    inside = {**payload, "config": {**payload["config"], "path": "/srv/backups/p"}}
    created = await client.post("/backup-storages", json=inside, headers=headers)
    assert created.status_code == 201, created.text
    moved = await client.patch(
        f"/backup-storages/{created.json()['id']}", json={"config": {"path": path}}, headers=headers
    )
    assert_problem(moved, 422, field="config.path")


@pytest.mark.parametrize(
    ("kind", "change"),
    [
        ("s3", {"endpoint_url": "https://attacker.example.com"}),
        ("s3", {"bucket": "someone-elses-bucket"}),
        ("s3", {"access_key_id": "AKIAOTHER"}),
        ("s3", {"region": "eu-west-1"}),
        ("sftp", {"host": "attacker.example.com"}),
        ("sftp", {"port": 2222}),
        ("sftp", {"username": "other"}),
        ("sftp", {"host_key": HOST_KEY.replace("AAAAC3", "AAAAC4")}),
        ("ftp", {"host": "attacker.example.com"}),
        ("ftp", {"port": 2121}),
        ("ftp", {"username": "other"}),
        ("ftp", {"tls": True}),
    ],
)
async def test_changing_where_secrets_go_needs_them_again(
    client: httpx.AsyncClient, session: AsyncSession, kind: str, change: dict[str, Any]
) -> None:
    _, headers = await admin_with_headers(session)
    payload = {"name": "dest", "kind": kind, "config": VALID_CONFIGS[kind]}
    storage_id = (await client.post("/backup-storages", json=payload, headers=headers)).json()["id"]
    refused = await client.patch(
        f"/backup-storages/{storage_id}", json={"config": change}, headers=headers
    )
    body = assert_problem(refused, 422)
    secret_fields = sorted(f"config.{name}" for name in SECRET_FIELDS[kind])
    assert sorted(e["field"] for e in body["errors"]) == secret_fields
    assert next(iter(change)) in body["detail"]

    again = {name: f"new-{name}" for name in SECRETS[kind]}
    accepted = await client.patch(
        f"/backup-storages/{storage_id}", json={"config": {**change, **again}}, headers=headers
    )
    assert accepted.status_code == 200, accepted.text
    row = await session.get(BackupStorage, uuid.UUID(storage_id))
    assert row is not None
    await session.refresh(row)
    assert {k: driver_config(row)[k] for k in again} == again


async def test_moving_an_sftp_storage_keeps_only_the_secrets_given_again(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    config = {**VALID_CONFIGS["sftp"], "private_key": "-----BEGIN OPENSSH PRIVATE KEY-----\n"}
    payload = {"name": "both", "kind": "sftp", "config": config}
    created = (await client.post("/backup-storages", json=payload, headers=headers)).json()
    assert created["secrets_set"] == ["password", "private_key"]
    moved = await client.patch(
        f"/backup-storages/{created['id']}",
        json={"config": {"host": "new.example.com", "password": "new-pw"}},
        headers=headers,
    )
    assert moved.status_code == 200, moved.text
    assert moved.json()["secrets_set"] == ["password"]


async def test_storage_secrets_sealed_with_another_key_are_409_naming_the_storages(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    other = SecretBox("the-key-before-someone-changed-IBP_SECRET_KEY")
    ftp = {k: v for k, v in VALID_CONFIGS["ftp"].items() if k != "password"}
    lost = [await create_storage(session, "ftp", ftp, name=f"lost-{n}") for n in range(2)]
    for storage in lost:
        storage.secrets_encrypted = other.encrypt({"password": "pw"})
    fine = await create_storage(session, name="fine")
    await session.flush()

    for response in (
        await client.get(f"/backup-storages/{lost[0].id}", headers=headers),
        await client.post(f"/backup-storages/{lost[0].id}/check", headers=headers),
        await client.patch(
            f"/backup-storages/{lost[0].id}", json={"config": {"path": "/x"}}, headers=headers
        ),
    ):
        body = assert_problem(response, 409)
        assert body["title"] == "Storage secrets cannot be decrypted"
        assert f"'lost-0' ({lost[0].id})" in body["detail"]
        assert "current IBP_SECRET_KEY" in body["detail"]
    listed = assert_problem(await client.get("/backup-storages", headers=headers), 409)
    assert "'lost-0'" in listed["detail"] and "'lost-1'" in listed["detail"]
    assert "'fine'" not in listed["detail"]
    assert (await client.get(f"/backup-storages/{fine.id}", headers=headers)).status_code == 200

    # Giving the secrets again seals them with the current key.
    for storage in lost:
        fixed = await client.patch(
            f"/backup-storages/{storage.id}",
            json={"config": {"password": "given-again"}},
            headers=headers,
        )
        assert fixed.status_code == 200, fixed.text
        assert fixed.json()["secrets_set"] == ["password"]
    assert (await client.get("/backup-storages", headers=headers)).status_code == 200


# --- hypervisors ------------------------------------------------------------------------------


async def test_hypervisor_crud_with_defaults(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    location = await create_location(session)
    storage = await create_storage(session)
    created = await client.post(
        "/hypervisors",
        json={"name": "hv1", "location_id": str(location.id), "backup_storage_id": str(storage.id)},
        headers=headers,
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["max_concurrent_backups"] == 2
    assert body["libvirt_uri"] == "qemu:///system"
    assert body["location_id"] == str(location.id)
    assert body["backup_storage_id"] == str(storage.id)
    assert body["scratch_dir"].startswith("/")

    patched = await client.patch(
        f"/hypervisors/{body['id']}",
        json={"max_concurrent_backups": 4, "backup_storage_id": None},
        headers=headers,
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["max_concurrent_backups"] == 4
    assert patched.json()["backup_storage_id"] is None

    assert (await client.delete(f"/hypervisors/{body['id']}", headers=headers)).status_code == 204
    assert_problem(await client.get(f"/hypervisors/{body['id']}", headers=headers), 404)


async def test_hypervisor_with_unknown_location_is_422(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    response = await client.post(
        "/hypervisors", json={"name": "hv", "location_id": str(uuid.uuid4())}, headers=headers
    )
    assert_problem(response, 422, field="location_id")
    hv = await create_hypervisor(session)
    response = await client.patch(
        f"/hypervisors/{hv.id}", json={"backup_storage_id": str(uuid.uuid4())}, headers=headers
    )
    assert_problem(response, 422, field="backup_storage_id")


async def test_hypervisor_bounds_are_validated(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    location = await create_location(session)
    for payload, field in (
        ({"max_concurrent_backups": 0}, "max_concurrent_backups"),
        ({"scratch_dir": "relative"}, "scratch_dir"),
        # Too long for the backup's NBD socket in it (a unix socket's path is short).
        ({"scratch_dir": "/" + "s" * 61}, "scratch_dir"),
        ({"libvirt_uri": "not a uri"}, "libvirt_uri"),
    ):
        response = await client.post(
            "/hypervisors",
            json={"name": "hv", "location_id": str(location.id), **payload},
            headers=headers,
        )
        assert_problem(response, 422, field=field)


async def test_hypervisor_with_instances_cannot_be_deleted(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    user = await create_user(session)
    instance = await create_instance(session, user)
    response = await client.delete(f"/hypervisors/{instance.hypervisor_id}", headers=headers)
    assert_problem(response, 409)


# --- instances --------------------------------------------------------------------------------


def _instance_payload(
    owner_id: uuid.UUID, hypervisor_id: uuid.UUID, **extra: Any
) -> dict[str, Any]:
    return {
        "name": "web-1",
        "owner_id": str(owner_id),
        "hypervisor_id": str(hypervisor_id),
        "domain_name": f"dom-{uuid.uuid4().hex[:8]}",
        "disks": [
            {"target": "vda", "boot": True, "size_bytes": 10 * 1024**3},
            {"target": "vdb", "boot": False, "size_bytes": 20 * 1024**3},
        ],
        **extra,
    }


async def test_admin_creates_updates_and_deletes_an_instance(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    owner = await create_user(session)
    hv = await create_hypervisor(session)
    created = await client.post(
        "/instances", json=_instance_payload(owner.id, hv.id), headers=headers
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["owner_id"] == str(owner.id)
    assert body["status"] == "deployed"
    assert body["backup_policy_id"] is None
    assert body["disks"] == [
        {"target": "vda", "boot": True, "size_bytes": 10 * 1024**3},
        {"target": "vdb", "boot": False, "size_bytes": 20 * 1024**3},
    ]
    patched = await client.patch(
        f"/instances/{body['id']}",
        json={"status": "suspended", "disks": [{"target": "sda", "boot": True, "size_bytes": 1}]},
        headers=headers,
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["status"] == "suspended"
    assert [d["target"] for d in patched.json()["disks"]] == ["sda"]
    assert (await client.delete(f"/instances/{body['id']}", headers=headers)).status_code == 204
    assert_problem(await client.get(f"/instances/{body['id']}", headers=headers), 404)


@pytest.mark.parametrize(
    "disks",
    [
        [{"target": "vda", "boot": False, "size_bytes": 1}],
        [
            {"target": "vda", "boot": True, "size_bytes": 1},
            {"target": "vdb", "boot": True, "size_bytes": 1},
        ],
        [
            {"target": "vda", "boot": True, "size_bytes": 1},
            {"target": "vda", "boot": False, "size_bytes": 1},
        ],
    ],
)
async def test_instance_needs_exactly_one_boot_disk(
    client: httpx.AsyncClient, session: AsyncSession, disks: list[dict[str, Any]]
) -> None:
    _, headers = await admin_with_headers(session)
    owner = await create_user(session)
    hv = await create_hypervisor(session)
    response = await client.post(
        "/instances", json=_instance_payload(owner.id, hv.id, disks=disks), headers=headers
    )
    assert_problem(response, 422, field="disks")
    instance = await create_instance(session, owner)
    response = await client.patch(
        f"/instances/{instance.id}", json={"disks": disks}, headers=headers
    )
    assert_problem(response, 422, field="disks")


async def test_instance_with_unknown_owner_or_hypervisor_is_422(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    owner = await create_user(session)
    hv = await create_hypervisor(session)
    response = await client.post(
        "/instances", json=_instance_payload(uuid.uuid4(), hv.id), headers=headers
    )
    assert_problem(response, 422, field="owner_id")
    response = await client.post(
        "/instances", json=_instance_payload(owner.id, uuid.uuid4()), headers=headers
    )
    assert_problem(response, 422, field="hypervisor_id")


async def test_instance_domain_name_is_unique_per_hypervisor(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    owner = await create_user(session)
    existing = await create_instance(session, owner)
    payload = _instance_payload(owner.id, existing.hypervisor_id, domain_name=existing.domain_name)
    assert_problem(await client.post("/instances", json=payload, headers=headers), 409)


async def test_user_lists_and_reads_only_own_instances(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user, headers = await user_with_headers(session)
    other = await create_user(session)
    mine = await create_instance(session, user)
    theirs = await create_instance(session, other)
    listed = await client.get("/instances", headers=headers)
    assert listed.status_code == 200
    assert_page(listed.json(), total=1)
    assert [i["id"] for i in listed.json()["items"]] == [str(mine.id)]
    assert (await client.get(f"/instances/{mine.id}", headers=headers)).status_code == 200
    assert_problem(await client.get(f"/instances/{theirs.id}", headers=headers), 404)
    # ?owner_id= cannot widen a user's view.
    widened = await client.get("/instances", params={"owner_id": str(other.id)}, headers=headers)
    assert widened.status_code == 200
    assert widened.json()["total"] == 0


async def test_admin_lists_all_instances_and_filters_by_owner(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    a = await create_user(session)
    b = await create_user(session)
    await create_instance(session, a)
    await create_instance(session, b)
    await create_instance(session, b, status="stopped")
    everything = (await client.get("/instances", headers=headers)).json()
    assert everything["total"] >= 3
    only_b = (
        await client.get("/instances", params={"owner_id": str(b.id)}, headers=headers)
    ).json()
    assert only_b["total"] == 2
    assert {i["owner_id"] for i in only_b["items"]} == {str(b.id)}
    stopped = (
        await client.get(
            "/instances", params={"owner_id": str(b.id), "status": "stopped"}, headers=headers
        )
    ).json()
    assert stopped["total"] == 1


async def test_users_cannot_write_instances(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user, headers = await user_with_headers(session)
    own = await create_instance(session, user)
    hv = await create_hypervisor(session)
    assert_problem(
        await client.post("/instances", json=_instance_payload(user.id, hv.id), headers=headers),
        403,
    )
    assert_problem(
        await client.patch(f"/instances/{own.id}", json={"name": "x"}, headers=headers), 403
    )
    assert_problem(await client.delete(f"/instances/{own.id}", headers=headers), 403)


async def test_changing_instance_owner_detaches_it_from_its_policy(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    from tests.factories import create_policy

    _, headers = await admin_with_headers(session)
    owner = await create_user(session)
    other = await create_user(session)
    policy = await create_policy(session, owner)
    instance = await create_instance(session, owner, backup_policy_id=policy.id)
    response = await client.patch(
        f"/instances/{instance.id}", json={"owner_id": str(other.id)}, headers=headers
    )
    assert response.status_code == 200, response.text
    assert response.json()["owner_id"] == str(other.id)
    assert response.json()["backup_policy_id"] is None


async def test_an_instance_with_backups_changes_owner_only_with_its_backups_on_purpose(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    """Backups hold the previous owner's data as it was: without transfer_backups the change
    is refused and the new owner sees nothing; with it, the backups go along."""
    from tests.factories import create_backup

    _, admin = await admin_with_headers(session)
    owner, owner_headers = await user_with_headers(session)
    other, other_headers = await user_with_headers(session)
    instance = await create_instance(session, owner)
    backup = await create_backup(session, instance)
    refused = await client.patch(
        f"/instances/{instance.id}", json={"owner_id": str(other.id)}, headers=admin
    )
    assert_problem(refused, 409)
    assert "transfer_backups" in refused.json()["detail"]
    assert (await client.get(f"/backups/{backup.id}", headers=owner_headers)).status_code == 200
    assert (await client.get(f"/backups/{backup.id}", headers=other_headers)).status_code == 404
    moved = await client.patch(
        f"/instances/{instance.id}",
        json={"owner_id": str(other.id), "transfer_backups": True},
        headers=admin,
    )
    assert moved.status_code == 200, moved.text
    assert (await client.get(f"/backups/{backup.id}", headers=other_headers)).status_code == 200
    assert (await client.get(f"/backups/{backup.id}", headers=owner_headers)).status_code == 404


async def test_instance_with_backups_cannot_be_deleted(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    from tests.factories import create_backup

    _, headers = await admin_with_headers(session)
    owner = await create_user(session)
    instance = await create_instance(session, owner)
    await create_backup(session, instance)
    assert_problem(await client.delete(f"/instances/{instance.id}", headers=headers), 409)
