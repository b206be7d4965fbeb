"""Variational Score Distillation: the losses, one step apart from the loop, the student kinds and the training loop."""
