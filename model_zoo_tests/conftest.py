"""Sweep bookkeeping: per-model cut-point counts and seconds, printed as a table at the end."""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

# reason: the sweep shares its model-randomising helpers with the fast tests (tests/helpers.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


@dataclass
class ZooRecord:
    cut_points: int | None = None  # None: not traced (failed, excluded or deselected)
    seconds: float = 0.0  # setup + call + teardown of every test of this model
    result: str = "ok"  # "ok", "FAILED" or "excluded: <reason>"


_RECORDS = pytest.StashKey[dict[str, ZooRecord]]()


def _records(config: pytest.Config) -> dict[str, ZooRecord]:
    return config.stash.setdefault(_RECORDS, defaultdict(ZooRecord))


@pytest.fixture(scope="session")
def zoo_records(request: pytest.FixtureRequest) -> dict[str, ZooRecord]:
    """Model spec (`timm:resnet18`) -> its record; the sweep fills in the cut-point count."""
    return _records(request.config)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    callspec = getattr(item, "callspec", None)
    spec = callspec.params.get("spec") if callspec else None
    if spec is None or item.get_closest_marker("zoo") is None:
        return report
    rec = _records(item.config)[spec]
    rec.seconds += report.duration
    if report.skipped:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        rec.result = f"excluded: {reason.removeprefix('Skipped: ')}"
    elif report.failed:
        rec.result = "FAILED"
    return report


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    records = _records(config)
    if not records:
        return
    tr = terminalreporter
    tr.section("model zoo sweep")
    width = max(len(spec) for spec in records)
    tr.write_line(f"{'model':<{width}}  {'cuts':>5}  {'seconds':>8}  result")
    for spec, rec in sorted(records.items(), key=lambda kv: -kv[1].seconds):
        cuts = "-" if rec.cut_points is None else str(rec.cut_points)
        tr.write_line(f"{spec:<{width}}  {cuts:>5}  {rec.seconds:8.2f}  {rec.result}")
    by_source = defaultdict(int)
    for spec in records:
        by_source[spec.split(":", 1)[0]] += 1
    sources = ", ".join(f"{n} {src}" for src, n in sorted(by_source.items()))
    total = sum(r.seconds for r in records.values())
    tr.write_line(f"{len(records)} models ({sources}), {total:.1f} s in their tests")
