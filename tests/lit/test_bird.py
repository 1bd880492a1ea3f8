"""BIRD on a tiny random prior: loss decrease, sphere projection, gradients in both modes
(finite differences / analytic), batch independence, kernel estimates, sizes, the Trainer."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from bir.diffusion.prior import PixelPrior
from bir.lit.bird import BIRD, ddim_step
from bir.nets.unet import UNetModel
from bir.operators import (
    AvgPoolDownsample,
    FixedKernelBlur,
    InpaintMask,
    KernelMLPBlur,
    LearnableKernelBlur,
)


class TinyEpsNet(nn.Module):
    """A small time-conditioned conv net called as ``net(x_t, t)`` (GroupNorm: per-image)."""

    def __init__(self, channels: int = 3, width: int = 8):
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.time = nn.Linear(2, width)
        self.norm = nn.GroupNorm(2, width)
        self.down = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.out = nn.Conv2d(2 * width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        phase = t.to(x.dtype)[:, None] / 1000 * math.pi
        emb = self.time(torch.cat([phase.sin(), phase.cos()], 1))[:, :, None, None]
        h = torch.tanh(self.norm(self.inp(x) + emb))
        low = nn.functional.interpolate(torch.tanh(self.down(h)), scale_factor=2.0)
        return self.out(torch.cat([h, low], 1))


def tiny_unet(out_channels: int = 6) -> nn.Module:
    """A tiny ADM-flavour UNet (learned sigma: 6 output channels), random weights; the zero-init
    output conv is re-drawn so eps is not identically 0."""
    torch.manual_seed(0)
    net = UNetModel(in_channels=3, model_channels=32, out_channels=out_channels, num_res_blocks=1,
                    attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=16,
                    use_scale_shift_norm=True, resblock_updown=True)  # fmt: skip
    nn.init.normal_(net.out[-1].weight, std=0.05)
    return net


def make_prior(net: str = "unet", dtype: torch.dtype = torch.float32) -> PixelPrior:
    """``unet``: tiny ADM UNet with learned sigma; ``conv``: :class:`TinyEpsNet`, which (unlike
    the UNet, whose GroupNorm32 computes in float32 as the references do) is exact in float64."""
    if net == "unet":
        return PixelPrior(tiny_unet(), None, learned_sigma=True, image_size=16).to(dtype)
    torch.manual_seed(0)
    return PixelPrior(TinyEpsNet(), None, learned_sigma=False, image_size=16).to(dtype)


def observation(shape=(1, 3, 16, 16), seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_ddim_schedule_matches_the_reference_timesteps():
    bird = BIRD(make_prior(), FixedKernelBlur(kernel_size=3, sigma=1.0), delta_t=100)
    assert bird.schedule.timesteps.tolist() == list(range(0, 1000, 100))
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    # last update (t=0) goes to alpha_bar = 1: the output is the clamped x0
    x, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    out, x0 = ddim_step(bird.schedule, x, 0, eps)
    assert torch.equal(out, x0)
    a, a_prev = abar[500].item(), abar[400].item()
    out, x0 = ddim_step(bird.schedule, x, 5, eps)
    x0_ref = ((x - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)
    eps_ref = (x - math.sqrt(a) * x0_ref) / math.sqrt(1 - a)
    assert torch.allclose(
        out, math.sqrt(a_prev) * x0_ref + math.sqrt(1 - a_prev) * eps_ref, atol=1e-6
    )


@pytest.mark.parametrize("network_grad", [False, True])
def test_one_iteration_decreases_the_data_loss(network_grad):
    y = observation()
    bird = BIRD(make_prior(), FixedKernelBlur(kernel_size=3, sigma=1.0), delta_t=250, iterations=2,
                lr=0.05, network_grad=network_grad, size_multiple=8)  # fmt: skip
    out = bird.restore(y, torch.tensor([0]))
    assert out["loss_curve"].shape == (1, 2)
    assert out["loss_curve"][0, 1] < out["loss_curve"][0, 0]
    assert (
        out["restored"].shape == y.shape
        and 0 <= out["restored"].min()
        and out["restored"].max() <= 1
    )


def test_sphere_projection_holds_after_every_step():
    norms = []

    class Recording(BIRD):
        @staticmethod
        def project_to_sphere(x_T):
            BIRD.project_to_sphere(x_T)
            norms.append(x_T.flatten(1).norm(dim=1).clone())

    bird = Recording(make_prior(), InpaintMask(kind="box", box_size=4), delta_t=250, iterations=3,
                     lr=0.5, size_multiple=8)  # fmt: skip
    out = bird.restore(observation((2, 3, 16, 16)), torch.tensor([0, 1]))
    assert len(norms) == 3
    for n in norms:
        assert torch.allclose(n, torch.full((2,), math.sqrt(3 * 16 * 16)), rtol=1e-5)
    assert torch.allclose(out["x_T"].flatten(1).norm(dim=1), norms[-1])


def loss_of(bird: BIRD, x_T: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return bird.data_loss((bird.decode(x_T) + 1) / 2, y).sum()


def test_full_gradient_matches_finite_differences():
    y = observation(dtype=torch.float64)
    bird = BIRD(make_prior("conv", dtype=torch.float64), FixedKernelBlur(kernel_size=3, sigma=1.0).double(),
                delta_t=250, network_grad=True)  # fmt: skip
    x_T = torch.randn(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x_T.requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of(bird, x_T, y), x_T)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(3):
            v = torch.randn(x_T.shape, generator=gen, dtype=torch.float64)
            h = 1e-6
            fd = (loss_of(bird, x_T + h * v, y) - loss_of(bird, x_T - h * v, y)) / (2 * h)
            assert torch.allclose(fd, (grad * v).sum(), rtol=1e-5, atol=1e-9)


def test_network_free_gradient_is_the_explicit_ddim_jacobian():
    y = observation(dtype=torch.float64)
    bird = BIRD(make_prior("conv", dtype=torch.float64), FixedKernelBlur(kernel_size=3, sigma=1.0).double(),
                delta_t=250, network_grad=False)  # fmt: skip
    x_T = torch.randn(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x_T.requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of(bird, x_T, y), x_T)
    # by hand: each update is element-wise linear in x_t with slope m sqrt(a'/a) + (1-m) sqrt((1-a')/(1-a))
    s, x, slope = bird.schedule, x_T.detach(), torch.ones_like(x_T)
    with torch.no_grad():
        for i in reversed(range(len(s))):
            a, a_prev = s.alphas_cumprod[i].item(), s.alphas_cumprod_prev[i].item()
            eps = bird.prior(x, s.timesteps[i].expand(1))
            inside = (((x - math.sqrt(1 - a) * eps) / math.sqrt(a)).abs() <= 1).double()
            slope = slope * (
                inside * math.sqrt(a_prev / a) + (1 - inside) * math.sqrt((1 - a_prev) / (1 - a))
            )
            x, _ = ddim_step(s, x, i, eps)
    x0 = x.clone().requires_grad_(True)
    (dl_dx0,) = torch.autograd.grad(bird.data_loss((x0 + 1) / 2, y).sum(), x0)
    assert torch.allclose(grad, slope * dl_dx0, rtol=1e-10, atol=1e-14)
    assert grad.abs().max() > 0


def test_batch_of_two_equals_two_runs_of_one():
    def run(y, index):
        bird = BIRD(make_prior(), KernelMLPBlur(kernel_size=5, latent_dim=8, hidden=16),
                    delta_t=250, iterations=3, lr=0.01, lr_operator=1e-3, size_multiple=8)  # fmt: skip
        return bird.restore(y, torch.tensor(index))

    y = observation((2, 3, 16, 16))
    both = run(y, [4, 9])
    for b, index in enumerate([4, 9]):
        one = run(y[b : b + 1], [index])
        for key in ("restored", "loss_curve", "kernel", "x_T"):
            assert torch.allclose(both[key][b], one[key][0], atol=1e-5), key
    assert not torch.allclose(both["x_T"][0], both["x_T"][1])


def test_learned_kernel_stays_a_distribution():
    bird = BIRD(make_prior(), LearnableKernelBlur(kernel_size=5, init="uniform"), delta_t=250,
                iterations=4, lr=0.05, lr_operator=0.5, size_multiple=8)  # fmt: skip
    kernel = bird.restore(observation((2, 3, 16, 16)), torch.tensor([0, 1]))["kernel"]
    assert kernel.shape == (2, 1, 5, 5) and (kernel >= 0).all()
    assert torch.allclose(kernel.sum((-1, -2)), torch.ones(2, 1), atol=1e-6)
    assert not torch.allclose(kernel, torch.full_like(kernel, 1 / 25))  # it moved


def test_super_resolution_and_padding_sizes():
    bird = BIRD(make_prior(), AvgPoolDownsample(2), delta_t=500, iterations=1, size_multiple=8)
    out = bird.restore(observation((1, 3, 10, 6)), torch.tensor([0]))
    assert out["restored"].shape == (1, 3, 20, 12) and out["x_T"].shape == (1, 3, 24, 16)
    strict = BIRD(make_prior(), AvgPoolDownsample(2), delta_t=500, iterations=1,
                  size_multiple=8, fully_convolutional=False)  # fmt: skip
    with pytest.raises(ValueError, match="only runs at 16x16"):
        strict.restore(observation((1, 3, 10, 6)), torch.tensor([0]))


def test_inference_mode_is_refused():
    bird = BIRD(make_prior(), AvgPoolDownsample(2), delta_t=500, iterations=1, size_multiple=8)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode=False"):
        bird.restore(observation((1, 3, 8, 8)), torch.tensor([0]))


def test_predict_through_the_trainer_returns_the_contract(tmp_path):
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    batches = [
        {"lq": observation((3, 16, 16), seed=i), "name": f"img{i}", "index": torch.tensor(i)}
        for i in range(2)
    ]
    loader = DataLoader(batches, batch_size=2, collate_fn=lambda items: {
        "lq": torch.stack([it["lq"] for it in items]), "name": [it["name"] for it in items],
        "index": torch.stack([it["index"] for it in items])})  # fmt: skip
    bird = BIRD(make_prior(), KernelMLPBlur(kernel_size=3, latent_dim=4, hidden=8), delta_t=500,
                iterations=2, size_multiple=8)  # fmt: skip
    logger = CSVLogger(tmp_path)
    trainer = pl.Trainer(
        accelerator="cpu", inference_mode=False, logger=logger, enable_progress_bar=False
    )
    (out,) = trainer.predict(bird, dataloaders=loader)
    assert out["name"] == ["img0", "img1"] and out["restored"].shape == (2, 3, 16, 16)
    assert out["loss_curve"].shape == (2, 2) and out["kernel"].shape == (2, 1, 3, 3)
    assert torch.isfinite(out["restored"]).all()
    logger.save()
    lines = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("predict/loss") or "predict/loss" in lines[0]
    assert len(lines) == 1 + 2


PRESETS = {  # published configs/*.yml of the BIRD repository
    "bird_deblur": ("KernelMLPBlur", 100, 3e-3, 2e-4),
    "bird_sr8": ("AvgPoolDownsample", 100, 1e-3, None),
    "bird_denoise": ("Identity", 200, 1e-2, None),
    "bird_inpaint": ("InpaintMask", 200, 1e-2, None),
}


@pytest.mark.parametrize("experiment", sorted(PRESETS))
def test_experiment_presets_compose(experiment):
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(
            "restore", overrides=["method=bird", f"experiment={experiment}", "input=a", "output=b"]
        )
    OmegaConf.set_struct(cfg, False)
    cfg.prior = {
        "_target_": "bir.diffusion.prior.PixelPrior",
        "net": {"_target_": "torch.nn.Identity"},
    }
    bird = instantiate(cfg.method)
    cls, iterations, lr, lr_operator = PRESETS[experiment]
    assert type(bird.operator).__name__ == cls and bird.iterations == iterations and bird.lr == lr
    assert lr_operator is None or bird.lr_operator == lr_operator
    assert bird.delta_t == 100 and bird.schedule.timesteps.tolist()[-1] == 900
    assert cfg.trainer.inference_mode is False and bird.network_grad is False
