"""LoRaD: low-rank rotation of weight direction, as one method (layers, injection, adapter files)."""
