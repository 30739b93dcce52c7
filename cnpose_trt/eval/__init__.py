"""Measuring: accuracy (evaluate: MPJPE on synthetic people or Human3.6M) and speed (bench)."""
