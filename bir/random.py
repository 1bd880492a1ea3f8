"""Per-sample random number generation.

Every random draw in bir goes through an explicit ``torch.Generator`` that is seeded from a run
seed and the *global index* of the sample (never its position in a batch), so a result does not
depend on the batch it was in, on the batch size, or on the number of DDP ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# A large odd multiplier spreads neighbouring (seed, index) pairs far apart in seed space.
_SEED_STRIDE = 1_000_003


def sample_seed(seed: int, index: int, stream: int = 0) -> int:
    """Seed for sample ``index`` of a run seeded with ``seed``; ``stream`` separates independent uses."""
    return (int(seed) * _SEED_STRIDE + int(index) * 7919 + int(stream) * 104_729) % (2**63 - 1)


def sample_generators(
    seed: int,
    indices: Sequence[int] | torch.Tensor,
    device: torch.device | str = "cpu",
    stream: int = 0,
) -> list[torch.Generator]:
    """One generator per sample, seeded by ``sample_seed(seed, index, stream)``."""
    if isinstance(indices, torch.Tensor):
        indices = indices.flatten().tolist()
    gens = []
    for i in indices:
        g = torch.Generator(device=torch.device(device))
        g.manual_seed(sample_seed(seed, i, stream))
        gens.append(g)
    return gens


def _per_generator(draw, shape, generators, device, dtype) -> torch.Tensor:
    """``(len(generators), *shape)`` from ``draw`` (``torch.randn`` / ``torch.rand``); row ``i``
    drawn from ``generators[i]``."""
    return torch.stack(
        [draw(tuple(shape), generator=g, device=device, dtype=dtype) for g in generators]
    )


def randn(
    shape: Sequence[int],
    generators: Sequence[torch.Generator],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal tensor of ``(len(generators), *shape)``; row ``i`` drawn from ``generators[i]``."""
    return _per_generator(torch.randn, shape, generators, device, dtype)


def rand(
    shape: Sequence[int],
    generators: Sequence[torch.Generator],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Uniform [0, 1) tensor of ``(len(generators), *shape)``; row ``i`` drawn from ``generators[i]``."""
    return _per_generator(torch.rand, shape, generators, device, dtype)


def randn_like(x: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` (its dtype and device), row ``b`` from
    ``generators[b]``: drawn on the generators' device, then moved to x's, so the numbers depend
    on the generators only."""
    if len(generators) != x.shape[0]:
        raise ValueError(f"need one generator per sample: {len(generators)} for batch {x.shape[0]}")
    return randn(x.shape[1:], generators, device=generators[0].device, dtype=x.dtype).to(x.device)


def uniform(g: torch.Generator, low: float, high: float) -> float:
    """One float uniformly drawn from [low, high) with generator ``g`` (CPU or device generator)."""
    u = torch.rand((), generator=g, device=g.device).item()
    return low + (high - low) * u


def choice(g: torch.Generator, options: Sequence, probs: Sequence[float] | None = None):
    """One element of ``options`` drawn with probabilities ``probs`` (uniform if None)."""
    if probs is None:
        probs = [1.0] * len(options)
    total = float(sum(probs))
    u = uniform(g, 0.0, total)
    acc = 0.0
    for option, p in zip(options, probs):
        acc += p
        if u < acc:
            return option
    return options[-1]
