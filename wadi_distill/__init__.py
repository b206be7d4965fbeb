"""wadi_distill: one-step distillation by Variational Score Distillation with LoRaD adapters.

LoRaD (low-rank rotation of weight direction) turns each output unit's weight row by low-rank pairwise angles,
keeping its norm; plans say which layers get which rank, from a preset or from a ``wadi-probe`` report.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
