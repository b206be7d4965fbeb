"""What runs on the built-in digits world, at the top beside the commands that call it.

- :mod:`~wadi_distill.digits_demo.demo`: the end-to-end demo (distil, probe, distil from the probe, evaluate);
- :mod:`~wadi_distill.digits_demo.sanity`: the metrics' sanity table (real digits first, blur and noise far behind);
- :mod:`~wadi_distill.digits_demo.teacher_training`: how the shipped ``builtin:digits`` teacher was trained.

The world itself (model, data, classifier and the shipped weights) sits low, in :mod:`wadi_distill.builtin.digits`,
so that teachers, plans and evaluation can use it without importing any of this.
"""
