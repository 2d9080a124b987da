"""Experiments on top of the library and the training loop: the Shapes environment, the demo, results tables."""
