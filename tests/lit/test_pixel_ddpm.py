"""PixelDDPM: loss terms against closed forms, EMA, per-sample randomness, sample logging and the
checkpoint round trip into PixelPrior."""

from __future__ import annotations

import math
from functools import partial

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bir.data.datasets import collate
from bir.diffusion.schedules import DiffusionSchedule, make_betas
from bir.lit.pixel_ddpm import (
    PixelDDPM,
    diffusion_loss_terms,
    discretized_gaussian_log_likelihood,
    load_pixel_prior,
    normal_kl,
)

SCHEDULE = {"kind": "linear", "T": 100, "beta_start": 1e-4, "beta_end": 0.02}


def tiny_net(out_channels: int = 3) -> nn.Module:
    """A small net with the prior call signature ``net(x, t)``: the ADM UNet when available."""
    try:
        from bir.nets.unet import UNetModel
    except ImportError:
        return _ConvNet(out_channels)
    return UNetModel(
        in_channels=3,
        model_channels=32,  # GroupNorm32 needs multiples of 32
        out_channels=out_channels,
        num_res_blocks=1,
        attention_resolutions=[2],
        channel_mult=[1, 1],
        num_head_channels=16,
        use_scale_shift_norm=True,
        resblock_updown=True,
    )


class _ConvNet(nn.Module):
    def __init__(self, out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 16, 3, padding=1)
        self.time = nn.Linear(1, 16)
        self.conv_out = nn.Conv2d(16, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x) + self.time(t.float()[:, None] / 100)[:, :, None, None]
        return self.conv_out(torch.nn.functional.silu(h))


class Crops(Dataset):
    def __init__(self, n: int = 8, size: int = 16):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, size, size, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"gt": self.images[i], "name": f"img{i}", "index": i}


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = torch.randn(4, 10, generator=g, dtype=torch.float64)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()),
        torch.distributions.Normal(m2, (0.5 * lv2).exp()),
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref)


def test_discretized_likelihood_is_a_distribution_over_256_bins():
    levels = torch.arange(256, dtype=torch.float64) / 255 * 2 - 1
    mean, log_scale = torch.full_like(levels, 0.2), torch.full_like(levels, math.log(0.3))
    logp = discretized_gaussian_log_likelihood(levels, mean, log_scale)
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    normal = torch.distributions.Normal(torch.tensor(0.2).double(), torch.tensor(0.3).double())
    x = levels[100]
    middle = normal.cdf(x + 1 / 255) - normal.cdf(x - 1 / 255)
    assert logp[100].item() == pytest.approx(middle.log().item(), rel=1e-7)
    assert logp[0].item() == pytest.approx(normal.cdf(levels[0] + 1 / 255).log().item(), rel=1e-7)


def _step(t_value: int):
    schedule = DiffusionSchedule(make_betas("linear", 100, 1e-4, 0.02))
    g = torch.Generator().manual_seed(1)
    x0 = (torch.randint(0, 256, (2, 3, 4, 4), generator=g) / 255 * 2 - 1).double()
    noise = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.full((2,), t_value)
    return schedule, x0, noise, t, schedule.q_sample(x0, t, noise)


def test_vb_term_zero_for_true_posterior_and_only_trains_variance():
    schedule, x0, noise, t, x_t = _step(50)
    # the true eps and variance values -1 (= the posterior variance) give KL 0 at t > 0
    var_values = (-torch.ones_like(noise)).requires_grad_(True)
    pred = noise.clone().requires_grad_(True)
    terms = diffusion_loss_terms(
        torch.cat([pred, var_values], 1), x0, x_t, t, noise, schedule, "eps", True
    )
    assert terms["mse"].abs().max() < 1e-12 and terms["vb"].abs().max() < 1e-9
    wrong = diffusion_loss_terms(
        torch.cat([pred, var_values + 0.5], 1), x0, x_t, t, noise, schedule, "eps", True
    )
    # same means, log-variances d apart (IDDPM eq. 15 with v = -1/2): KL = (exp(-d) + d - 1) / 2
    d = 0.25 * (schedule.betas[50].log() - schedule.posterior_log_variance_clipped[50]).item()
    expected = 0.5 * (math.exp(-d) + d - 1) / math.log(2)
    torch.testing.assert_close(
        wrong["vb"].detach(), torch.full((2,), expected, dtype=torch.float64)
    )
    g_pred, g_var = torch.autograd.grad(wrong["vb"].sum(), [pred, var_values])
    assert g_pred.abs().max() == 0 and g_var.abs().max() > 0  # mean channels detached (IDDPM)


def test_vb_term_at_t0_is_decoder_nll_in_bits():
    schedule, x0, noise, t, x_t = _step(0)
    raw = torch.cat([noise + 0.1, torch.zeros_like(noise)], 1)
    vb = diffusion_loss_terms(raw, x0, x_t, t, noise, schedule, "eps", True)["vb"]
    x0_hat = schedule.x0_from_eps(x_t, t, noise + 0.1)
    mean = schedule.posterior_mean(x0_hat, x_t, t)
    log_var = schedule.learned_range_log_variance(torch.zeros_like(noise), t)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).flatten(1).mean(
        1
    ) / math.log(2)
    torch.testing.assert_close(vb, nll)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_mse_targets(prediction):
    schedule, x0, noise, t, x_t = _step(30)
    a = schedule.alphas_cumprod[30]
    target = {"eps": noise, "x0": x0, "v": a.sqrt() * noise - (1 - a).sqrt() * x0}[prediction]
    assert (
        diffusion_loss_terms(target, x0, x_t, t, noise, schedule, prediction)["mse"].abs().max()
        < 1e-12
    )
    mse = diffusion_loss_terms(target + 0.5, x0, x_t, t, noise, schedule, prediction)["mse"]
    torch.testing.assert_close(mse, torch.full_like(mse, 0.25))


