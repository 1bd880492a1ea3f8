"""Noise schedules, respacing and the closed-form quantities of Gaussian diffusion.

Notation follows DDPM (Ho et al. 2020) and IDDPM (Nichol & Dhariwal 2021):
``alpha_bar_t = prod_{s<=t} (1 - beta_s)``, ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``.
A :class:`DiffusionSchedule` holds these quantities for a *subset* of the original timesteps
(IDDPM respacing): its index ``i`` runs over the used steps in ascending order and the network is
always called with the original timestep ``schedule.timesteps[i]``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

from bir.errors import UsageError

Tensor = torch.Tensor


def make_betas(
    kind: str = "linear", T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Tensor:
    """Betas of length ``T`` in float64.

    - ``linear``: DDPM, linspace(beta_start, beta_end) (ADM/DDPM priors: 1e-4 -> 0.02).
    - ``scaled_linear``: Stable Diffusion, linspace(sqrt(beta_start), sqrt(beta_end))**2
      (SD 2.1: 0.00085 -> 0.012).
    - ``cosine``: IDDPM eq. 17, alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), s = 0.008, betas
      clipped at 0.999.
    """
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if kind == "cosine":
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        abar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {kind!r}; expected linear, scaled_linear or cosine")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so the last step has zero SNR (Lin et al. 2024, "Common diffusion noise
    schedules and sample steps are flawed", Algorithm 1): shift and scale sqrt(alpha_bar) so that
    its last value is 0 and its first is unchanged."""
    abar_sqrt = torch.cumprod(1 - betas, 0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    abar = abar_sqrt**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def space_timesteps(T: int, spec: int | str) -> list[int]:
    """IDDPM ``space_timesteps``: which of ``range(T)`` to keep.

    ``spec`` is an int / "50" (evenly strided over the whole range, first and last kept),
    "ddimN" (stride T//N starting at 0, as DDIM), or comma-separated counts per equal section
    ("10,15,20").
    """
    if not re.fullmatch(r"\d+|ddim\d+|\d+(,\d+)+", str(spec).replace(" ", "")):
        raise UsageError(
            f"steps={spec!r} is not a respacing: give a number of steps (50), ddimN (ddim25) or "
            "step counts per equal section ('10,15,20')"
        )
    spec = spec if isinstance(spec, int) else str(spec).replace(" ", "")
    if isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
        n = int(spec)
        return _space_sections(T, [n])
    if spec.startswith("ddim"):
        n = int(spec[4:])
        for stride in range(1, T):
            if len(range(0, T, stride)) == n:
                return list(range(0, T, stride))
        raise ValueError(f"cannot create exactly {n} DDIM steps from {T}")
    return _space_sections(T, [int(x) for x in spec.split(",")])


def _space_sections(T: int, counts: Sequence[int]) -> list[int]:
    size, extra = divmod(T, len(counts))
    out: list[int] = []
    start = 0
    for k, count in enumerate(counts):
        section = size + (1 if k < extra else 0)
        if count > section:
            raise ValueError(f"cannot take {count} steps from a section of {section}")
        if count <= 1:
            frac = 1.0
        else:
            frac = (section - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            out.append(start + round(cur))
            cur += frac
        start += section
    return sorted(set(out))


def _extract(values: Tensor, i: Tensor, like: Tensor) -> Tensor:
    """values[i] reshaped to broadcast against ``like`` ([B, 1, 1, 1]) in like's dtype/device."""
    out = values.to(like.device)[i.to(like.device)].to(like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


class DiffusionSchedule:
    """Quantities of a (possibly respaced) discrete diffusion.

    Args:
        betas: Tensor[T] of the full, original schedule.
        timesteps: the original timesteps to use (ascending, a subset of range(T)); all if None.
            Respacing follows IDDPM: the new betas are ``1 - abar[t_k] / abar[t_{k-1}]``, so the
            marginals q(x_t | x_0) at the kept steps are unchanged.
        final_alpha_cumprod: ``alpha_bar`` of the step below the first used one (1: the data, so
            the last step lands on x0; ldm's DDIM uses ``alpha_bar`` of training step 0).
    """

    def __init__(
        self,
        betas: Tensor,
        timesteps: Sequence[int] | Tensor | None = None,
        final_alpha_cumprod: float = 1.0,
    ):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        self.num_train_timesteps = len(betas)
        abar_full = torch.cumprod(1.0 - betas, 0)
        if timesteps is None:
            ts = torch.arange(len(betas))
        else:
            ts = torch.as_tensor(list(timesteps), dtype=torch.long).sort().values
            if ts.numel() == 0 or ts[0] < 0 or ts[-1] >= len(betas):
                raise ValueError(f"timesteps must lie in [0, {len(betas)})")
        self.timesteps = ts
        abar = abar_full[ts]
        # the step below the first used one: the data (abar = 1) by default; ldm's DDIM stops at
        # the first training step instead (final_alpha_cumprod = abar_full[0], see ldm_ddim_schedule)
        first_prev = torch.full((1,), float(final_alpha_cumprod), dtype=torch.float64)
        abar_prev = torch.cat([first_prev, abar[:-1]])
        self.alphas_cumprod = abar
        self.alphas_cumprod_prev = abar_prev
        self.betas = 1.0 - abar / abar_prev
        self.sqrt_alphas_cumprod = abar.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - abar).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / abar).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / abar - 1.0).sqrt()
        # q(x_{t-1} | x_t, x_0), DDPM eqs. 6-7
        self.posterior_variance = self.betas * (1.0 - abar_prev) / (1.0 - abar)
        # the first posterior variance is 0; IDDPM clips the log by repeating the second value
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([pv[1:2], pv[1:]]) if len(pv) > 1 else pv.clamp(min=1e-20)
        )
        self.posterior_mean_coef1 = self.betas * abar_prev.sqrt() / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * (1.0 - self.betas).sqrt() / (1.0 - abar)

    def __len__(self) -> int:
        return len(self.timesteps)

    @classmethod
    def from_config(
        cls,
        kind: str = "linear",
        T: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        steps: int | str | None = None,
        zero_terminal_snr: bool = False,
    ) -> DiffusionSchedule:
        """Schedule from config values; ``steps`` respaces (see :func:`space_timesteps`)."""
        betas = make_betas(kind, T, beta_start, beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        ts = (
            None
            if steps is None or int(str(steps).removeprefix("ddim")) == T
            else space_timesteps(T, steps)
        )
        return cls(betas, ts)

    def t(self, i: Tensor) -> Tensor:
        """Original timesteps (LongTensor) for step indices ``i``: what the network receives."""
        return self.timesteps.to(i.device)[i]

    # --- forward process and parameterisations ------------------------------------------------
    def q_sample(self, x0: Tensor, i: Tensor, noise: Tensor) -> Tensor:
        return (
            _extract(self.sqrt_alphas_cumprod, i, x0) * x0
            + _extract(self.sqrt_one_minus_alphas_cumprod, i, x0) * noise
        )

    def x0_from_eps(self, x_t: Tensor, i: Tensor, eps: Tensor) -> Tensor:
        return (
            _extract(self.sqrt_recip_alphas_cumprod, i, x_t) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, i, x_t) * eps
        )

    def eps_from_x0(self, x_t: Tensor, i: Tensor, x0: Tensor) -> Tensor:
        return (_extract(self.sqrt_recip_alphas_cumprod, i, x_t) * x_t - x0) / _extract(
            self.sqrt_recipm1_alphas_cumprod, i, x_t
        )

    def x0_from_v(self, x_t: Tensor, i: Tensor, v: Tensor) -> Tensor:
        """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022) -> x0."""
        return (
            _extract(self.sqrt_alphas_cumprod, i, x_t) * x_t
            - _extract(self.sqrt_one_minus_alphas_cumprod, i, x_t) * v
        )

    def eps_from_v(self, x_t: Tensor, i: Tensor, v: Tensor) -> Tensor:
        return (
            _extract(self.sqrt_one_minus_alphas_cumprod, i, x_t) * x_t
            + _extract(self.sqrt_alphas_cumprod, i, x_t) * v
        )

    def v_from_x0_eps(self, x0: Tensor, i: Tensor, eps: Tensor) -> Tensor:
        return (
            _extract(self.sqrt_alphas_cumprod, i, x0) * eps
            - _extract(self.sqrt_one_minus_alphas_cumprod, i, x0) * x0
        )

    # --- reverse process -----------------------------------------------------------------------
    def posterior_mean(self, x0: Tensor, x_t: Tensor, i: Tensor) -> Tensor:
        """Mean of q(x_{t-1} | x_t, x_0) (DDPM eq. 7)."""
        return (
            _extract(self.posterior_mean_coef1, i, x_t) * x0
            + _extract(self.posterior_mean_coef2, i, x_t) * x_t
        )

    def posterior_log_variance(self, i: Tensor, like: Tensor) -> Tensor:
        """Clipped log of the posterior variance ("fixed small"), broadcast like ``like``."""
        return _extract(self.posterior_log_variance_clipped, i, like)

    def fixed_large_log_variance(self, i: Tensor, like: Tensor) -> Tensor:
        """log(beta_t), with the first step's posterior variance as IDDPM's "fixed large"."""
        v = torch.cat([self.posterior_variance[1:2], self.betas[1:]])
        return _extract(torch.log(v), i, like)

    def learned_range_log_variance(self, model_var_values: Tensor, i: Tensor) -> Tensor:
        """IDDPM learned-range variance (eq. 15): interpolate log between beta_t and beta~_t.

        ``model_var_values`` are the network's extra channels, in [-1, 1].
        """
        min_log = _extract(self.posterior_log_variance_clipped, i, model_var_values)
        max_log = _extract(torch.log(self.betas), i, model_var_values)
        frac = (model_var_values + 1) / 2
        return frac * max_log + (1 - frac) * min_log


