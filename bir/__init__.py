"""bir: blind image restoration with diffusion priors (DiffBIR, BIRD, BIR-D) on Lightning + Hydra."""

__version__ = "0.1.0"
