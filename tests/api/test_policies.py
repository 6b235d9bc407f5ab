"""Backup policies: create/read/list/patch/delete, schedule rules, ownership, planning."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession

import app.policies.service as policy_service
from app.models import Backup, Instance
from tests.api.helpers import admin_with_headers, assert_page, assert_problem, user_with_headers
from tests.factories import create_backup, create_instance, create_policy, create_user

READ_FIELDS = {
    "id",
    "owner_id",
    "name",
    "status",
    "schedule",
    "schedule_summary",
    "schedule_description",
    "timezone",
    "max_incremental_chain",
    "retention_count",
    "backup_device",
    "instance_count",
    "at_risk_count",
    "unprotected_count",
    "expected_backup_interval_hours",
    "last_error",
    "last_error_at",
    "last_error_resolved_at",
    "next_run_at",
    "skipped_runs",
    "last_skip_reason",
    "created_at",
    "updated_at",
}
DETAIL_FIELDS = {"estimate", "stored_bytes"}  # GET /backup-policies/{id} only


def daily(hour: int = 2, **extra: Any) -> dict[str, Any]:
    return {"name": "Daily prod", "schedule": {"frequency": "daily", "hour": hour}, **extra}


async def test_create_policy_uses_defaults_and_returns_full_shape(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user, headers = await user_with_headers(session, timezone="Europe/Berlin")
    response = await client.post("/backup-policies", json=daily(), headers=headers)
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == READ_FIELDS
    assert body["owner_id"] == str(user.id)
    assert body["status"] == "active"
    assert body["schedule"] == {"frequency": "daily", "hour": 2, "day_of_week": None}
    assert body["schedule_summary"] == "Daily at 2:00 AM"
    assert body["timezone"] == "Europe/Berlin"
    assert body["max_incremental_chain"] == 6
    assert body["retention_count"] == 3
    assert body["backup_device"] == "primary"
    assert body["instance_count"] == 0
    assert body["skipped_runs"] == 0
    assert body["last_error"] is None
    assert body["next_run_at"] is not None
    read = await client.get(f"/backup-policies/{body['id']}", headers=headers)
    assert read.status_code == 200
    detail = read.json()
    # The detail is the same read, then its estimate and what it stores (test_estimates.py).
    assert list(detail)[: len(body)] == list(body)
    assert {key: detail[key] for key in body} == body
    assert set(detail) - READ_FIELDS == DETAIL_FIELDS


@pytest.mark.parametrize(
    ("schedule", "summary"),
    [
        ({"frequency": "daily", "hour": 2}, "Daily at 2:00 AM"),
        ({"frequency": "daily", "hour": 0}, "Daily at 12:00 AM"),
        ({"frequency": "daily", "hour": 12}, "Daily at 12:00 PM"),
        ({"frequency": "daily", "hour": 23}, "Daily at 11:00 PM"),
        (
            {"frequency": "weekly", "hour": 3, "day_of_week": "monday"},
            "Weekly on Monday at 3:00 AM",
        ),
        (
            {"frequency": "weekly", "hour": 13, "day_of_week": "sunday"},
            "Weekly on Sunday at 1:00 PM",
        ),
    ],
)
async def test_schedule_summary(
    client: httpx.AsyncClient, session: AsyncSession, schedule: dict[str, Any], summary: str
) -> None:
    _, headers = await user_with_headers(session)
    response = await client.post(
        "/backup-policies", json={"name": "p", "schedule": schedule}, headers=headers
    )
    assert response.status_code == 201, response.text
    assert response.json()["schedule_summary"] == summary


@pytest.mark.parametrize(
    "schedule",
    [
        {"frequency": "weekly", "hour": 3},
        {"frequency": "weekly", "hour": 3, "day_of_week": None},
        {"frequency": "daily", "hour": 3, "day_of_week": "monday"},
        {"frequency": "weekly", "hour": 3, "day_of_week": "funday"},
        {"frequency": "hourly", "hour": 3},
        {"frequency": "daily", "hour": 24},
        {"frequency": "daily", "hour": -1},
        {"frequency": "daily"},
    ],
)
async def test_invalid_schedule_is_422_naming_schedule(
    client: httpx.AsyncClient, session: AsyncSession, schedule: dict[str, Any]
) -> None:
    _, headers = await user_with_headers(session)
    response = await client.post(
        "/backup-policies", json={"name": "p", "schedule": schedule}, headers=headers
    )
    body = assert_problem(response, 422)
    assert any(e["field"].startswith("schedule") for e in body["errors"]), body


@pytest.mark.parametrize(
    ("field", "good", "bad"),
    [
        ("max_incremental_chain", [0, 30], [-1, 31]),
        ("retention_count", [1, 365], [0, 366]),
    ],
)
async def test_bounds(
    client: httpx.AsyncClient, session: AsyncSession, field: str, good: list[int], bad: list[int]
) -> None:
    _, headers = await user_with_headers(session)
    for value in good:
        response = await client.post(
            "/backup-policies", json=daily(**{field: value}), headers=headers
        )
        assert response.status_code == 201, response.text
        assert response.json()[field] == value
    for value in bad:
        response = await client.post(
            "/backup-policies", json=daily(**{field: value}), headers=headers
        )
        assert_problem(response, 422, field=field)
    policy_id = (
        response.json().get("id")
        or (await client.post("/backup-policies", json=daily(), headers=headers)).json()["id"]
    )
    for value in bad:
        response = await client.patch(
            f"/backup-policies/{policy_id}", json={field: value}, headers=headers
        )
        assert_problem(response, 422, field=field)


async def test_backup_device_all_and_invalid(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await user_with_headers(session)
    ok = await client.post("/backup-policies", json=daily(backup_device="all"), headers=headers)
    assert ok.status_code == 201 and ok.json()["backup_device"] == "all"
    bad = await client.post("/backup-policies", json=daily(backup_device="boot"), headers=headers)
    assert_problem(bad, 422, field="backup_device")


async def test_empty_name_is_422(client: httpx.AsyncClient, session: AsyncSession) -> None:
    _, headers = await user_with_headers(session)
    response = await client.post(
        "/backup-policies",
        json={"name": "", "schedule": {"frequency": "daily", "hour": 1}},
        headers=headers,
    )
    assert_problem(response, 422, field="name")


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        # Winter: New York is UTC-5, 2:00 AM local is 07:00 UTC.
        (datetime(2026, 1, 15, 12, 0, tzinfo=UTC), datetime(2026, 1, 16, 7, 0, tzinfo=UTC)),
        # Summer: New York is UTC-4, 2:00 AM local is 06:00 UTC.
        (datetime(2026, 7, 15, 12, 0, tzinfo=UTC), datetime(2026, 7, 16, 6, 0, tzinfo=UTC)),
        # Before today's run: it is still today.
        (datetime(2026, 1, 15, 5, 0, tzinfo=UTC), datetime(2026, 1, 15, 7, 0, tzinfo=UTC)),
    ],
)
async def test_next_run_at_is_the_local_hour_in_the_owners_zone(
    client: httpx.AsyncClient,
    session: AsyncSession,
    monkeypatch: pytest.MonkeyPatch,
    now: datetime,
    expected: datetime,
) -> None:
    monkeypatch.setattr(policy_service, "_now", lambda: now)
    _, headers = await user_with_headers(session, timezone="America/New_York")
    response = await client.post("/backup-policies", json=daily(2), headers=headers)
    assert response.status_code == 201, response.text
    assert datetime.fromisoformat(response.json()["next_run_at"]) == expected


async def test_patch_schedule_replans_next_run(
    client: httpx.AsyncClient, session: AsyncSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(policy_service, "_now", lambda: datetime(2026, 1, 15, 12, tzinfo=UTC))
    _, headers = await user_with_headers(session, timezone="Asia/Tokyo")  # UTC+9
    created = (await client.post("/backup-policies", json=daily(2), headers=headers)).json()
    patched = await client.patch(
        f"/backup-policies/{created['id']}",
        json={"schedule": {"frequency": "weekly", "hour": 23, "day_of_week": "friday"}},
        headers=headers,
    )
    assert patched.status_code == 200, patched.text
    body = patched.json()
    assert body["schedule_summary"] == "Weekly on Friday at 11:00 PM"
    # 2026-01-15 12:00 UTC is 21:00 in Tokyo; 23:00 local today is 14:00 UTC.
    assert datetime.fromisoformat(body["next_run_at"]) == datetime(2026, 1, 15, 14, tzinfo=UTC)


async def test_patch_changes_only_given_fields(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await user_with_headers(session)
    created = (
        await client.post(
            "/backup-policies",
            json=daily(5, retention_count=7, backup_device="all"),
            headers=headers,
        )
    ).json()
    patched = await client.patch(
        f"/backup-policies/{created['id']}",
        json={"name": "Renamed", "max_incremental_chain": 0},
        headers=headers,
    )
    assert patched.status_code == 200, patched.text
    body = patched.json()
    assert body["name"] == "Renamed"
    assert body["max_incremental_chain"] == 0
    assert body["retention_count"] == 7
    assert body["backup_device"] == "all"
    assert body["schedule"] == created["schedule"]
    assert body["next_run_at"] == created["next_run_at"]


async def test_patch_weekly_without_day_is_422(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await user_with_headers(session)
    created = (await client.post("/backup-policies", json=daily(), headers=headers)).json()
    response = await client.patch(
        f"/backup-policies/{created['id']}",
        json={"schedule": {"frequency": "weekly", "hour": 2}},
        headers=headers,
    )
    assert_problem(response, 422, field="schedule")


async def test_patch_status_error_is_422(client: httpx.AsyncClient, session: AsyncSession) -> None:
    _, headers = await user_with_headers(session)
    created = (await client.post("/backup-policies", json=daily(), headers=headers)).json()
    response = await client.patch(
        f"/backup-policies/{created['id']}", json={"status": "error"}, headers=headers
    )
    assert_problem(response, 422, field="status")


async def test_pause_and_resume(
    client: httpx.AsyncClient, session: AsyncSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, headers = await user_with_headers(session)
    created = (await client.post("/backup-policies", json=daily(), headers=headers)).json()
    url = f"/backup-policies/{created['id']}"
    paused = await client.patch(url, json={"status": "paused"}, headers=headers)
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    listed = await client.get("/backup-policies", params={"status": "paused"}, headers=headers)
    assert [p["id"] for p in listed.json()["items"]] == [created["id"]]
    # Resuming plans from now, not from the old next run.
    later = datetime.now(UTC).replace(microsecond=0) + (
        datetime(2026, 1, 3, tzinfo=UTC) - datetime(2026, 1, 1, tzinfo=UTC)
    )
    monkeypatch.setattr(policy_service, "_now", lambda: later)
    resumed = await client.patch(url, json={"status": "active"}, headers=headers)
    assert resumed.status_code == 200 and resumed.json()["status"] == "active"
    assert datetime.fromisoformat(resumed.json()["next_run_at"]) > later


async def test_resuming_a_policy_in_error_makes_it_active(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user, headers = await user_with_headers(session)
    policy = await create_policy(session, user, status="error", last_error="disk locked")
    response = await client.patch(
        f"/backup-policies/{policy.id}", json={"status": "active"}, headers=headers
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "active"


async def test_admin_creates_policy_for_another_user(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    owner, owner_headers = await user_with_headers(session, timezone="Asia/Tokyo")
    response = await client.post(
        "/backup-policies", json=daily(owner_id=str(owner.id)), headers=headers
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["owner_id"] == str(owner.id)
    assert body["timezone"] == "Asia/Tokyo"
    mine = await client.get(f"/backup-policies/{body['id']}", headers=owner_headers)
    assert mine.status_code == 200


async def test_admin_creating_policy_for_unknown_user_is_422(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    response = await client.post(
        "/backup-policies", json=daily(owner_id=str(uuid.uuid4())), headers=headers
    )
    assert_problem(response, 422, field="owner_id")


async def test_user_passing_someone_elses_owner_id_is_403(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user, headers = await user_with_headers(session)
    other = await create_user(session)
    response = await client.post(
        "/backup-policies", json=daily(owner_id=str(other.id)), headers=headers
    )
    assert_problem(response, 403)
    own = await client.post("/backup-policies", json=daily(owner_id=str(user.id)), headers=headers)
    assert own.status_code == 201


async def test_list_pagination_shape_and_limits(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user, headers = await user_with_headers(session)
    for _ in range(5):
        await create_policy(session, user)
    first = await client.get("/backup-policies", params={"limit": 2}, headers=headers)
    assert first.status_code == 200
    assert_page(first.json(), total=5, limit=2)
    assert len(first.json()["items"]) == 2
    last = await client.get("/backup-policies", params={"limit": 2, "offset": 4}, headers=headers)
    assert_page(last.json(), total=5, limit=2, offset=4)
    assert len(last.json()["items"]) == 1
    ids = {p["id"] for p in first.json()["items"]} | {p["id"] for p in last.json()["items"]}
    assert len(ids) == 3
    full = await client.get("/backup-policies", params={"limit": 200}, headers=headers)
    assert full.status_code == 200 and full.json()["limit"] == 200
    assert_problem(
        await client.get("/backup-policies", params={"limit": 201}, headers=headers),
        422,
        field="limit",
    )
    assert_problem(
        await client.get("/backup-policies", params={"limit": 0}, headers=headers),
        422,
        field="limit",
    )
    assert_problem(
        await client.get("/backup-policies", params={"offset": -1}, headers=headers),
        422,
        field="offset",
    )


async def test_list_items_are_exactly_the_single_reads(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    """Each list item, built from plain columns, is the read endpoint's JSON, in order."""
    _, admin_headers = await admin_with_headers(session)
    owner, headers = await user_with_headers(session, timezone="America/New_York")
    weekly = await create_policy(
        session, owner, frequency="weekly", hour=15, day_of_week="friday", backup_device="all"
    )
    failing = await create_policy(
        session,
        owner,
        status="error",
        last_error="Storage unreachable: connection refused",
        last_error_at=datetime(2026, 3, 8, 7, 30, tzinfo=UTC),
        skipped_runs=2,
        last_skip_reason="overlap",
    )
    for _ in range(2):
        await create_instance(session, owner, backup_policy_id=weekly.id)
    for who in (headers, admin_headers):
        listed = (await client.get("/backup-policies", headers=who)).json()["items"]
        by_id = {item["id"]: item for item in listed}
        assert set(by_id) == {str(failing.id), str(weekly.id)}
        for item in listed:
            assert set(item) == READ_FIELDS
            read = (await client.get(f"/backup-policies/{item['id']}", headers=who)).json()
            assert set(read) == READ_FIELDS | DETAIL_FIELDS
            shown = {key: read[key] for key in item}
            assert shown == item and list(read)[: len(item)] == list(item)  # order too
    assert by_id[str(weekly.id)]["instance_count"] == 2
    assert by_id[str(weekly.id)]["schedule_summary"] == "Weekly on Friday at 3:00 PM"
    assert by_id[str(failing.id)]["last_error_at"] == "2026-03-08T07:30:00Z"


