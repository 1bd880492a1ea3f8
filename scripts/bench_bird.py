"""Benchmark BIRD: seconds per image and overhead over the bare network evaluations it needs.

For each gradient mode and batch size, times ``BIRD.restore`` and, in the same run, the same
number of bare network evaluations on the same shapes: forward only under ``no_grad`` for
``network_grad=false``; a chain of forwards through the DDIM steps plus one backward for
``network_grad=true``. The ratio total / bare is BIRD's overhead (DDIM arithmetic, operator,
Adam, projection); the target is <= 1.15.

    python scripts/bench_bird.py --size 64 --iterations 5 --batch-sizes 1 4

The prior is a small random network: ``bir.nets.unet.UNetModel`` (ADM flavour) when it is
available, else a small time-conditioned conv net with the same ``net(x, t)`` call.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from bir.diffusion.prior import PixelPrior
from bir.lit.bird import BIRD
from bir.operators import KernelMLPBlur


class SmallEpsNet(nn.Module):
    """Conv net ``net(x_t [-1, 1], t) -> eps`` with one 2x-down level (fallback prior)."""

    def __init__(self, channels: int = 3, width: int = 64):
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.time = nn.Sequential(nn.Linear(2, width), nn.SiLU(), nn.Linear(width, width))
        self.body = nn.Sequential(
            nn.GroupNorm(8, width),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.GroupNorm(8, width),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.Upsample(scale_factor=2.0),
            nn.Conv2d(width, width, 3, padding=1),
        )
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        phase = t.to(x.dtype)[:, None] / 1000 * math.pi
        emb = self.time(torch.cat([phase.sin(), phase.cos()], 1))[:, :, None, None]
        h = self.inp(x) + emb
        return self.out(h + self.body(h))


def make_net() -> tuple[nn.Module, str, bool]:
    """(net, description, learned_sigma): a small ADM UNet when bir.nets.unet exists, else
    :class:`SmallEpsNet`."""
    try:
        from bir.nets.unet import UNetModel
    except ImportError:
        return SmallEpsNet(), "SmallEpsNet (bir.nets.unet not available)", False
    net = UNetModel(
        in_channels=3,
        model_channels=64,
        out_channels=6,
        num_res_blocks=1,
        attention_resolutions=(4,),
        channel_mult=(1, 2, 2),
        num_head_channels=32,
        use_scale_shift_norm=True,
        resblock_updown=True,
    )
    nn.init.normal_(net.out[-1].weight, std=0.02)  # released init is zero: eps would be 0
    n = sum(p.numel() for p in net.parameters()) / 1e6
    return (
        net,
        f"ADM UNetModel (ch 64, mult 1-2-2, 1 res block, attn at 1/4; {n:.1f}M params)",
        True,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_bird(bird: BIRD, y: torch.Tensor, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    bird.restore(y, torch.arange(y.shape[0], device=device))
    sync(device)
    return time.perf_counter() - start


def time_bare(bird: BIRD, shape: tuple[int, ...], iterations: int, device: torch.device) -> float:
    """The network calls of ``iterations`` BIRD iterations, and nothing else."""
    timesteps = bird.schedule.timesteps.flip(0).to(device)
    x = torch.randn(shape, device=device)
    sync(device)
    start = time.perf_counter()
    for _ in range(iterations):
        if bird.network_grad:
            h = x.clone().requires_grad_(True)
            out = h
            for t in timesteps:
                out = bird.prior(out, t.expand(shape[0]))[:, : shape[1]]
            out.sum().backward()
        else:
            with torch.no_grad():
                for t in timesteps:
                    bird.prior(x, t.expand(shape[0]))
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--iterations", type=int, default=5, help="BIRD iterations per run")
    parser.add_argument("--delta-t", type=int, default=100, help="DDIM step size")
    parser.add_argument("--kernel-size", type=int, default=41, help="kernel MLP size")
    parser.add_argument("--repeats", type=int, default=3, help="timings per row (minimum kept)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    net, net_name, learned_sigma = make_net()
    prior = PixelPrior(net, learned_sigma=learned_sigma, image_size=args.size).to(device)
    print(
        f"device {device}, prior {net_name}, {args.size}px, {args.iterations} iterations, "
        f"delta_t {args.delta_t}, kernel MLP {args.kernel_size}"
    )
    header = (
        f"{'network_grad':>12} {'B':>3} {'s/image':>9} {'BIRD s':>8} {'bare s':>8} {'ratio':>6}"
    )
    print(header, flush=True)
    print("-" * len(header))
    for network_grad in (False, True):
        for b in args.batch_sizes:
            operator = KernelMLPBlur(kernel_size=args.kernel_size)
            bird = BIRD(
                prior,
                operator,
                delta_t=args.delta_t,
                iterations=args.iterations,
                network_grad=network_grad,
                size_multiple=8,
            ).to(device)
            y = torch.rand(b, 3, args.size, args.size, device=device)
            warm = BIRD(
                prior,
                KernelMLPBlur(kernel_size=args.kernel_size),
                delta_t=args.delta_t,
                iterations=1,
                network_grad=network_grad,
                size_multiple=8,
            ).to(device)
            time_bird(warm, y, device)
            # interleaved repeats, minimum of each: robust to other load on a shared machine
            totals, bares = [], []
            for _ in range(args.repeats):
                totals.append(time_bird(bird, y, device))
                bares.append(time_bare(bird, tuple(y.shape), args.iterations, device))
            total, bare = min(totals), min(bares)
            print(
                f"{str(network_grad):>12} {b:>3} {total / b:>9.3f} {total:>8.2f} {bare:>8.2f} "
                f"{total / bare:>6.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
