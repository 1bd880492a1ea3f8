"""Differentiable forward models y = A(x) for zero-shot restoration (shared by BIRD and BIR-D)."""
