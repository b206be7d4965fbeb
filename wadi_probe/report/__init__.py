"""The probe's report: its schema and JSON file (``schema``), the printed summary, and the figures."""

from wadi_probe.report.schema import Report, load_report

__all__ = ["Report", "load_report"]
