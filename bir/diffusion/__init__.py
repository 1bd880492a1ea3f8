"""Schedules, samplers and guidance for diffusion priors (pure functions, no Lightning).

- :mod:`bir.diffusion.schedules`: betas, respacing and the closed forms of Gaussian diffusion.
- :mod:`bir.diffusion.parameterization`: eps / x0 / v and variance adapters
  (``DiffusionModel(net, schedule, prediction, learned_sigma)`` -> ``ModelOutput``).
- :mod:`bir.diffusion.samplers`: ``sample_ddpm``, ``sample_ddim``, ``sample_dpmpp_2m``.
- :mod:`bir.diffusion.prior`: ``PixelPrior``, a frozen pretrained pixel-space prior.
"""

from bir.diffusion.parameterization import DiffusionModel, ModelOutput, convert_output
from bir.diffusion.samplers import sample_ddim, sample_ddpm, sample_dpmpp_2m
from bir.diffusion.schedules import DiffusionSchedule, make_betas, space_timesteps

__all__ = [
    "DiffusionModel",
    "DiffusionSchedule",
    "ModelOutput",
    "convert_output",
    "make_betas",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "space_timesteps",
]
