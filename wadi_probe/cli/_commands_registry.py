"""Imports every command module so that it registers on the app. One line per command module."""
from wadi_probe.cli import swap  # noqa: F401
