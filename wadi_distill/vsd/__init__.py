"""Variational Score Distillation: the losses, the training loop and the student kinds."""