def ldm_ddim_timesteps(T: int, steps: int) -> list[int]:
    """DDIM timesteps in the latent-diffusion (CompVis ldm) convention that DiffBIR's released
    DDIM sampler uses: stride ``c = T // steps``, ``range(0, T, c)`` shifted by one, i.e.
    1, 21, 41, ..., 981 for 50 steps of 1000 (bir's ``ddimN`` spacing gives 0, 20, ..., 980).
    As ldm, a ``steps`` that does not divide ``T`` can give more steps than asked (7 of 1000:
    stride 142, eight steps 1 ... 995).

    ldm adds one "to get the final alpha values right"; together with
    ``final_alpha_cumprod = alpha_bar[0]`` (:func:`ldm_ddim_schedule`) the last DDIM step goes from
    t = 1 to training step 0, not to the data.
    """
    if not 0 < steps <= T:
        raise ValueError(f"DDIM steps must lie in [1, {T}], got {steps}")
    stride = T // steps
    ts = [t + 1 for t in range(0, T, stride)]
    if ts[-1] >= T:  # as ldm, where alpha_bar[T] is out of range
        raise UsageError(
            f"the ldm DDIM convention cannot take {steps} steps of {T} (the last would be t = "
            f"{ts[-1]}); choose steps with T % steps < T // steps - 1, e.g. a divisor of {T}"
        )
    return ts


