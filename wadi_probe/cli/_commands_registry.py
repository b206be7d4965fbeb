"""Imports every command module so that it registers on the app. One line per command module."""
from wadi_probe.cli import swap  # noqa: F401
from wadi_probe.cli import plot  # noqa: F401
from wadi_probe.cli import compare  # noqa: F401
from wadi_probe.cli import show  # noqa: F401