def test_draws_independent_of_batch_composition_and_vary_with_step():
    module = PixelDDPM(tiny_net(), SCHEDULE)
    t_full, n_full = module.draw_t_and_noise(torch.tensor([0, 1, 2, 3]), 5, (3, 4, 4))
    t_part, n_part = module.draw_t_and_noise(torch.tensor([2, 0]), 5, (3, 4, 4))
    assert torch.equal(t_part, t_full[[2, 0]]) and torch.equal(n_part, n_full[[2, 0]])
    _, n_next = module.draw_t_and_noise(torch.tensor([0, 1, 2, 3]), 6, (3, 4, 4))
    assert not torch.equal(n_next, n_full)
    t_many, _ = module.draw_t_and_noise(torch.arange(2000), 0, (1,))
    assert t_many.min() == 0 and t_many.max() == 99  # uniform over all T steps
    assert abs(t_many.double().mean().item() - 49.5) < 3


def test_ema_update_with_and_without_warmup():
    module = PixelDDPM(tiny_net(), SCHEDULE, ema_decay=0.9)
    p0 = [p.detach().clone() for p in module.ema_net.parameters()]
    with torch.no_grad():
        for p in module.net.parameters():
            p.add_(1.0)
    assert module.update_ema() == pytest.approx(0.1)  # warmup: (1 + 0) / (10 + 0)
    for e, a, p in zip(module.ema_net.parameters(), p0, module.net.parameters()):
        torch.testing.assert_close(e, 0.1 * a + 0.9 * p)
    plain = PixelDDPM(tiny_net(), SCHEDULE, ema_decay=0.9, ema_warmup=False)
    assert plain.update_ema() == pytest.approx(0.9)
    assert int(module.ema_updates) == 1 and not any(
        p.requires_grad for p in module.ema_net.parameters()
    )


def test_training_reduces_loss_on_fixed_batch():
    torch.manual_seed(0)
    module = PixelDDPM(_ConvNet(3), SCHEDULE)  # the loss mechanics, not the UNet, are under test
    batch = collate([Crops(4)[i] for i in range(4)])
    opt = torch.optim.Adam(module.net.parameters(), lr=3e-2)
    first = module.loss_terms(module.net, batch, 0)["loss"].item()
    for _ in range(100):
        loss = module.loss_terms(module.net, batch, 0)["loss"]  # same t and noise every step
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first  # measured: 1.04 -> 0.54


class ImageLogger(pl.loggers.CSVLogger):
    """A logger that takes images (like WandbLogger.log_image)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.images: list[tuple[str, list, int]] = []

    def log_image(self, key: str, images: list, step: int | None = None) -> None:
        self.images.append((key, images, step))


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_fit_logs_samples_and_checkpoint_loads_into_pixel_prior(tmp_path, learn_sigma):
    out = 6 if learn_sigma else 3
    module = PixelDDPM(
        tiny_net(out),
        OmegaConf.create(SCHEDULE),  # as Hydra passes it
        learn_sigma=learn_sigma,
        optimizer=partial(torch.optim.Adam, lr=1e-3),
        sample_every_n_steps=2,
        num_samples=2,
        sample_steps=4,
        image_size=16,
    )
    image_logger = ImageLogger(tmp_path, name="img")
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=[image_logger] if learn_sigma else pl.loggers.CSVLogger(tmp_path, name="csv"),
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(Crops(), batch_size=4, collate_fn=collate))
    if learn_sigma:
        assert [(k, s) for k, _, s in image_logger.images] == [
            ("train/samples", 2),
            ("train/samples", 4),
        ]
        grid = image_logger.images[0][1][0]
        # 2 tiles, padding 2; H x W x 3 in 8-bit levels (wandb.Image casts to uint8 as it is)
        assert grid.shape == (20, 38, 3) and grid.dtype == np.uint8 and grid.max() > 1
    else:
        assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
            "step0000002.png",
            "step0000004.png",
        ]
    assert int(module.ema_updates) == 4

    ckpt = tmp_path / "prior.ckpt"
    trainer.save_checkpoint(ckpt)
    # plain hyperparameters: the checkpoint resumes under torch.load(weights_only=True)
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["schedule"] == SCHEDULE
    prior = load_pixel_prior(
        tiny_net(out), str(ckpt), SCHEDULE, learned_sigma=learn_sigma, image_size=16
    )
    for (name, p), e in zip(prior.net.state_dict().items(), module.ema_net.state_dict().values()):
        torch.testing.assert_close(p, e, msg=name)
    # the EMA (warmup decays < 1) differs from the trained net, and the prior loaded the EMA
    assert any(
        not torch.equal(e, n) for e, n in zip(module.ema_net.parameters(), module.net.parameters())
    )
    samples = module.sample(3, steps=3)
    assert samples.shape == (3, 3, 16, 16) and torch.isfinite(samples).all()
    torch.testing.assert_close(samples[:2], module.sample(2, steps=3))  # same seeds, same images