async def test_users_see_only_their_policies_and_admins_filter_by_owner(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, admin_headers = await admin_with_headers(session)
    a, a_headers = await user_with_headers(session)
    b, _ = await user_with_headers(session)
    pa = await create_policy(session, a)
    pb = await create_policy(session, b)
    mine = (await client.get("/backup-policies", headers=a_headers)).json()
    assert [p["id"] for p in mine["items"]] == [str(pa.id)]
    widened = await client.get(
        "/backup-policies", params={"owner_id": str(b.id)}, headers=a_headers
    )
    assert widened.json()["total"] == 0
    assert_problem(await client.get(f"/backup-policies/{pb.id}", headers=a_headers), 404)
    everything = (await client.get("/backup-policies", headers=admin_headers)).json()
    assert {str(pa.id), str(pb.id)} <= {p["id"] for p in everything["items"]}
    only_b = (
        await client.get("/backup-policies", params={"owner_id": str(b.id)}, headers=admin_headers)
    ).json()
    assert [p["id"] for p in only_b["items"]] == [str(pb.id)]


async def test_user_cannot_change_or_delete_someone_elses_policy(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await user_with_headers(session)
    other = await create_user(session)
    policy = await create_policy(session, other)
    url = f"/backup-policies/{policy.id}"
    assert_problem(await client.patch(url, json={"name": "mine"}, headers=headers), 404)
    assert_problem(await client.delete(url, headers=headers), 404)
    await session.refresh(policy)
    assert policy.name != "mine"


async def test_admin_edits_and_deletes_any_policy(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    owner = await create_user(session)
    policy = await create_policy(session, owner)
    url = f"/backup-policies/{policy.id}"
    patched = await client.patch(url, json={"retention_count": 10}, headers=headers)
    assert patched.status_code == 200 and patched.json()["retention_count"] == 10
    assert patched.json()["owner_id"] == str(owner.id)
    assert (await client.delete(url, headers=headers)).status_code == 204
    assert_problem(await client.get(url, headers=headers), 404)


async def test_instance_count_counts_attached_instances(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user, headers = await user_with_headers(session)
    policy = await create_policy(session, user)
    other_policy = await create_policy(session, user)
    for _ in range(3):
        await create_instance(session, user, backup_policy_id=policy.id)
    await create_instance(session, user, backup_policy_id=other_policy.id)
    await create_instance(session, user)
    read = (await client.get(f"/backup-policies/{policy.id}", headers=headers)).json()
    assert read["instance_count"] == 3
    listed = (await client.get("/backup-policies", headers=headers)).json()
    counts = {p["id"]: p["instance_count"] for p in listed["items"]}
    assert counts == {str(policy.id): 3, str(other_policy.id): 1}


async def test_delete_policy_detaches_instances_and_keeps_backups(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user, headers = await user_with_headers(session)
    policy = await create_policy(session, user)
    instance = await create_instance(session, user, backup_policy_id=policy.id)
    backup = await create_backup(session, instance)
    assert backup.policy_id == policy.id
    response = await client.delete(f"/backup-policies/{policy.id}", headers=headers)
    assert response.status_code == 204
    assert_problem(await client.get(f"/backup-policies/{policy.id}", headers=headers), 404)
    read = (await client.get(f"/instances/{instance.id}", headers=headers)).json()
    assert read["backup_policy_id"] is None
    backups = (await client.get(f"/instances/{instance.id}/backups", headers=headers)).json()
    assert [b["id"] for b in backups["items"]] == [str(backup.id)]
    assert backups["items"][0]["policy_id"] is None
    row = await session.get(Backup, backup.id)
    assert row is not None
    refreshed = await session.get(Instance, instance.id)
    assert refreshed is not None


async def test_weekly_full_only_policy_shows_its_next_backup_and_what_runs(
    client: httpx.AsyncClient, session: AsyncSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Monday 2026-06-01 02:30 in Paris: that Monday's 1:00 AM full has passed.
    monkeypatch.setattr(policy_service, "_now", lambda: datetime(2026, 6, 1, 0, 30, tzinfo=UTC))
    user, headers = await user_with_headers(session, timezone="Europe/Paris")
    weekly = {"frequency": "weekly", "hour": 1, "day_of_week": "monday"}
    body = (
        await client.post(
            "/backup-policies",
            json={"name": "Weekly", "schedule": weekly, "max_incremental_chain": 0},
            headers=headers,
        )
    ).json()
    assert body["next_run_at"] == "2026-06-07T23:00:00Z"  # next Monday 1:00 AM, not tomorrow
    assert body["schedule_summary"] == "Weekly on Monday at 1:00 AM"
    # Paris changes its clocks on Sundays between 2:00 and 3:00: nothing to say of Mondays.
    assert body["schedule_description"] == (
        "Full every Monday at 1:00 AM; no backup on the other days"
    )

    # An instance without a backup takes its first full on the next run, whatever the day.
    instance = await create_instance(session, user)
    attached = await client.post(
        f"/backup-policies/{body['id']}/instances",
        json={"instance_id": str(instance.id)},
        headers=headers,
    )
    assert attached.status_code in (200, 201), attached.text
    read = (await client.get(f"/backup-policies/{body['id']}", headers=headers)).json()
    assert read["next_run_at"] == "2026-06-01T23:00:00Z"

    # Incrementals on the other days: every day takes a backup again.
    await create_backup(session, instance, completed_at=datetime(2026, 6, 1, tzinfo=UTC))
    patched = await client.patch(
        f"/backup-policies/{body['id']}", json={"max_incremental_chain": 6}, headers=headers
    )
    assert patched.json()["next_run_at"] == "2026-06-01T23:00:00Z"
    assert patched.json()["schedule_description"] == (
        "Full every Monday at 1:00 AM; incrementals on the other days, up to 6 per chain"
    )
