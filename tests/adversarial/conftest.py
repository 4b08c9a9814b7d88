"""The reliability summary: each fault test adds one line (tried / lost / hung / wrong-status
and memory), printed at the end of the run for README's reliability section."""

from __future__ import annotations

import pytest

from tests.support.adversarial import SUMMARY_LINES


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if SUMMARY_LINES:
        terminalreporter.section("reliability summary (issue 10)")
        for line in SUMMARY_LINES:
            terminalreporter.write_line(line)
