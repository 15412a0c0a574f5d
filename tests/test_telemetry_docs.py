"""docs/telemetry.md names exactly what ``_names`` defines (the module is the source)."""

from __future__ import annotations

import re
from pathlib import Path

from asyncdiag import _names

DOC = Path(__file__).resolve().parent.parent / "docs" / "telemetry.md"
INSTRUMENT_WORDS = {"histogram": "histogram", "counter": "counter",
                    "up_down_counter": "up-down counter", "observable_gauge": "observable gauge"}


def rows() -> dict[str, str]:
    found: dict[str, str] = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"\| `([a-z_.]+)` \|", line)
        if match:
            found[match.group(1)] = line
    return found


def test_every_metric_has_its_row_with_unit_attributes_and_prometheus_series() -> None:
    table = rows()
    for spec in _names.METRICS:
        row = table[spec.name]
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1] == INSTRUMENT_WORDS[spec.instrument], spec.name
        assert cells[2] == f"`{spec.unit}`", spec.name
        assert re.findall(r"`([^`]+)`", cells[3]) == list(spec.attributes), spec.name
        first, *rest = spec.prometheus_series
        assert f"`{first}`" in cells[4], spec.name
        for series in rest:
            assert f"`{series[len(spec.prometheus_base):]}`" in cells[4], (spec.name, series)


def test_every_asyncdiag_name_in_the_page_exists() -> None:
    known = {spec.name for spec in _names.METRICS}
    known |= {series for spec in _names.METRICS for series in spec.prometheus_series}
    known |= {_names.ATTR_SUBJECT, _names.ATTR_OUTCOME, _names.FINDING_EVENT,
              *_names.FINDING_EVENT_ATTRIBUTES}
    for token in re.findall(r"`(asyncdiag[._][a-z_.]*)`", DOC.read_text()):
        if token.startswith(("asyncdiag._", "asyncdiag.testing")):
            continue  # module paths, not telemetry names
        assert token in known, token


def test_finding_event_attributes_and_buckets_are_listed() -> None:
    text = DOC.read_text()
    table = rows()
    for key in _names.FINDING_EVENT_ATTRIBUTES:
        assert key in table, key
    assert ", ".join(f"{b:g}" for b in _names.DURATION_BUCKETS) in " ".join(text.split())
