"""What can be checked of the deployment files without a container engine: compose.yaml's
services and their order, the Dockerfile's runtime stage (non-root, health check, no migration
on start, hadolint), the hypervisor workers' systemd unit, and `ibp serve --workers N`."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from app.main import API_PREFIX

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


def test_compose_runs_the_migration_once_before_the_api_and_the_control_worker() -> None:
    services = _compose()["services"]
    assert set(services) == {"postgres", "redis", "migrate", "api", "worker"}

    migrate = services["migrate"]
    assert migrate["command"] == ["ibp", "migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["restart"] == "no"
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["redis"]

    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )
        assert "migrate" not in services[name]["command"]
    assert services["api"]["command"][:2] == ["ibp", "serve"]
    assert "--workers" in services["api"]["command"]
    # The control worker: no hypervisor queue (those run on the hypervisors), no HTTP health.
    assert services["worker"]["command"] == ["ibp", "worker"]
    assert services["worker"]["healthcheck"] == {"disable": True}


def test_compose_gives_every_ibp_service_the_database_redis_and_secret_key() -> None:
    services = _compose()["services"]
    for name in ("migrate", "api", "worker"):
        service = services[name]
        assert service["build"] == "." and service["image"] == "ibp:latest"
        env = service["environment"]
        # The URLs name the compose services they must reach.
        assert "@postgres:5432/" in env["IBP_DATABASE_URL"]
        assert env["IBP_DATABASE_URL"].startswith("postgresql+asyncpg://")
        assert env["IBP_REDIS_URL"].startswith("redis://redis:6379/")
        # No default secret key: compose refuses to start without one.
        assert env["IBP_SECRET_KEY"].startswith("${IBP_SECRET_KEY:?")
        assert env["IBP_ENVIRONMENT"] == "production"


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    lines = [line for line in dockerfile.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.strip().partition(" ") for line in joined.splitlines())
        if word
    ]


def _runtime_stage() -> list[tuple[str, str]]:
    instructions = _instructions((ROOT / "Dockerfile").read_text())
    starts = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    assert len(starts) >= 2, "a build stage and a runtime stage"
    return instructions[starts[-1] :]


def test_the_image_builds_from_constraints_and_runs_as_a_non_root_user() -> None:
    instructions = _instructions((ROOT / "Dockerfile").read_text())
    assert any(
        word == "RUN" and re.search(r"pip install .*-c constraints\.txt", args)
        for word, args in instructions
    )
    runtime = _runtime_stage()
    words = [word for word, _ in runtime]
    users = [args for word, args in runtime if word == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert words.index("USER") < words.index("CMD")
    # Nothing to compile at run time: the runtime stage installs no compiler or headers.
    installs = " ".join(args for word, args in runtime if word == "RUN")
    assert "libvirt0" in installs and "qemu-utils" in installs
    assert not re.search(r"\bgcc\b|-dev\b", installs)
    assert any(word == "COPY" and "--from=" in args for word, args in runtime)


def _json_args(args: str) -> list[str]:
    import json

    parsed: list[str] = json.loads(args)
    return parsed


def test_the_image_serves_without_migrating_and_checks_its_health_without_curl() -> None:
    runtime = dict(_runtime_stage())
    cmd = _json_args(runtime["CMD"])
    assert cmd[:2] == ["ibp", "serve"] and "migrate" not in runtime["CMD"]
    assert "ENTRYPOINT" not in runtime
    healthcheck = runtime["HEALTHCHECK"]
    assert "curl" not in healthcheck and "wget" not in healthcheck
    probe = _json_args(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    assert probe[:2] == ["python", "-c"] and f"{API_PREFIX}/health" in probe[2]
    # The probe itself: fails with nothing listening, passes against `ibp serve` (below).
    code = probe[2].replace("127.0.0.1:8000", "127.0.0.1:{port}")
    assert "{port}" in code
    _check_probe(code)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _check_probe(code: str) -> None:
    port = _free_port()
    probe = [sys.executable, "-c", code.format(port=port)]
    assert subprocess.run(probe, capture_output=True, timeout=30).returncode != 0
    with _ibp_serve(port, workers=1):
        done = subprocess.run(probe, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr


class _ibp_serve:
    """`ibp serve` on a free port in a subprocess, stopped (with its workers) on exit."""

    def __init__(self, port: int, workers: int) -> None:
        self.port, self.workers = port, workers

    def __enter__(self) -> psutil.Process:
        serve = ["serve", "--port", str(self.port), "--workers", str(self.workers)]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from app.cli import main; main()", *serve],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=os.environ.copy(),
        )
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, "ibp serve exited"
            assert time.monotonic() < deadline, "ibp serve did not answer"
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{API_PREFIX}/health").is_success:
                    return psutil.Process(self.proc.pid)
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def __exit__(self, *_: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)


def test_serve_with_workers_runs_that_many_api_processes() -> None:
    port = _free_port()
    with _ibp_serve(port, workers=2) as server:
        deadline = time.monotonic() + 60
        while True:
            serving = [  # uvicorn's worker processes (multiprocessing, spawned)
                child
                for child in server.children(recursive=True)
                if "spawn_main" in " ".join(child.cmdline())
            ]
            if len(serving) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert len(serving) == 2, [c.cmdline() for c in server.children(recursive=True)]
        for _ in range(5):
            response = httpx.get(f"http://127.0.0.1:{port}{API_PREFIX}/health")
            assert response.json() == {"status": "ok"}


def test_serve_refuses_zero_workers() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "from app.cli import main; main()", "serve", "--workers", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "at least 1" in done.stderr


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run(
        [hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_hypervisor_worker_unit_runs_one_named_hypervisors_queue(tmp_path: Path) -> None:
    text = (ROOT / "deploy" / "ibp-worker@.service").read_text()
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(text)
    service = unit["Service"]
    command = shlex.split(service["ExecStart"])
    assert command[1:] == ["worker", "--hypervisor", "%i", "--no-control"]
    assert service["User"] and service["EnvironmentFile"].startswith("/etc/")
    assert service["Restart"] == "on-failure"
    assert unit["Install"]["WantedBy"] == "multi-user.target"

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # systemd's own check, on an instance of the template; verify wants the program and the
    # environment file to exist, so a stand-in program and an optional file.
    instance = tmp_path / "ibp-worker@local.service"
    instance.write_text(
        text.replace(command[0], "/bin/true").replace("EnvironmentFile=/", "EnvironmentFile=-/")
    )
    done = subprocess.run([analyze, "verify", str(instance)], capture_output=True, text=True)
    assert done.returncode == 0 and instance.name not in done.stdout + done.stderr, done.stderr
