"""Sampler overhead: wall time of each sampler over N steps against N bare network evaluations.

    python scripts/bench_samplers.py --steps 20 --batch 4 --size 64 --device cpu

Prints, per sampler, seconds and the ratio sampler / bare net (target <= 1.10): everything a
sampler adds per step (schedule look-ups, per-sample noise, the update) over the network itself.
"""

from __future__ import annotations

import argparse
import time

import torch

from bir.diffusion.parameterization import DiffusionModel
from bir.diffusion.samplers import sample_ddim, sample_ddpm, sample_dpmpp_2m
from bir.diffusion.schedules import DiffusionSchedule, make_betas, space_timesteps
from bir.nets.unet import UNetModel
from bir.random import randn, sample_generators


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="sampler steps N")
    parser.add_argument("--batch", type=int, default=4, help="images per batch")
    parser.add_argument("--size", type=int, default=64, help="image size (pixels)")
    parser.add_argument("--channels", type=int, default=64, help="UNet base width")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs, the fastest counts")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    torch.manual_seed(0)
    net = UNetModel(
        in_channels=3,
        model_channels=args.channels,
        out_channels=6,
        num_res_blocks=2,
        attention_resolutions=[4, 8],
        channel_mult=[1, 2, 2, 2],
        num_head_channels=32,
        use_scale_shift_norm=True,
        resblock_updown=True,
    )
    net = net.to(device).eval().requires_grad_(False)
    schedule = DiffusionSchedule(make_betas("linear", 1000), space_timesteps(1000, args.steps))
    model = DiffusionModel(net, schedule, learned_sigma=True)
    indices = list(range(args.batch))
    x_T = randn((3, args.size, args.size), sample_generators(0, indices, device, 0), device)
    t = torch.full((args.batch,), 500, device=device)

    def bare() -> None:
        for _ in range(args.steps):
            net(x_T, t)

    runs = {
        "bare net x N": bare,
        "ddpm": lambda: sample_ddpm(model, x_T, schedule, sample_generators(0, indices, device, 1)),
        "ddim": lambda: sample_ddim(model, x_T, schedule),
        "ddim eta=1": lambda: sample_ddim(
            model, x_T, schedule, eta=1.0, generators=sample_generators(0, indices, device, 1)
        ),
        "dpmpp_2m": lambda: sample_dpmpp_2m(model, x_T, schedule),
    }
    with torch.no_grad():
        runs["bare net x N"]()  # warm-up (allocator, kernels)
        seconds = {}
        for name, fn in runs.items():
            best = float("inf")
            for _ in range(args.repeats):
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                best = min(best, time.perf_counter() - start)
            seconds[name] = best
    base = seconds["bare net x N"]
    print(f"device={device} batch={args.batch} size={args.size} steps={args.steps}")
    for name, s in seconds.items():
        print(f"{name:14s} {s:8.3f} s   ratio {s / base:5.3f}")


if __name__ == "__main__":
    main()