def ldm_ddim_schedule(betas: Tensor, steps: int) -> DiffusionSchedule:
    """:class:`DiffusionSchedule` of ldm's DDIM (``make_ddim_timesteps("uniform")`` +
    ``make_ddim_sampling_parameters``): timesteps :func:`ldm_ddim_timesteps` and
    ``alpha_bar_prev`` of the first used step = ``alpha_bar`` of training step 0 (the final DDIM
    step returns ``sqrt(abar_0) x0 + sqrt(1 - abar_0) eps``, not x0)."""
    betas = torch.as_tensor(betas, dtype=torch.float64)
    abar0 = float(1.0 - betas[0])
    return DiffusionSchedule(
        betas, ldm_ddim_timesteps(len(betas), steps), final_alpha_cumprod=abar0
    )


def diffusers_ddim_timesteps(T: int, steps: int) -> list[int]:
    """DDIM timesteps in the diffusers ``DDIMScheduler.set_timesteps`` convention that BIRD's
    released code vendors (``timestep_spacing="leading"``, ``steps_offset=0``): stride
    ``c = T // steps``, timesteps ``0, c, 2c, ..., (steps - 1) c`` (ascending, as
    :func:`space_timesteps`). Exactly ``steps`` of them; when ``steps`` does not divide ``T`` the
    top one stays below ``T - c`` (3 of 1000: 0, 333, 666; 6 of 1000: 0, 166, ..., 830).

    Each DDIM update goes from ``t_k`` to ``t_{k-1}`` and the last one to the data
    (``alpha_bar = 1``, diffusers' ``set_alpha_to_one``), which is :class:`DiffusionSchedule`'s
    default.
    """
    if not 0 < steps <= T:
        raise ValueError(f"DDIM steps must lie in [1, {T}], got {steps}")
    stride = T // steps
    return [k * stride for k in range(steps)]
