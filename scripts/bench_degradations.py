"""Throughput of the batched second-order degradation vs a per-sample reference, on CPU.

    python scripts/bench_degradations.py [--batch 16] [--size 256] [--repeats 6] [--threads 2]
                                         [--clock wall|process]

All run Real-ESRGAN's second-order model on the same batch of photo crops (skimage.data):
- batched: ``bir.degradations.SecondOrderDegradation`` (torch; kernels built in one call, one
  grouped convolution per blur, one DiffJPEG call per JPEG step);
- per-sample reference: the way Real-ESRGAN's dataset + model do it one image at a time, with
  kernels drawn in numpy per image (scipy's Bessel J1 for sinc) and every op applied per image
  with BasicSR-style torch calls of batch 1 (``filter_full``: reflect pad + the 21x21 kernel,
  interpolate, noise with ``torch.poisson``, bir's DiffJPEG), including the unique-value count of
  BasicSR's Poisson noise;
- BasicSR batch pipeline (``scripts/basicsr_reference.py``, needs the ``basicsr`` package of the
  dev extra): kernels drawn per image in numpy as ``RealESRGANDataset`` does, then
  ``RealESRGANModel.feed_data``'s ops with its per-batch resize / noise / order draws and BasicSR's
  own ``DiffJPEG``, ``filter2D`` and noise functions.
Prints images/s of each and bir's speed-up over each reference (median of per-repeat ratios, all
runs interleaved in one process).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy import special

from bir.degradations import DiffJPEG, SecondOrderDegradation, reflect_pad
from bir.random import sample_generators

try:  # run as a script (scripts/ on sys.path) or imported as scripts.bench_degradations
    import basicsr_reference
except ImportError:
    from scripts import basicsr_reference

KINDS = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
PROBS = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
SIZES = list(range(7, 22, 2))


def photo_crops(batch: int, size: int) -> torch.Tensor:
    """[batch, 3, size, size] crops in [0, 1] from the skimage sample photos."""
    from skimage import data, transform

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    crops = []
    rng = np.random.default_rng(0)
    for i in range(batch):
        img = photos[i % len(photos)]
        if min(img.shape[:2]) < size:
            img = (transform.resize(img, (size * 2, size * 2)) * 255).astype(np.uint8)
        y = int(rng.integers(0, img.shape[0] - size + 1))
        x = int(rng.integers(0, img.shape[1] - size + 1))
        crops.append(torch.from_numpy(img[y : y + size, x : x + size].copy()).permute(2, 0, 1))
    return torch.stack(crops).float() / 255


# ---------------- per-sample reference ----------------
def np_kernel(rng: random.Random, sigma: tuple[float, float]) -> np.ndarray:
    """One Real-ESRGAN blur kernel drawn and built in numpy, padded to 21."""
    k = rng.choice(SIZES)
    ax = np.arange(k) - (k - 1) / 2
    if rng.random() < 0.1:
        wc = rng.uniform(math.pi / 3 if k < 13 else math.pi / 5, math.pi)
        r = np.sqrt(ax[None] ** 2 + ax[:, None] ** 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            kern = wc * special.j1(wc * r) / (2 * np.pi * r)
        kern[k // 2, k // 2] = wc**2 / (4 * np.pi)
    else:
        kind = rng.choices(KINDS, PROBS)[0]
        sx = rng.uniform(*sigma)
        sy, th = (
            (rng.uniform(*sigma), rng.uniform(-math.pi, math.pi)) if "aniso" in kind else (sx, 0.0)
        )
        rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
        inv = np.linalg.inv(rot @ np.diag([sx**2, sy**2]) @ rot.T)
        xx, yy = np.meshgrid(ax, ax)
        xy = np.stack([xx, yy], -1)
        q = np.einsum("hwi,ij,hwj->hw", xy, inv, xy)
        beta = rng.uniform(0.5, 4) if "generalized" in kind else rng.uniform(1, 2)
        kern = (
            np.exp(-0.5 * q)
            if kind in ("iso", "aniso")
            else (np.exp(-0.5 * q**beta) if "generalized" in kind else 1 / (q**beta + 1))
        )
    kern = kern / kern.sum()
    return np.pad(kern, (21 - k) // 2)


def ref_noise(
    x: torch.Tensor, rng: random.Random, sigma_max: float, poisson_max: float
) -> torch.Tensor:
    gray = rng.random() < 0.4
    if rng.random() < 0.5:
        n = torch.randn(1 if gray else 3, *x.shape[-2:], device=x.device)
        n = n * rng.uniform(1, sigma_max) / 255
        return (x + n).clamp(0, 1)
    src = (x * 255).round().clamp(0, 255) / 255
    vals = 2 ** math.ceil(math.log2(len(torch.unique(src))))  # BasicSR's unique-value count
    n = torch.poisson(src * vals) / vals - src
    return (x + rng.uniform(0.05, poisson_max) * n).clamp(0, 1)


def filter_full(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """BasicSR's ``filter2D`` for one image: reflect pad k // 2 and a 21x21 convolution per
    channel (the zero-padded kernel at its full size, as BasicSR runs it). bir's ``reflect_pad``
    equals torch's reflect pad and also serves images smaller than the pad (tiny test sizes)."""
    k = kernel.shape[-1]
    padded = reflect_pad(img, k // 2, k // 2, k // 2, k // 2)
    c = img.shape[1]
    return F.conv2d(padded, kernel.view(1, 1, k, k).expand(c, 1, k, k), groups=c)


def reference_one(gt: torch.Tensor, rng: random.Random, jpeg: DiffJPEG) -> torch.Tensor:
    """Real-ESRGAN second order on one image [1, 3, H, W], every op with batch 1."""
    h, w = gt.shape[-2:]
    modes = ["area", "bilinear", "bicubic"]

    def rs(x, size, mode):
        return (
            F.interpolate(x, size=size, mode=mode)
            if mode == "area"
            else F.interpolate(x, size=size, mode=mode, align_corners=False)
        )

    def q():
        return torch.tensor([rng.uniform(30, 95)], device=gt.device)

    def kernel(k: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(k).float()[None].to(gt.device)

    x = filter_full(gt, kernel(np_kernel(rng, (0.2, 3.0))))
    s = rng.uniform(0.15, 1.5)
    x = rs(x, (int(h * s), int(w * s)), rng.choice(modes))
    x = jpeg(ref_noise(x, rng, 30, 3.0), q())
    if rng.random() < 0.8:
        x = filter_full(x, kernel(np_kernel(rng, (0.2, 1.5))))
    s = rng.uniform(0.3, 1.2)
    x = rs(x, (int(h / 4 * s), int(w / 4 * s)), rng.choice(modes))
    x = jpeg(ref_noise(x, rng, 25, 2.5), q())
    sinc = np_kernel(random.Random(rng.random()), (0.2, 1.5)) if rng.random() < 0.8 else None
    if rng.random() < 0.5:
        x = rs(x, (h // 4, w // 4), rng.choice(modes))
        x = filter_full(x, kernel(sinc)) if sinc is not None else x
        x = jpeg(x, q())
    else:
        x = jpeg(x, q())
        x = rs(x, (h // 4, w // 4), rng.choice(modes))
        x = filter_full(x, kernel(sinc)) if sinc is not None else x
    x = (x * 255).round().clamp(0, 255) / 255
    return (rs(x, (h, w), "bicubic") * 255).round().clamp(0, 255) / 255


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--clock",
        choices=("wall", "process"),
        default="wall",
        help="wall: elapsed time (the figure to report, on an idle machine); process: CPU time "
        "of this process, steadier on a shared machine (use with --threads 1)",
    )
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    gt = photo_crops(args.batch, args.size)
    pipeline, jpeg = SecondOrderDegradation(), DiffJPEG()

    def batched(rep: int) -> None:
        with torch.no_grad():
            pipeline(gt, sample_generators(rep, range(args.batch)))

    def per_sample(rep: int) -> None:
        with torch.no_grad():
            for i in range(args.batch if rep >= 0 else 2):  # a short warm-up
                reference_one(gt[i : i + 1], random.Random(rep * 10_000 + i), jpeg)

    fns = {"bir batched": batched, "per-sample reference": per_sample}
    try:
        from basicsr.utils import DiffJPEG as BasicSRJPEG

        basicsr_jpeg = BasicSRJPEG(differentiable=False)

        def basicsr_batch(rep: int) -> None:
            random.seed(rep + 1)
            np.random.seed(rep + 1)
            torch.manual_seed(rep + 1)
            with torch.no_grad():
                basicsr_reference.basicsr_pipeline(gt, basicsr_jpeg)

        fns["BasicSR batch"] = basicsr_batch
    except ImportError:
        print("basicsr is not installed (dev extra): the BasicSR batch row is left out")

    # Interleaved: repeat r runs every pipeline back to back, so a slow spell of a shared machine
    # hits all of them; each ratio is the median of the per-repeat ratios.
    names = list(fns)
    for fn in fns.values():
        fn(-1)  # warm-up
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.repeats):
        for name in names:
            t0 = clock()
            fns[name](rep)
            times[name].append(clock() - t0)
    for name in names:
        print(
            f"{name:>22}: {args.batch / statistics.median(times[name]):7.2f} images/s "
            f"(median of {args.repeats}, {args.batch}x{args.size}px, {args.threads} threads, "
            f"{args.clock} clock)"
        )
    for name in names[1:]:
        ratios = sorted(r / b for b, r in zip(times["bir batched"], times[name]))
        print(
            f"{'bir / ' + name:>36}: {statistics.median(ratios):.2f}x "
            f"(median of {args.repeats}; min {ratios[0]:.2f}x, max {ratios[-1]:.2f}x)"
        )


if __name__ == "__main__":
    main()
