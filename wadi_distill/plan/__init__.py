"""Plans: which layers get a LoRaD adapter and at which rank.

- :mod:`~wadi_distill.plan.plan`: the :class:`Plan` data (JSON in and out, a table to print, the
  :class:`~wadi_distill.lorad.config.LoRaDConfig` of its adapter);
- :mod:`~wadi_distill.plan.presets`: one rank everywhere (the paper's setup and variants);
- :mod:`~wadi_distill.plan.from_report`: ranks chosen from a ``wadi-probe`` report under a parameter budget;
- :mod:`~wadi_distill.plan.models`: the model a plan is for, built from its config on the meta device.
"""

from wadi_probe.lazy import lazy_exports

_EXPORTS = {
    **{name: "wadi_distill.plan.plan" for name in ("Plan", "PlanEntry")},
    **{name: "wadi_distill.plan.presets" for name in ("PRESETS", "plan_from_preset")},
    "plan_from_report": "wadi_distill.plan.from_report",
    **{name: "wadi_distill.plan.models" for name in (
        "backbone_param_count", "load_model_config_only", "load_planning_model", "model_from_config", "read_model_config")},
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
