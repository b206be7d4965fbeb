"""Plans: which layers get a LoRaD adapter and at which rank, from a preset or from a probe report."""
