"""Sweep bookkeeping: per-model cut-point counts and seconds, printed as a table at the end."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

@dataclass
class ZooRecord:
    cut_points: int | None = None  # None: the model did not trace
    seconds: float = 0.0  # setup + call + teardown of every test of this model
    failed: bool = False


_RECORDS = pytest.StashKey[dict[str, ZooRecord]]()


def _records(config: pytest.Config) -> dict[str, ZooRecord]:
    return config.stash.setdefault(_RECORDS, {})


@pytest.fixture(scope="session")
def zoo_records(request: pytest.FixtureRequest) -> dict[str, ZooRecord]:
    """Model spec (`timm:resnet18`) -> its record; tests fill in the cut-point count."""
    return _records(request.config)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    spec = getattr(item, "callspec", None) and item.callspec.params.get("spec")
    if item.get_closest_marker("zoo") is not None and spec and not report.skipped:
        rec = _records(item.config).setdefault(spec, ZooRecord())
        rec.seconds += report.duration
        rec.failed |= report.failed
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
        tr.write_line(f"{spec:<{width}}  {cuts:>5}  {rec.seconds:8.2f}  {'FAILED' if rec.failed else 'ok'}")
    total = sum(r.seconds for r in records.values())
    tr.write_line(f"{len(records)} models, {total:.1f} s in their tests")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Run the sweep on one intra-op thread unless OMP_NUM_THREADS says otherwise.

    reason: on a 2-core machine with any other load, two OpenMP threads wait for each other at
    every op's barrier; measured 30x slower (resnet50: 18 s instead of 0.6 s for 8 cuts).
    """
    if "OMP_NUM_THREADS" in os.environ:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
