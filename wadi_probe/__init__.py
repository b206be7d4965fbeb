"""wadi_probe: read a teacher and a student checkpoint and measure, layer by layer, how the weights moved.

Norm versus direction, angles, residual and rotation spectra (DESIGN §4). Every capability is a function;
the ``wadi-probe`` command only parses arguments and prints.
"""

from wadi_probe.errors import WadiInputError, WadiRuntimeError
from wadi_probe.analyze import compare
from wadi_probe.report.schema import Report, load_report

__version__ = "0.1.0"

__all__ = ["Report", "WadiInputError", "WadiRuntimeError", "__version__", "compare", "load_report"]
