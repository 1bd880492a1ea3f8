"""Adapters from raw diffusion networks to one model interface the samplers understand.

As k-diffusion's wrappers (``DiscreteEpsDDPMDenoiser``, ``DiscreteVDDPMDenoiser``), checkpoint
conventions stay here and the sampling code never sees them: a net trained to predict eps, x0 or
v (Salimans & Ho 2022), with a fixed or learned variance (IDDPM, Nichol & Dhariwal 2021), becomes
a callable ``model(x_t, i) -> ModelOutput(eps, x0, log_variance)`` where ``i`` indexes the used
(possibly respaced) steps of a :class:`~bir.diffusion.schedules.DiffusionSchedule` and the net is
called with the original timestep ``schedule.timesteps[i]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bir.diffusion.schedules import DiffusionSchedule

Tensor = torch.Tensor

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range", "learned")


@dataclass
class ModelOutput:
    """What a sampler needs from the model at one step.

    Attributes:
        eps: predicted noise, ``[B, C, H, W]``.
        x0: predicted clean sample, ``[B, C, H, W]``, in the net's range (usually [-1, 1]),
            not clipped (samplers clip when asked).
        log_variance: log of the reverse-step variance, ``[B, C, H, W]`` or broadcastable
            ``[B, 1, 1, 1]``; None when the adapter has no variance (deterministic use only).
    """

    eps: Tensor
    x0: Tensor
    log_variance: Tensor | None = None


def convert_output(
    raw: Tensor,
    x_t: Tensor,
    i: Tensor,
    schedule: DiffusionSchedule,
    prediction: str = "eps",
    variance: str = "fixed_small",
    learned_sigma: bool = False,
) -> ModelOutput:
    """Turn a raw net output into a :class:`ModelOutput`.

    Args:
        raw: ``[B, C, H, W]`` or, when ``learned_sigma``, ``[B, 2C, H, W]`` (prediction then
            variance channels, as ADM).
        x_t: the net input ``[B, C, H, W]``.
        i: LongTensor[B], indices into ``schedule``'s used steps.
        prediction: what the first C channels are: ``eps``, ``x0`` or ``v``
            (v = sqrt(abar) eps - sqrt(1 - abar) x0).
        variance: ``fixed_small`` (posterior variance beta~_t, DDPM), ``fixed_large`` (beta_t),
            ``learned_range`` (IDDPM eq. 15: the extra channels v in [-1, 1] interpolate
            log beta~_t .. log beta_t) or ``learned`` (extra channels are the log variance).
        learned_sigma: whether ``raw`` carries the extra variance channels.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    if variance in ("learned_range", "learned") and not learned_sigma:
        raise ValueError(f"variance={variance!r} needs a net with learned_sigma (2C outputs)")
    var_values = None
    if learned_sigma:
        raw, var_values = raw.chunk(2, dim=1)
    if prediction == "eps":
        eps = raw
        x0 = schedule.x0_from_eps(x_t, i, eps)
    elif prediction == "x0":
        x0 = raw
        eps = schedule.eps_from_x0(x_t, i, x0)
    else:
        x0 = schedule.x0_from_v(x_t, i, raw)
        eps = schedule.eps_from_v(x_t, i, raw)
    if variance == "fixed_small":
        log_variance = schedule.posterior_log_variance(i, x_t)
    elif variance == "fixed_large":
        log_variance = schedule.fixed_large_log_variance(i, x_t)
    elif variance == "learned_range":
        log_variance = schedule.learned_range_log_variance(var_values, i)
    else:
        log_variance = var_values
    return ModelOutput(eps=eps, x0=x0, log_variance=log_variance)


class DiffusionModel(nn.Module):
    """A raw net ``net(x_t, t) -> Tensor`` seen through a schedule: ``(x_t, i) -> ModelOutput``.

    Args:
        net: called with x_t ``[B, C, H, W]`` (in the net's range, [-1, 1] for pixel priors) and
            the original timesteps ``t`` (LongTensor[B]).
        schedule: the (possibly respaced) schedule the sampler walks; ``i`` indexes its steps.
        prediction: ``eps`` | ``x0`` | ``v`` (what the net predicts).
        learned_sigma: the net returns 2C channels, the second half variance values.
        variance: see :func:`convert_output`; default ``learned_range`` when ``learned_sigma``
            (ADM), else ``fixed_small``.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: DiffusionSchedule,
        prediction: str = "eps",
        learned_sigma: bool = False,
        variance: str | None = None,
    ):
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.prediction = prediction
        self.learned_sigma = learned_sigma
        self.variance = variance or ("learned_range" if learned_sigma else "fixed_small")
        # validate the combination once, at construction
        if prediction not in PREDICTIONS or self.variance not in VARIANCES:
            raise ValueError(f"bad prediction/variance: {prediction!r}, {self.variance!r}")
        if self.variance in ("learned_range", "learned") and not learned_sigma:
            raise ValueError(f"variance={self.variance!r} needs learned_sigma=True")

    @classmethod
    def from_prior(
        cls,
        prior: nn.Module,
        timesteps: list[int] | None = None,
        prediction: str = "eps",
        variance: str | None = None,
    ) -> DiffusionModel:
        """Adapter for a :class:`~bir.diffusion.prior.PixelPrior` (uses its ``betas`` and
        ``learned_sigma``), respaced to ``timesteps`` (all steps if None)."""
        schedule = DiffusionSchedule(prior.betas.cpu(), timesteps)
        return cls(prior, schedule, prediction, bool(prior.learned_sigma), variance)

    def forward(self, x_t: Tensor, i: Tensor) -> ModelOutput:
        """x_t ``[B, C, H, W]``, i LongTensor[B] (step indices) -> :class:`ModelOutput`."""
        raw = self.net(x_t, self.schedule.t(i))
        return convert_output(
            raw, x_t, i, self.schedule, self.prediction, self.variance, self.learned_sigma
        )
