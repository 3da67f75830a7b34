"""Shims that let peer systems run here, for side-by-side benchmarks."""
