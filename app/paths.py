"""Paths of files shipped beside the package (a checkout, or the image's working directory)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# An editable install finds alembic.ini beside app/; an installed package (the Docker image)
# finds it in the working directory.
ALEMBIC_INI = next(
    (p for p in (ROOT / "alembic.ini", Path.cwd() / "alembic.ini") if p.exists()),
    ROOT / "alembic.ini",
)
