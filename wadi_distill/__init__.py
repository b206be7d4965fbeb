"""wadi_distill: one-step distillation by Variational Score Distillation with LoRaD adapters.

LoRaD (low-rank rotation of weight direction) turns each output unit's weight row by low-rank pairwise angles,
keeping its norm; plans say which layers get which rank, from a preset or from a ``wadi-probe`` report.

The names below are imported from their modules on first use (PEP 562), so ``import wadi_distill`` and the
``wadi-distill`` command line stay fast; ``from wadi_distill import X`` works as usual.
"""

from wadi_probe.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    # LoRaD: config, layers, injection, files, pipelines
    **{name: "wadi_distill.lorad" for name in (
        "LoRaDConfig", "LoRaDLinear", "LoRaDConv2d", "inject_lorad", "set_active_adapter", "adapter_disabled",
        "use_adapter", "lorad_parameters", "merge_lorad", "unmerge_lorad", "remove_lorad",
        "save_adapter", "load_adapter", "load_official_thetas", "load_lorad")},
    # plans
    **{name: "wadi_distill.plan" for name in (
        "Plan", "PlanEntry", "plan_from_preset", "plan_from_report", "load_model_config_only")},
    "export_merged": "wadi_distill.export",
    # training
    **{name: "wadi_distill.vsd.trainer" for name in ("DistillConfig", "DistillResult", "distill")},
    # teachers: the one Teacher type, and the built-in digits model
    **{name: "wadi_distill.teachers.pipeline" for name in ("Teacher", "load_teacher")},
    **{name: "wadi_distill.builtin.digits.model" for name in ("DigitsModel", "is_builtin", "load_builtin")},
    # sampling, metrics
    "sample_multistep": "wadi_distill.sample",
    **{name: "wadi_distill.evaluate" for name in ("evaluate_images", "frechet_distance", "precision_recall")},
}

__all__ = [*_EXPORTS, "__version__"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
