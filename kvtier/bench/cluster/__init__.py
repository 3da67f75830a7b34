"""Layer 8: benchmarks of kvtier across instances (routing, transfer, PD)."""
