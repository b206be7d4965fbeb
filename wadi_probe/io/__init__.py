"""Reading and writing files: checkpoint layouts and formats, LDM and Flux/SD3 names, JSON and atomic writes.

- :mod:`~wadi_probe.io.checkpoints`: ``Checkpoint`` and ``open_checkpoint`` (every layout, lazily),
  ``write_like`` (a file in a reference's layout), ``denoiser_folder`` (a pipeline root's ``unet/``);
- :mod:`~wadi_probe.io.formats`: one reader per format (safetensors, torch ``weights_only``, adapters);
- :mod:`~wadi_probe.io.ldm`: LDM/CompVis UNet names ↔ diffusers names;
- :mod:`~wadi_probe.io.flow`: Flux.1 and SD3/SD3.5 original single files → diffusers names and row ranges;
- :mod:`~wadi_probe.io.names`: wrapper prefixes taken off stored names;
- :mod:`~wadi_probe.io.jsonfile`, :mod:`~wadi_probe.io.atomic`: reading JSON, writing without half-written files.

These are public modules: ``wadi_distill`` reads and writes its files through them.
"""
