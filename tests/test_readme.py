"""The README's tables say exactly what the code does: finding kinds, environment variables and
metrics come from the modules that define them, so docs cannot name what is not emitted."""

from __future__ import annotations

import re
from pathlib import Path

from asyncdiag import _config, _names

README = Path(__file__).resolve().parent.parent / "README.md"


def table_first_cells(header: str) -> list[str]:
    """The backticked first cell of each row of the table whose header row starts so."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    cells = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        match = re.match(r"\| `([^`]+)` \|", line)
        assert match, line
        cells.append(match.group(1))
    return cells


def test_readme_opens_with_the_two_newcomer_commands() -> None:
    text = README.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert "asyncdiag demo" in blocks[0]
    assert blocks[1].strip() == "bash scripts/test.sh"
    ci = (README.parent / ".ci" / "run").read_text()
    assert "bash scripts/test.sh 3.10 3.13" in ci


def test_finding_kinds_table_is_the_contract() -> None:
    assert table_first_cells("| kind | what happened |") == list(_names.FINDING_KINDS)


def test_environment_table_lists_every_variable_the_config_reads() -> None:
    variables = [value for name, value in vars(_config).items() if name.startswith("ENV_")]
    assert sorted(table_first_cells("| variable | meaning | default |")) == sorted(variables)


def test_metric_table_is_the_names_module() -> None:
    rows = table_first_cells("| metric | instrument | unit | attributes | Prometheus series |")
    assert rows == [spec.name for spec in _names.METRICS]
    text = README.read_text()
    for spec in _names.METRICS:
        assert f"`{spec.prometheus_series[0]}`" in text


def test_every_telemetry_name_in_the_readme_exists() -> None:
    known = {spec.name for spec in _names.METRICS}
    known |= {series for spec in _names.METRICS for series in spec.prometheus_series}
    known |= {_names.ATTR_SUBJECT, _names.ATTR_OUTCOME, _names.FINDING_EVENT}
    import asyncdiag

    api = {f"asyncdiag.{name}" for name in asyncdiag.__all__}
    api |= {"asyncdiag.testing", "asyncdiag.testing.capture"}
    families = tuple({"_".join(spec.prometheus_base.split("_")[:2]) for spec in _names.METRICS})
    for token in re.findall(r"`@?(asyncdiag[._][a-zA-Z_.]*)", README.read_text()):
        token = token.rstrip(".")
        if token.startswith("asyncdiag._") or token in api:
            continue
        if token.startswith("asyncdiag_") and not token.startswith(families):
            continue  # an ini option such as asyncdiag_allow, not a metric series
        assert token in known, token
