"""The self-contained HTML report of a run, with its plots also written as PNG files."""

from smse.report.html import write_report

__all__ = ["write_report"]
