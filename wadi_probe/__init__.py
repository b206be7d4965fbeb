"""wadi_probe: read a teacher and a student checkpoint and measure, layer by layer, how the weights moved.

Norm versus direction, angles, residual and rotation spectra (docs/design.md). Every capability is a function;
the ``wadi-probe`` command only parses arguments and prints. The names below are imported on first use (PEP 562),
so the command line does not pay for torch before it needs it.
"""

from wadi_probe.errors import WadiInputError, WadiRuntimeError
from wadi_probe.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {"compare": "wadi_probe.analyze", "Report": "wadi_probe.report.schema", "load_report": "wadi_probe.report.schema"}

__all__ = ["Report", "WadiInputError", "WadiRuntimeError", "__version__", "compare", "load_report"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
