"""``builtin:digits``: a small text-conditioned UNet trained on scikit-learn's 8×8 digits, its data and classifier.

The demo, the metrics' sanity checks and the teacher's training, which use this world, are in
:mod:`wadi_distill.digits_demo`."""
