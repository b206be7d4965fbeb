"""LoRaD: low-rank rotation of weight direction, as one method.

- :mod:`~wadi_distill.lorad.config`: :class:`LoRaDConfig`, the adapter's settings ↔ ``adapter_config.json``, and
  :func:`adapter_param_count`, the one parameter count of every adapter kind;
- :mod:`~wadi_distill.lorad.layer`: the layers (the math, forward, merge and unmerge together);
- :mod:`~wadi_distill.lorad.model`: inject into a model, switch adapters, merge, unmerge, unload;
- :mod:`~wadi_distill.lorad.serialization`: adapter folders and official WaDi angle checkpoints;
- :mod:`~wadi_distill.lorad.pipeline`: :func:`load_lorad`, one call from a trained folder to a diffusers pipeline.
"""

from wadi_probe.lazy import lazy_exports

_EXPORTS = {
    **{name: "wadi_distill.lorad.config" for name in ("LoRaDConfig", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "adapter_param_count")},
    **{name: "wadi_distill.lorad.layer" for name in ("LoRaDLayer", "LoRaDLinear", "LoRaDConv2d", "AdapterSpec")},
    **{name: "wadi_distill.lorad.model" for name in (
        "inject_lorad", "lorad_layers", "adapter_names", "set_active_adapter", "use_adapter", "adapter_disabled",
        "lorad_parameters", "lorad_param_count", "merge_lorad", "unmerge_lorad", "delete_adapter", "remove_lorad")},
    **{name: "wadi_distill.lorad.serialization" for name in (
        "save_adapter", "load_adapter", "read_adapter", "load_official_thetas", "adapter_config", "base_signature")},
    **{name: "wadi_distill.lorad.pipeline" for name in ("load_lorad", "LoadedLoRaD")},
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
