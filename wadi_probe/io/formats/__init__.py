"""File formats the probe reads and writes: lazy safetensors, safe torch pickles, adapters (LoRA, LoRaD)."""
