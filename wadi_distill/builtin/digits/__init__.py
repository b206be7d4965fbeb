"""``builtin:digits``: a small text-conditioned UNet trained on scikit-learn's 8×8 digits, its data, classifier,
teacher training, sanity checks and the end-to-end demo."""
