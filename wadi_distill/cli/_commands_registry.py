"""Imports every command module so that it registers on the app. One line per command module."""
from wadi_distill.cli import plan  # noqa: F401
from wadi_distill.cli import export  # noqa: F401
