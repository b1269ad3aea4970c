"""The reliability suite's report: the figures its tests measured (requests served, faults
injected, fuzz cases tried, failures, memory growth, ...) are printed at the end of the run and
written as JSON to ``$XAI_SERVE_RELIABILITY_OUT/figures.json`` (default: the run's pytest
temporary directory), so that ``docs/reliability.md`` quotes measured numbers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.reliability.harness import FIGURES, write_figures


def _figures_path(config: pytest.Config) -> Path:
    out = os.environ.get("XAI_SERVE_RELIABILITY_OUT")
    if out:
        return Path(out) / "figures.json"
    factory = getattr(config, "_tmp_path_factory", None)
    base = factory.getbasetemp() if factory is not None else Path.cwd()
    return Path(base) / "reliability-figures.json"


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    if not FIGURES:
        return
    path = _figures_path(config)
    write_figures(path)
    terminalreporter.section("reliability figures")
    for test, figures in sorted(FIGURES.items()):
        terminalreporter.write_line(f"{test}: {json.dumps(figures, sort_keys=True)}")
    terminalreporter.write_line(f"written to {path}")
