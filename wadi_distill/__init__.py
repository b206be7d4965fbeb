"""wadi_distill: one-step distillation by Variational Score Distillation with LoRaD adapters.

LoRaD (low-rank rotation of weight direction) turns each output unit's weight row by low-rank pairwise angles,
keeping its norm; plans say which layers get which rank, from a preset or from a ``wadi-probe`` report.
"""

from wadi_distill.lorad.serialization import export_merged, load_adapter, load_official_thetas, save_adapter
from wadi_distill.evaluate import evaluate_images, frechet_distance, precision_recall
from wadi_distill.lorad.layer import (
    LoRaDConv2d,
    LoRaDLinear,
    adapter_disabled,
    inject_lorad,
    lorad_parameters,
    merge_lorad,
    remove_lorad,
    set_active_adapter,
    unmerge_lorad,
    use_adapter,
)
from wadi_distill.builtin.digits.model import DigitsModel, is_builtin, load_builtin
from wadi_distill.teachers.pipeline import Teacher, load_teacher
from wadi_distill.plan.planner import Plan, PlanEntry, load_model_config_only, plan_from_preset, plan_from_report
from wadi_distill.sample import sample_multistep
from wadi_distill.vsd.trainer import DistillConfig, DistillResult, distill

__version__ = "0.1.0"

__all__ = [
    # LoRaD layers
    "LoRaDLinear", "LoRaDConv2d", "inject_lorad", "set_active_adapter", "adapter_disabled", "use_adapter",
    "lorad_parameters", "merge_lorad", "unmerge_lorad", "remove_lorad",
    # plans, adapter files, export
    "Plan", "PlanEntry", "plan_from_preset", "plan_from_report", "load_model_config_only",
    "save_adapter", "load_adapter", "load_official_thetas", "export_merged",
    # training
    "DistillConfig", "DistillResult", "distill",
    # the built-in teacher, sampling, metrics
    "Teacher", "load_teacher", "DigitsModel", "is_builtin", "load_builtin", "sample_multistep",
    "evaluate_images", "frechet_distance", "precision_recall",
    "__version__",
]
