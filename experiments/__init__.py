"""Runnable experiments: `python -m experiments.fcn8s --workdir DIR [--config FILE[:PRESET]]`."""
