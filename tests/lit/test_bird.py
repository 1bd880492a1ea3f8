"""BIRD on a tiny random prior: the released DDIM schedule and step, loss decrease, sphere
projection, gradients in both modes (finite differences / analytic), the released loss scale and
result iteration, batch independence, operator parameters learned, sizes, the Trainer, presets."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from bir.diffusion.prior import PixelPrior
from bir.lit.bird import BIRD, bird_timesteps
from bir.nets.unet import UNetModel
from bir.operators import (
    AvgPoolDownsample,
    FixedKernelBlur,
    InpaintMask,
    KernelMaskOperator,
    KernelMLPBlur,
    LearnableKernelBlur,
    LowLightOperator,
)
from tests.conftest import compose_config


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
    net = UNetModel(
        in_channels=3,
        model_channels=32,
        out_channels=out_channels,
        num_res_blocks=1,
        attention_resolutions=(2,),
        channel_mult=(1, 2),
        num_head_channels=16,
        use_scale_shift_norm=True,
        resblock_updown=True,
    )
    nn.init.normal_(net.out[-1].weight, std=0.05)
    return net


def make_prior(net: str = "conv", dtype: torch.dtype = torch.float32) -> PixelPrior:
    """``conv``: :class:`TinyEpsNet` (cheap, and exact in float64); ``unet``: tiny ADM UNet with
    learned sigma (6 output channels; its GroupNorm32 computes in float32 as the references do)."""
    if net == "unet":
        return PixelPrior(tiny_unet(), learned_sigma=True, image_size=16).to(dtype)
    torch.manual_seed(0)
    return PixelPrior(TinyEpsNet(), learned_sigma=False, image_size=16).to(dtype)


def observation(shape=(1, 3, 16, 16), seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def released_timesteps(T: int, delta_t: int) -> list[int]:
    """The released ``DDIMScheduler.set_timesteps(T // delta_t)``, written out (descending)."""
    n = T // delta_t
    return [k * (T // n) for k in reversed(range(n))]


def released_ddim(prior: PixelPrior, x: torch.Tensor, delta_t: int) -> torch.Tensor:
    """The released ``DDIM_efficient_feed_forward``: diffusers' DDIM step, eta 0,
    ``clip_sample`` and ``use_clipped_model_output``, prev step ``t - T // n``, alpha_bar 1
    below 0; independent of bir's schedule classes."""
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0).tolist()
    ratio = 1000 // (1000 // delta_t)
    for t in released_timesteps(1000, delta_t):
        with torch.no_grad():  # noise_pred[:, :3]: the eps half of a learned-sigma output
            eps = prior(x, torch.full((x.shape[0],), t))[:, :3]
        a, a_prev = abar[t], (abar[t - ratio] if t - ratio >= 0 else 1.0)
        x0 = ((x - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x


# --- schedule and the DDIM chain -----------------------------------------------------------------
def test_timesteps_are_the_released_set_timesteps():
    # hand-computed: set_timesteps(1000 // delta_t), stride 1000 // n
    assert bird_timesteps(1000, 300) == [0, 333, 666]
    assert bird_timesteps(1000, 150) == [0, 166, 332, 498, 664, 830]
    assert bird_timesteps(1000, 100) == list(range(0, 1000, 100))
    assert bird_timesteps(1000, 500) == [0, 500]
    for delta_t in (1, 7, 100, 150, 250, 300, 333, 400, 500):
        assert bird_timesteps(1000, delta_t) == sorted(released_timesteps(1000, delta_t))
    bird = BIRD(make_prior(), FixedKernelBlur(kernel_size=3, sigma=1.0), delta_t=300)
    assert bird.schedule.timesteps.tolist() == [0, 333, 666]
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    assert torch.allclose(bird.schedule.alphas_cumprod, abar[[0, 333, 666]])
    prev = torch.tensor([1.0, abar[0].item(), abar[333].item()], dtype=torch.float64)
    assert torch.allclose(bird.schedule.alphas_cumprod_prev, prev)  # the last step lands on x0


@pytest.mark.parametrize("delta_t", [0, -5, 501, 1000, 2000, 100.5, "100"])
def test_bad_delta_t_is_refused_with_one_clear_line(delta_t):
    with pytest.raises(
        ValueError, match=r"delta_t \(the DDIM step size\) must be an integer in \[1, 500\]"
    ):
        BIRD(make_prior(), FixedKernelBlur(kernel_size=3, sigma=1.0), delta_t=delta_t)


@pytest.mark.parametrize("delta_t", [300, 150])
def test_decode_is_the_released_ddim_chain(delta_t):
    prior = make_prior("conv", dtype=torch.float64)
    bird = BIRD(prior, FixedKernelBlur(kernel_size=3, sigma=1.0).double(), delta_t=delta_t)
    x_T = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x_T = 3 * x_T  # large enough that the clamp of x0 is active on some steps
    assert torch.allclose(bird.decode(x_T), released_ddim(prior, x_T, delta_t), atol=1e-12)


def test_decode_takes_eps_from_a_learned_sigma_output():
    prior = make_prior("unet")  # 6 output channels: eps, then variance values
    bird = BIRD(prior, FixedKernelBlur(kernel_size=3, sigma=1.0), delta_t=500)
    x_T = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(bird.decode(x_T), released_ddim(prior, x_T, 500), atol=1e-5)


# --- the optimisation ----------------------------------------------------------------------------
@pytest.mark.parametrize("network_grad", [False, True])
def test_one_iteration_decreases_the_data_loss(network_grad):
    y = observation()
    bird = BIRD(
        make_prior(),
        FixedKernelBlur(kernel_size=3, sigma=1.0),
        delta_t=250,
        iterations=2,
        lr=0.05,
        network_grad=network_grad,
        size_multiple=8,
    )
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

    bird = Recording(
        make_prior(),
        InpaintMask(kind="box", box_size=4),
        delta_t=250,
        iterations=3,
        lr=0.5,
        size_multiple=8,
    )
    out = bird.restore(observation((2, 3, 16, 16)), torch.tensor([0, 1]))
    assert len(norms) == 3
    for n in norms:
        assert torch.allclose(n, torch.full((2,), math.sqrt(3 * 16 * 16)), rtol=1e-5)
    assert torch.allclose(out["x_T"].flatten(1).norm(dim=1), norms[-1])


def loss_of(bird: BIRD, x_T: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return bird.data_loss((bird.decode(x_T) + 1) / 2, y).sum()


def test_full_gradient_matches_finite_differences():
    y = observation(dtype=torch.float64)
    bird = BIRD(
        make_prior("conv", dtype=torch.float64),
        FixedKernelBlur(kernel_size=3, sigma=1.0).double(),
        delta_t=250,
        network_grad=True,
    )
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
    prior = make_prior("conv", dtype=torch.float64)
    bird = BIRD(
        prior, FixedKernelBlur(kernel_size=3, sigma=1.0).double(), delta_t=250, network_grad=False
    )
    x_T = torch.randn(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x_T.requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of(bird, x_T, y), x_T)
    assert all(p.grad is None for p in prior.parameters())
    # by hand: each update is element-wise linear in x_t with slope m sqrt(a'/a) + (1-m) sqrt((1-a')/(1-a))
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0).tolist()
    x, slope = x_T.detach(), torch.ones_like(x_T)
    with torch.no_grad():
        for t in (750, 500, 250, 0):
            a, a_prev = abar[t], (abar[t - 250] if t else 1.0)
            eps = prior(x, torch.tensor([t]))
            x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
            inside = (x0.abs() <= 1).double()
            slope = slope * (
                inside * math.sqrt(a_prev / a) + (1 - inside) * math.sqrt((1 - a_prev) / (1 - a))
            )
            x0 = x0.clamp(-1, 1)
            x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * (
                x - math.sqrt(a) * x0
            ) / math.sqrt(1 - a)
    x0 = x.clone().requires_grad_(True)
    (dl_dx0,) = torch.autograd.grad(bird.data_loss((x0 + 1) / 2, y).sum(), x0)
    assert torch.allclose(grad, slope * dl_dx0, rtol=1e-10, atol=1e-14)
    assert grad.abs().max() > 0


def test_signed_loss_is_the_released_mse_on_minus_one_one():
    kernel = torch.rand(5, 5, generator=torch.Generator().manual_seed(0))
    kernel = kernel / kernel.sum()
    x0, y = observation((2, 3, 12, 12), seed=3), observation((2, 3, 12, 12), seed=4)
    unit = BIRD(
        make_prior(),
        FixedKernelBlur(kernel, padding="zeros_signed", correlate=True),
        loss_range="unit",
    )
    signed = BIRD(
        make_prior(),
        FixedKernelBlur(kernel, padding="zeros_signed", correlate=True),
        loss_range="signed",
    )
    # the released blind_deblurring.py: nn.MSELoss(conv2d(x, k, padding="same"), y) on [-1, 1]
    blurred = nn.functional.conv2d(
        (2 * x0 - 1).reshape(6, 1, 12, 12), kernel[None, None], padding="same"
    )
    reference = ((blurred.reshape(2, 3, 12, 12) - (2 * y - 1)) ** 2).flatten(1).mean(1)
    assert torch.allclose(signed.data_loss(x0, y), reference, rtol=1e-5)
    assert torch.allclose(signed.data_loss(x0, y), 4 * unit.data_loss(x0, y), rtol=1e-5)
    with pytest.raises(ValueError, match="loss_range must be one of"):
        BIRD(make_prior(), FixedKernelBlur(kernel), loss_range="[-1,1]")


def test_save_every_returns_the_released_result_iteration():
    def run(iterations, save_every):
        bird = BIRD(
            make_prior(),
            FixedKernelBlur(kernel_size=3, sigma=1.0),
            delta_t=250,
            iterations=iterations,
            lr=0.05,
            save_every=save_every,
            size_multiple=8,
        )
        return bird.restore(observation(), torch.tensor([0]))

    saved = run(iterations=6, save_every=4)  # iterations 0 .. 5: the image of iteration 4
    assert saved["result_iteration"] == 4
    last = run(iterations=5, save_every=1)  # the same latent path; its last x0 is iteration 4's
    assert last["result_iteration"] == 4
    assert torch.equal(saved["restored"], last["restored"])
    assert torch.equal(saved["loss_curve"][:, :5], last["loss_curve"])
    assert not torch.equal(saved["x_T"], last["x_T"])  # the extra iteration moved x_T on


def test_batch_of_two_equals_two_runs_of_one():
    def run(y, index):
        bird = BIRD(
            make_prior(),
            KernelMLPBlur(kernel_size=5, latent_dim=8, hidden=16),
            delta_t=250,
            iterations=3,
            lr=0.01,
            lr_operator=1e-3,
            size_multiple=8,
        )
        return bird.restore(y, torch.tensor(index))

    y = observation((2, 3, 16, 16))
    both = run(y, [4, 9])
    for b, index in enumerate([4, 9]):
        one = run(y[b : b + 1], [index])
        for key in ("restored", "loss_curve", "kernel", "x_T"):
            assert torch.allclose(both[key][b], one[key][0], atol=1e-5), key
    assert not torch.allclose(both["x_T"][0], both["x_T"][1])


def test_given_latent_is_used():
    bird = BIRD(
        make_prior(), AvgPoolDownsample(2), delta_t=500, iterations=1, lr=0.0, size_multiple=8
    )
    x_T = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    out = bird.restore(observation((1, 3, 8, 8)), torch.tensor([0]), x_T=x_T)
    expected = (bird.decode(x_T).detach() + 1) / 2
    assert torch.allclose(out["restored"], expected.clamp(0, 1), atol=1e-6)
    with pytest.raises(ValueError, match=r"x_T must be \(1, 3, 16, 16\)"):
        bird.restore(observation((1, 3, 8, 8)), torch.tensor([0]), x_T=x_T[..., :8])


@pytest.mark.parametrize(
    "make_operator",
    [
        lambda: LearnableKernelBlur(kernel_size=5, init="uniform"),
        lambda: KernelMLPBlur(kernel_size=5, latent_dim=8, hidden=16),
        lambda: KernelMaskOperator(kernel_size=3, channels=3),
        lambda: LowLightOperator(),
    ],
    ids=["learnable_kernel", "kernel_mlp", "kernel_mask", "lowlight"],
)
def test_every_operator_parameter_is_learned(make_operator):
    """init_batch creates every parameter before the optimiser: each one moves (the mask of
    KernelMaskOperator / LowLightOperator used to appear after Adam was built, and never moved)."""
    op = make_operator()
    starts = {}

    class Recording(BIRD):
        def data_loss(self, x0, y):
            if not starts:
                starts.update(
                    {id(p): p.detach().clone() for g in op.param_groups(1.0) for p in g["params"]}
                )
            return super().data_loss(x0, y)

    bird = Recording(
        make_prior(), op, delta_t=250, iterations=3, lr=0.01, lr_operator=0.05, size_multiple=8
    )
    bird.restore(observation((2, 3, 16, 16)), torch.tensor([0, 1]))
    params = [p for g in op.param_groups(1.0) for p in g["params"]]
    assert params and len(params) == len(starts)
    for p in params:
        assert (p.detach() - starts[id(p)]).abs().max() > 0


def test_learned_kernel_stays_a_distribution():
    bird = BIRD(
        make_prior(),
        LearnableKernelBlur(kernel_size=5, init="uniform"),
        delta_t=250,
        iterations=4,
        lr=0.05,
        lr_operator=0.5,
        size_multiple=8,
    )
    kernel = bird.restore(observation((2, 3, 16, 16)), torch.tensor([0, 1]))["kernel"]
    assert kernel.shape == (2, 1, 5, 5) and (kernel >= 0).all()
    assert torch.allclose(kernel.sum((-1, -2)), torch.ones(2, 1), atol=1e-6)
    assert not torch.allclose(kernel, torch.full_like(kernel, 1 / 25))  # it moved


def test_super_resolution_and_padding_sizes():
    bird = BIRD(make_prior(), AvgPoolDownsample(2), delta_t=500, iterations=1, size_multiple=8)
    out = bird.restore(observation((1, 3, 10, 6)), torch.tensor([0]))
    assert out["restored"].shape == (1, 3, 20, 12) and out["x_T"].shape == (1, 3, 24, 16)
    strict = BIRD(
        make_prior(),
        AvgPoolDownsample(2),
        delta_t=500,
        iterations=1,
        size_multiple=8,
        fully_convolutional=False,
    )
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
    loader = DataLoader(
        batches,
        batch_size=2,
        collate_fn=lambda items: {
            "lq": torch.stack([it["lq"] for it in items]),
            "name": [it["name"] for it in items],
            "index": torch.stack([it["index"] for it in items]),
        },
    )
    bird = BIRD(
        make_prior(),
        KernelMLPBlur(kernel_size=3, latent_dim=4, hidden=8),
        delta_t=500,
        iterations=3,
        save_every=2,
        size_multiple=8,
    )
    logger = CSVLogger(tmp_path)
    trainer = pl.Trainer(
        accelerator="cpu", inference_mode=False, logger=logger, enable_progress_bar=False
    )
    (out,) = trainer.predict(bird, dataloaders=loader)
    # Lightning's default inference mode: BIRD leaves it itself and returns the same images
    default = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    (same,) = default.predict(bird, dataloaders=loader)
    assert torch.equal(same["restored"], out["restored"])
    assert torch.equal(same["loss_curve"], out["loss_curve"])
    assert out["name"] == ["img0", "img1"] and out["restored"].shape == (2, 3, 16, 16)
    assert out["loss_curve"].shape == (2, 3) and out["kernel"].shape == (2, 1, 3, 3)
    assert torch.equal(out["extras"]["final_loss"], out["loss_curve"][:, 2])  # the returned image's
    assert torch.isfinite(out["restored"]).all()
    logger.save()
    lines = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("predict/loss") or "predict/loss" in lines[0]
    assert len(lines) == 1 + 3


# --- presets: one per released script ----------------------------------------------------------
PRESETS = {  # released configs/*.yml: operator, Optimization_steps, lr (lr_img), lr_blur
    "bird_deblur": ("KernelMLPBlur", 100, 3e-3, 2e-4),
    "bird_sr8": ("AvgPoolDownsample", 100, 1e-3, None),
    "bird_denoise": ("Identity", 200, 1e-2, None),
    "bird_inpaint": ("InpaintMask", 200, 1e-2, None),
    "bird_nonuniform_deblur": ("Identity", 25, 2e-3, None),
}


def compose_preset(experiment: str, *overrides: str):
    return compose_config("restore", f"experiment={experiment}", *overrides)


@pytest.mark.parametrize("experiment", sorted(PRESETS))
def test_experiment_presets_have_the_released_numbers(experiment):
    from omegaconf import OmegaConf

    cfg = compose_preset(experiment)
    prior = OmegaConf.to_container(cfg.prior, resolve=False)
    assert prior["net"]["_target_"] == "bir.nets.ddpm_unet.DDPMUNet"  # the CelebA-HQ DDPM prior
    assert prior["ckpt_path"].endswith("/celeba_hq.ckpt") and prior["learned_sigma"] is False
    m = cfg.method
    cls, iterations, lr, lr_operator = PRESETS[experiment]
    assert cfg.operator._target_.endswith("." + cls)
    assert (m.iterations, m.lr, m.delta_t) == (iterations, lr, 100)
    assert lr_operator is None or m.lr_operator == lr_operator
    assert (m.network_grad, m.reduction, m.loss_range, m.save_every) == (
        False,
        "mean",
        "signed",
        10,
    )
    assert cfg.trainer.inference_mode is False
    if cls == "KernelMLPBlur":
        op = cfg.operator
        assert (op.kernel_size, op.padding, op.correlate) == (41, "zeros_signed", True)
        assert (op.latent_dim, op.hidden, op.latent_init, op.latent_scale) == (
            200,
            1000,
            "uniform",
            0.1,
        )


@pytest.mark.parametrize("experiment", sorted(PRESETS))
def test_experiment_presets_run_on_a_tiny_prior(experiment):
    from hydra.utils import instantiate

    cfg = compose_preset(experiment, "method.iterations=2", "method.size_multiple=8")
    bird = instantiate(cfg.method, prior=make_prior())
    assert type(bird.operator).__name__ == PRESETS[experiment][0]
    y = observation((1, 3, 2, 2) if experiment == "bird_sr8" else (1, 3, 16, 16))
    out = bird.restore(y, torch.tensor([0]))
    assert out["restored"].shape == (1, 3, 16, 16) and torch.isfinite(out["loss_curve"]).all()
    assert out["result_iteration"] == 0  # save_every 10: of two iterations, the first is the result
    assert bird.schedule.timesteps.tolist() == list(range(0, 1000, 100))
