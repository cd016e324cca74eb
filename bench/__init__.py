"""Shoal's benchmarks: every figure beside its baseline, measured in one run."""
