"""The worker outlives a Redis restart: running jobs finish, then it reconnects and serves."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from arq import Worker, func
from arq.connections import RedisSettings, create_pool

from worker.jobs import RESOURCES
from worker.main import _serve

QUEUE = "ibp:test:reconnect"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private redis-server on its own port, to stop and start again."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is installed by scripts/setup.sh"
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(_free_port())
    server.start()
    yield server
    server.stop()


async def _enqueue(settings: RedisSettings, function: str, *args: Any) -> None:
    for _ in range(100):  # the server may still be starting
        try:
            pool = await create_pool(settings, default_queue_name=QUEUE)
            break
        except Exception:
            await asyncio.sleep(0.1)
    else:
        raise AssertionError("redis-server did not come up")
    try:
        await pool.enqueue_job(function, *args)
    finally:
        await pool.aclose()


async def _until(condition: Any, timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_a_redis_restart_lets_running_jobs_finish_then_serves_again(
    redis_server: RedisServer,
) -> None:
    done: list[str] = []
    slow_started = asyncio.Event()

    async def slow(ctx: dict[str, Any]) -> None:
        slow_started.set()
        await asyncio.sleep(2)
        done.append("slow")

    async def quick(ctx: dict[str, Any], label: str) -> None:
        done.append(label)

    settings = RedisSettings(port=redis_server.port, conn_retries=0)
    opened: list[Resources] = []
    disposed: list[Resources] = []

    class Resources:  # stands in for worker.jobs.Resources: only its disposal is watched here
        async def close(self) -> None:
            disposed.append(self)

    async def on_startup(ctx: dict[str, Any]) -> None:
        opened.append(Resources())
        ctx[RESOURCES] = opened[-1]

    def make() -> Worker:
        return Worker(
            functions=[func(slow, name="slow"), func(quick, name="quick")],
            queue_name=QUEUE,
            redis_settings=settings,
            poll_delay=0.05,
            handle_signals=False,
            on_startup=on_startup,
        )

    stop = asyncio.Event()
    serving = asyncio.create_task(_serve(make, stop))
    try:
        await _enqueue(settings, "slow")
        await asyncio.wait_for(slow_started.wait(), 30)
        redis_server.stop()  # Redis goes away while a job runs
        await asyncio.sleep(0.5)
        assert not serving.done()
        await _until(lambda: "slow" in done)  # the running job was not cancelled
        redis_server.start()
        await _enqueue(settings, "quick", "after restart")
        await _until(lambda: "after restart" in done)
        assert not serving.done()
        # The worker that lost Redis could not run its shutdown hook; its pool went anyway.
        assert len(opened) == 2 and disposed == opened[:1]
    finally:
        stop.set()
        await asyncio.wait_for(serving, 30)
    assert disposed == opened
