"""The README's five PromQL queries name only series that the API and the workers expose:
a renamed metric fails here, not on an operator's dashboard."""

from __future__ import annotations

import re
import uuid

from prometheus_client.parser import text_string_to_metric_families

from app.metrics import CatalogSnapshot, render
from app.paths import ROOT

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def _readme_queries() -> str:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```promql\n(.*?)```", readme, re.S)
    assert len(blocks) == 1, "the Monitoring section has one PromQL block"
    return "\n".join(line for line in blocks[0].splitlines() if not line.startswith("#"))


def _exposed() -> set[str]:
    """Every sample name a scrape of the API (catalog populated) or a worker can carry."""
    snap = CatalogSnapshot(
        queued={("hv1", "backup"): 1},
        running={("hv1", "backup"): 0},
        oldest_good_age={uuid.uuid4(): 90000.0},
        without_good={uuid.uuid4(): 1},
    )
    # render() is this process's registry (every family, the workers' too) then the catalog's.
    families = list(text_string_to_metric_families(render(snap).decode()))
    return {f.name + suffix for f in families for suffix in SUFFIXES.get(f.type, ("",))}


def test_every_series_in_the_readme_queries_is_exposed() -> None:
    named = set(re.findall(r"\bibp_[a-z_]+", _readme_queries()))
    assert len(named) >= 6
    assert sorted(named - _exposed()) == []
