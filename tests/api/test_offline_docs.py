"""The API docs (Swagger UI, ReDoc) render from files the API serves itself, with no internet.

A real headless Chromium (Debian's `chromium`; `scripts/setup.sh --tests` installs it) loads
the pages from a live server on loopback while every other host name resolves to nothing. The
same browser on FastAPI's default, CDN-fed docs page renders nothing: the block is real.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from app.main import API_PREFIX, create_app
from tests.api.live import serve

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


async def test_docs_pages_take_every_asset_from_the_api_itself(client: httpx.AsyncClient) -> None:
    for page in ("docs", "redoc"):
        html = (await client.get(page)).text
        assets = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert assets, html
        for asset in assets:
            assert asset.startswith(f"{API_PREFIX}/docs/static/"), asset
            response = await client.get(f"http://test{asset}")
            assert response.status_code == 200 and len(response.content) > 0, asset
        assert "https://" not in html and "http://" not in html
    docs = (await client.get("docs")).text
    redirect_url = f"{API_PREFIX}/docs/oauth2-redirect"
    assert f"oauth2RedirectUrl: window.location.origin + '{redirect_url}'" in docs
    redirect = await client.get("docs/oauth2-redirect")
    assert redirect.status_code == 200 and "oauth2" in redirect.text


def _chromium(url: str, profile: Path, *action: str) -> str:
    """Run headless Chromium on `url` with only 127.0.0.1 reachable; its stdout."""
    if CHROMIUM is None:
        pytest.fail("Debian's chromium is needed for this test: scripts/setup.sh --tests")
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",  # root in CI
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            # Every host name but the loopback address resolves to nothing: no CDN, no fonts.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--virtual-time-budget=15000",  # let the page's scripts run and fetch the spec
            "--window-size=1280,1600",
            *action,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_swagger_ui_and_redoc_render_with_no_network(tmp_path: Path) -> None:
    with serve(create_app()) as base:
        swagger = _chromium(f"{base}/docs", tmp_path / "profile", "--dump-dom")
        redoc = _chromium(f"{base}/redoc", tmp_path / "profile", "--dump-dom")
        shot = tmp_path / "swagger-ui.png"
        _chromium(f"{base}/docs", tmp_path / "profile", f"--screenshot={shot}")
    # Swagger UI built its operations list from the served OpenAPI document.
    assert f'class="opblock-summary-path" data-path="{API_PREFIX}/auth/login"' in swagger
    assert swagger.count('class="opblock ') > 20
    # ReDoc too: one section per operation.
    assert 'data-section-id="operation/auth_login"' in redoc
    assert shot.read_bytes().startswith(b"\x89PNG")

    # FastAPI's default docs page takes Swagger UI from a CDN: with the same block, it renders
    # nothing, and its screenshot (a blank page) is a fraction of the size.
    cdn = FastAPI(openapi_url="/openapi.json", docs_url="/docs")
    with serve(cdn) as base:
        root = base.removesuffix(API_PREFIX)
        blank = _chromium(f"{root}/docs", tmp_path / "profile", "--dump-dom")
        blank_shot = tmp_path / "blank.png"
        _chromium(f"{root}/docs", tmp_path / "profile", f"--screenshot={blank_shot}")
    assert "cdn.jsdelivr.net" in blank and "opblock" not in blank
    assert shot.stat().st_size > 10 * blank_shot.stat().st_size
