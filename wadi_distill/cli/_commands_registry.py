"""Imports every command module so that it registers on the app. One line per command module."""
from wadi_distill.cli import plan  # noqa: F401
from wadi_distill.cli import export  # noqa: F401
from wadi_distill.cli import run  # noqa: F401
from wadi_distill.cli import sample  # noqa: F401
from wadi_distill.cli import train_teacher  # noqa: F401
from wadi_distill.cli import demo  # noqa: F401
from wadi_distill.cli import extract_lora  # noqa: F401
from wadi_distill.cli import evaluate  # noqa: F401
