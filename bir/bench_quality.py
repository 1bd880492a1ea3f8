"""``bir-bench quality``: restoration quality on held-out photographs, against fair classical
baselines, averaged over images and seeds, with a prior that anyone can train offline.

    bir-bench quality --prior PRIOR.ckpt                     # 4 held-out photos, 128 px, 3 seeds
    bir-bench quality --prior PRIOR.ckpt --images ~/photos/holdout img.png coffee --size 256
    bir-bench quality --quick                                # one 64-px photo, one seed, quick rows

Every task degrades the photographs with a *known* operator at a fixed data seed (the same
observation for every method and seed); every method restores the same inputs; PSNR/SSIM are
measured against the originals. ``--images`` takes image files, folders (recursive) and
scikit-image sample names (default: the held-out photographs, never seen by bir's sample priors
or the quickstart SwinIR); each image is centre-cropped to a square of ``--crop`` px (at most its
shorter side) and area-resized to ``--size``.

Rows:

- classical baselines, given only what the task gives them: in blind columns Richardson-Lucy
  estimates the kernel itself (blind RL, Fish et al. 1995); Wiener / Richardson-Lucy with the
  true kernel there are labelled "oracle" and never marked best. TV denoising estimates the noise
  level itself; biharmonic inpainting gets the known mask; the low-light gain is estimated from
  the image.
- each diffusion method with bir's ``quick`` settings and with the ``released`` preset of the
  task (the method settings of the matching ``conf/experiment`` preset; "–" where the authors
  released no script for the task), labelled as such. The forward model every method inverts is
  the benchmark's (the true operator where the task is non-blind; a learnable kernel / factor
  where it is blind), so no method is scored against a model it does not have.

Stochastic rows run once per ``--seeds`` value; a cell is the mean over seeds of the mean over
images, ± the standard deviation over seeds. The best PSNR of each task (oracle and input rows
excluded) is in bold. Writes ``quality.md`` (the table, the settings and the images), ``quality.csv``
(one line per task, row, image and seed), ``quality.json`` and one grid per task (input | rows |
ground truth, first seed) under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from bir.cli import CONFIG_DIR
from bir.data.io import IMAGE_SUFFIXES, FolderError, list_images, read_image, save_image
from bir.data.samples import HOLDOUT_PHOTOS, TRAIN_PHOTOS, sample_photo
from bir.errors import UsageError
from bir.metrics import psnr, ssim
from bir.random import sample_generators

CONF = Path(CONFIG_DIR)  # the config tree of every entry point (bir/conf or BIR_CONFIG_DIR)
PRIOR_RUN = Path("outputs/prior_samples/prior_samples")
QUICKSTART_ROOT = Path("outputs/quickstart")


@dataclass
class Task:
    """A degradation with known truth: ``y = A(x) + sigma n``, ``A`` the operator of
    ``conf/operator/<operator>.yaml`` with the fields in ``overrides`` (:func:`known_operator`)."""

    name: str
    operator: str
    overrides: dict
    sigma: float
    blind: bool = False  # methods must estimate the operator (kernel, factor) themselves
    baselines: list[str] = field(default_factory=list)


def known_operator(name: str, overrides: dict | None = None):
    """The operator of ``conf/operator/<name>.yaml`` with ``overrides`` (fields of that file),
    not yet initialised (its random parts are drawn by ``init_batch``)."""
    import hydra
    from omegaconf import OmegaConf

    path = CONF / "operator" / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise UsageError(f"operator {name!r}: no {path}; choose one of {names}")
    cfg = OmegaConf.load(path)
    unknown = sorted(set(overrides or {}) - set(cfg))
    if unknown:
        fields = ", ".join(k for k in cfg if k != "_target_")
        raise UsageError(f"operator {name}: no field {', '.join(unknown)}; its fields: {fields}")
    return hydra.utils.instantiate(OmegaConf.merge(cfg, overrides or {}))


#: The border of every blur in the benchmark: of the observation y *and* of the blur model every
#: method inverts (the true operator, BIRD's kernel MLP, BIR-D / GDP's kernel), so no method is
#: scored against a forward model it does not have. Reflect puts no artificial frame around a
#: photograph; the released codes' borders (BIRD: zeros on [-1, 1]) are in their presets.
BLUR_PADDING = "reflect"
DECONV = ["wiener", "richardson_lucy"]


def tasks(kernel_size: int) -> list[Task]:
    k, pad = kernel_size, BLUR_PADDING
    gauss = {"kernel_size": k, "sigma": 1.6, "padding": pad}
    motion = {"kernel_size": k, "intensity": 0.5, "padding": pad}
    dark = {"factor_init_mean": 0.25, "factor_init_std": 0.0, "use_mask": False}  # y = x / 4
    return [
        Task("deblur_known", "gaussian_blur_known", gauss, 0.01, baselines=[*DECONV, "swinir"]),
        Task(
            "deblur_blind",
            "gaussian_blur_known",
            gauss,
            0.01,
            blind=True,
            baselines=["blind_richardson_lucy", *DECONV, "swinir"],
        ),
        Task(
            "motion_deblur",
            "motion_blur_known",
            motion,
            0.01,
            blind=True,
            baselines=["blind_richardson_lucy", *DECONV],
        ),
        Task("sr_x4", "sr_bicubic_x4", {}, 0.0, baselines=["bicubic"]),
        Task("denoise", "denoise", {}, 25 / 255, baselines=["tv", "swinir"]),
        Task(
            "inpaint_25",
            "inpaint",
            {"kind": "random", "keep_ratio": 0.75},
            0.0,
            baselines=["biharmonic"],
        ),
        Task("lowlight", "lowlight", dark, 0.01, blind=True, baselines=["gain"]),
    ]


def observe(task: Task, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict]:
    """Degraded observation and the truth (operator, kernel, mask or factor) for a batch of clean
    images (:func:`bir.operators.synthetic.observe`)."""
    from bir.operators.synthetic import observe as synthesize

    gens = sample_generators(seed, range(x.shape[0]), stream=7)
    return synthesize(x, known_operator(task.operator, task.overrides), task.sigma, gens)


# ------------------------------------------------------------------------------------------
# baselines
# ------------------------------------------------------------------------------------------
def baseline_label(kind: str, task: Task) -> str:
    """Row label; deconvolution with the true kernel in a blind task is an oracle."""
    if kind in DECONV:
        name = {"wiener": "Wiener", "richardson_lucy": "Richardson-Lucy"}[kind]
        return f"{name} (oracle: true kernel)" if task.blind else f"{name} (true kernel)"
    return {
        "swinir": "SwinIR (quickstart)",
        "bicubic": "bicubic",
        "blind_richardson_lucy": "Richardson-Lucy (blind, estimates the kernel)",
        "tv": "TV denoising (estimates sigma)",
        "biharmonic": "biharmonic inpainting (mask)",
        "gain": "gain (estimated from y)",
    }[kind]


def is_oracle(label: str) -> bool:
    return "oracle" in label


def run_baseline(kind: str, task: Task, y: torch.Tensor, truth: dict, swinir=None) -> torch.Tensor:
    from bir.lit.baselines import ClassicalBaseline
    from bir.operators.blur import gaussian_kernel

    if kind == "swinir":
        with torch.no_grad():
            return swinir.restore(y)
    if kind == "bicubic":
        return ClassicalBaseline("bicubic", scale=truth["operator"].scale).restore(y)
    if kind in DECONV:
        outs = []
        for i in range(y.shape[0]):
            kernel = truth["kernel"][i if truth["kernel"].shape[0] > 1 else 0].squeeze().double()
            m = ClassicalBaseline(kind, kernel=kernel.numpy(), balance=0.005, num_iter=30)
            outs.append(m.restore(y[i : i + 1]))
        return torch.cat(outs)
    if kind == "blind_richardson_lucy":
        # the support the learnable kernels of the methods get, from the same Gaussian start
        init = gaussian_kernel(truth["kernel"].shape[-1], 1.0, dtype=torch.float64)
        return ClassicalBaseline(kind, kernel=init, num_iter=BLIND_RL_ITERATIONS).restore(y)
    if kind == "tv":
        return ClassicalBaseline("tv", tv_weight=None).restore(y)
    if kind == "biharmonic":
        return ClassicalBaseline("biharmonic").restore(y, mask=truth["mask"])
    if kind == "gain":
        return ClassicalBaseline("gain").restore(y)
    raise ValueError(kind)


#: blind RL alternations: its PSNR peaks early and then falls as noise is amplified (astronaut
#: and coffee at 128 px, Gaussian blur sigma 1.6: +1.2 dB at 10, +0.9 at 30, +0.5 at 60)
BLIND_RL_ITERATIONS = 10


# ------------------------------------------------------------------------------------------
# diffusion methods, instantiated from the real configs
# ------------------------------------------------------------------------------------------
def compose_method(method: str, overrides: list[str], experiment: str | None = None):
    from hydra import compose, initialize_config_dir

    base = [f"experiment={experiment}"] if experiment else [f"method={method}"]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("restore", overrides=[*base, "input=-", "output=-", *overrides])


def method_operator(method: str, task: Task, truth: dict, kernel_size: int):
    """The forward model a method uses: the true operator when the task is non-blind (its random
    truth, a mask or a motion kernel, held fixed: a method's ``init_batch`` would draw another), a
    learnable one of the same kind when it is blind (a blur: BIRD's kernel MLP, BIR-D/GDP's
    kernel + mask, with the border the observation was blurred with; low-light: factor + mask)."""
    from bir.operators import (
        FixedKernelBlur,
        InpaintMask,
        KernelMaskOperator,
        KernelMLPBlur,
        LowLightOperator,
        MotionBlur,
    )

    true_op = truth["operator"]
    if not task.blind:
        if isinstance(true_op, InpaintMask):
            return InpaintMask(mask=truth["mask"])
        if isinstance(true_op, MotionBlur):  # truth["kernel"] is the PSF: convolve
            return FixedKernelBlur(truth["kernel"], padding=true_op.padding)
        return true_op
    if isinstance(true_op, LowLightOperator):
        return LowLightOperator()
    if method == "bird":
        return KernelMLPBlur(kernel_size=kernel_size, padding=true_op.padding)
    return KernelMaskOperator(
        kernel_size=kernel_size, channels=3, init_sigma=1.0, padding=true_op.padding
    )


def run_method(
    method: str,
    overrides: list[str],
    experiment: str | None,
    prior,
    task: Task,
    y: torch.Tensor,
    truth: dict,
    kernel_size: int,
    seed: int,
) -> torch.Tensor:
    import hydra

    cfg = compose_method(method, [*overrides, f"seed={seed}"], experiment)
    op = method_operator(method, task, truth, kernel_size)
    module = hydra.utils.instantiate(cfg.method, prior=prior, operator=op)
    batch = {
        "lq": y,
        "name": [f"{task.name}_{i}" for i in range(y.shape[0])],
        "index": torch.arange(y.shape[0]),
    }
    with torch.inference_mode(False), torch.enable_grad():
        out = module.predict_step(batch, 0)
    return out["restored"].detach()


# quick BIRD: 4 DDIM steps (delta_t 250) instead of 10, lr 0.02 instead of the preset's 0.003, and
# 500 iterations (200 with full backprop, 3x dearer each). The preset's lr needs far more
# iterations: on deblur_known the PSNR still rises at iteration 500 (delta_t 200, lr 0.01:
# 19.3 dB at 150 iterations, 21.1 at 500; delta_t 250, lr 0.02: 21.6 at 500).
BIRD_QUICK = ["method.delta_t=250", "method.lr=0.02"]
#: label: (method config, overrides of both settings, overrides of the quick settings)
METHODS = {
    "BIRD": ("bird", ["method.network_grad=false"], [*BIRD_QUICK, "method.iterations=500"]),
    "BIRD (full backprop)": (
        "bird",
        ["method.network_grad=true"],
        [*BIRD_QUICK, "method.iterations=200"],
    ),
    "BIR-D": ("bir_d", [], ["method.steps=100"]),
    "GDP": ("gdp", [], ["method.steps=100"]),
}
#: the released preset whose method settings a method uses on each task (None: the authors
#: released no script for it). BIRD has no low-light script; GDP's released x0 scripts have no
#: blind deblurring or denoising; BIR-D's no plain denoising.
RELEASED = {
    "bird": {
        "deblur_known": "bird_deblur",
        "deblur_blind": "bird_deblur",
        "motion_deblur": "bird_deblur",
        "sr_x4": "bird_sr8",
        "denoise": "bird_denoise",
        "inpaint_25": "bird_inpaint",
        "lowlight": None,
    },
    "bir_d": {
        "deblur_known": "bir_d_deblur",
        "deblur_blind": "bir_d_blind",
        "motion_deblur": "bir_d_blind",
        "sr_x4": "bir_d_sr4",
        "denoise": None,
        "inpaint_25": "bir_d_inpaint",
        "lowlight": "bir_d_lowlight",
    },
    "gdp": {
        "deblur_known": "gdp_deblur",
        "deblur_blind": None,
        "motion_deblur": None,
        "sr_x4": "gdp_sr4",
        "denoise": None,
        "inpaint_25": "gdp_inpaint",
        "lowlight": "gdp_lowlight",
    },
}
SETTINGS = ("quick", "released")


# ------------------------------------------------------------------------------------------
def load_prior(ckpt: Path, size: int):
    """The pixel prior in ``ckpt``: prior=samples with the network bir stored in the checkpoint
    (as ``bir-restore prior=samples prior.ckpt_path=...`` builds it), run on whole ``size``-px
    images."""
    import hydra
    from hydra import compose, initialize_config_dir

    from bir.callbacks.net_config import use_stored_net_configs

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("restore", overrides=["prior=samples", "input=-", "output=-"])
    cfg.prior.ckpt_path = str(ckpt)
    # image_size = the benchmark's size: the nets are convolutional, so the whole image goes
    # through the network (no patch grid, which would cost 9 network calls per step at 128 px)
    cfg.prior.image_size = size
    cfg.prior.checkpoint_what = "pixel prior"
    use_stored_net_configs(cfg)
    return hydra.utils.instantiate(cfg.prior)


def ensure_prior(path: str | None, budget_steps: int) -> Path:
    if path:
        if not Path(path).is_file():
            raise UsageError(
                f"--prior {path}: no such checkpoint (train one with `bir-train "
                "experiment=prior_samples` or experiment=prior_folder)"
            )
        return Path(path)
    ckpt = PRIOR_RUN / "checkpoints" / "last.ckpt"
    if not ckpt.exists():
        print(
            f"training the sample prior ({budget_steps} steps): bir-train experiment=prior_samples"
        )
        subprocess.run(
            [
                str(Path(sys.executable).parent / "bir-train"),
                "experiment=prior_samples",
                "run_name=prior_samples",
                f"trainer.max_steps={budget_steps}",
                "callbacks.progress_bar=null",
            ],
            check=True,
        )
    return ckpt


def find_swinir(path: str | None = None):
    """The quickstart SwinIR: ``path`` (a run's ``last.ckpt``) or the newest
    ``outputs/quickstart/*/checkpoints/last.ckpt`` under the working directory; None if neither."""
    if path:
        ckpt = Path(path)
        if not ckpt.is_file():
            raise UsageError(f"--swinir {ckpt}: no such checkpoint")
    else:
        runs = sorted(
            QUICKSTART_ROOT.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime
        )
        if not runs:
            print(
                f"no quickstart SwinIR under {QUICKSTART_ROOT.resolve()} (run `make demo` or pass "
                "--swinir RUN/checkpoints/last.ckpt): its rows are left out"
            )
            return None
        ckpt = runs[-1]
    import hydra
    from omegaconf import OmegaConf

    from bir.lit.stage1 import Stage1Restoration

    cfg = OmegaConf.load(ckpt.parent.parent / ".hydra" / "config.yaml")
    print(f"SwinIR (quickstart): {ckpt}")
    return Stage1Restoration.for_inference(hydra.utils.instantiate(cfg.net), ckpt)


# ------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------
def resolve_images(specs: list[str]) -> list[tuple[str, Path | None]]:
    """``(name, path)`` for each image file, each image under a folder, and ``(name, None)`` for
    each scikit-image sample name. Names must be unique (they key the CSV rows)."""
    import skimage.data

    found: list[tuple[str, Path | None]] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            try:
                files = list_images(path)
            except FolderError:
                files = []
            if not files:
                raise UsageError(
                    f"--images {spec}: the folder holds no image ({', '.join(IMAGE_SUFFIXES)})"
                )
            found += [(str(f.relative_to(path).with_suffix("")), f) for f in files]
        elif path.is_file():
            found.append((path.stem, path))
        elif spec in (*HOLDOUT_PHOTOS, *TRAIN_PHOTOS) or hasattr(skimage.data, spec):
            if spec in TRAIN_PHOTOS:
                print(
                    f"warning: {spec} is a training photograph of bir's sample priors and the "
                    "quickstart SwinIR: it is not held out for them"
                )
            found.append((spec, None))
        else:
            raise UsageError(
                f"--images {spec}: not an image file, a folder or a scikit-image "
                f"sample name (held out: {', '.join(HOLDOUT_PHOTOS)})"
            )
    names = [n for n, _ in found]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise UsageError(f"--images: several images are named {', '.join(dups)}; rename them")
    return found


def load_image(name: str, path: Path | None, crop: int, size: int) -> torch.Tensor:
    """Centre square of side min(crop, shorter side), area-resized to ``size`` px."""
    img = read_image(path) if path is not None else sample_photo(name)
    _, h, w = img.shape
    side = min(crop, h, w)
    top, left = (h - side) // 2, (w - side) // 2
    img = img[None, :, top : top + side, left : left + side]
    mode = "area" if side >= size else "bicubic"
    return F.interpolate(img, size=(size, size), mode=mode).clamp(0, 1)[0]


# ------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------
def summarise(records: list[dict]) -> dict:
    """{row: {task: {"psnr", "psnr_std", "ssim", "ssim_std", "seeds", "images"}}}: per seed the mean
    over images, then the mean and the (sample) standard deviation over seeds."""
    groups: dict[tuple[str, str], dict[int, list[dict]]] = {}
    for r in records:
        groups.setdefault((r["row"], r["task"]), {}).setdefault(r["seed"], []).append(r)
    out: dict[str, dict[str, dict]] = {}
    for (row, task), by_seed in groups.items():
        cell = {}
        for metric in ("psnr", "ssim"):
            means = [statistics.fmean(r[metric] for r in rs) for rs in by_seed.values()]
            cell[metric] = statistics.fmean(means)
            cell[f"{metric}_std"] = statistics.stdev(means) if len(means) > 1 else 0.0
        cell["seeds"] = len(by_seed)
        cell["images"] = len(next(iter(by_seed.values())))
        out.setdefault(row, {})[task] = cell
    return out


def format_table(summary: dict, task_names: list[str]) -> str:
    """Markdown: rows in ``summary`` order, a cell ``PSNR ± std / SSIM`` (± only over several
    seeds), the best PSNR of each task in bold (input and oracle rows never count)."""

    def eligible(row: str) -> bool:
        return row != "degraded input" and not is_oracle(row)

    best = {
        t: max(
            (r[t]["psnr"] for row, r in summary.items() if t in r and eligible(row)),
            default=math.nan,
        )
        for t in task_names
    }
    lines = ["| row | " + " | ".join(task_names) + " |", "|---|" + "---|" * len(task_names)]
    for row, cells in summary.items():
        out = []
        for t in task_names:
            if t not in cells:
                out.append("–")
                continue
            c = cells[t]
            spread = f" ± {c['psnr_std']:.2f}" if c["seeds"] > 1 else ""
            text = f"{c['psnr']:.2f}{spread} / {c['ssim']:.3f}"
            out.append(f"**{text}**" if eligible(row) and c["psnr"] == best[t] else text)
        lines.append(f"| {row} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bir-bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("suite", choices=["quality"])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a fast look: one 64-px photo, seed 0, quick settings only",
    )
    ap.add_argument(
        "--prior", default=None, help="prior checkpoint (default: train/load the sample prior)"
    )
    ap.add_argument(
        "--prior-steps", type=int, default=1200, help="steps if the sample prior must be trained"
    )
    ap.add_argument(
        "--swinir",
        default=None,
        help="quickstart SwinIR checkpoint (default: newest "
        "outputs/quickstart/*/checkpoints/last.ckpt)",
    )
    ap.add_argument(
        "--images",
        nargs="+",
        default=None,
        help="image files, folders and scikit-image names (default: the held-out "
        f"photographs {' '.join(HOLDOUT_PHOTOS)})",
    )
    ap.add_argument(
        "--crop",
        type=int,
        default=256,
        help="centre square crop (px, at most the shorter side) before resizing",
    )
    ap.add_argument(
        "--size", type=int, default=None, help="image size in px (default 128; quick 64)"
    )
    ap.add_argument("--tasks", nargs="+", default=None)
    ap.add_argument("--methods", nargs="+", default=None, help=f"subset of {list(METHODS)}")
    ap.add_argument(
        "--settings",
        nargs="+",
        choices=SETTINGS,
        default=None,
        help="method rows: quick and/or released (default both; quick: quick)",
    )
    ap.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="method seeds (default 0 1 2; quick: 0)"
    )
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the observations")
    ap.add_argument("--out", default="outputs/bench_quality")
    a = ap.parse_args(argv)
    if a.quick:
        a.images = a.images or [HOLDOUT_PHOTOS[0]]
    a.images = a.images or list(HOLDOUT_PHOTOS)
    a.size = a.size or (64 if a.quick else 128)
    a.settings = a.settings or (["quick"] if a.quick else list(SETTINGS))
    a.seeds = a.seeds or ([0] if a.quick else [0, 1, 2])
    known = [t.name for t in tasks(9)]
    for name in a.tasks or []:
        if name not in known:
            raise UsageError(f"--tasks {name}: unknown task; choose from {', '.join(known)}")
    for name in a.methods or []:
        if name not in METHODS:
            raise UsageError(f"--methods {name!r}: unknown; choose from {', '.join(METHODS)}")
    if len(set(a.seeds)) != len(a.seeds):
        raise UsageError("--seeds: give each seed once")
    return a


def main(argv: list[str] | None = None) -> None:
    try:
        run(parse_args(argv))
    except UsageError as err:
        print(f"bir-bench: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def run(a: argparse.Namespace) -> None:
    out = Path(a.out)
    images = resolve_images(a.images)
    x = torch.stack([load_image(n, p, a.crop, a.size) for n, p in images])
    names = [n for n, _ in images]
    kernel_size = 9
    all_tasks = [t for t in tasks(kernel_size) if not a.tasks or t.name in a.tasks]
    prior = load_prior(ensure_prior(a.prior, a.prior_steps), a.size)
    swinir = find_swinir(a.swinir)
    methods = {k: v for k, v in METHODS.items() if not a.methods or k in a.methods}

    records: list[dict] = []

    def record(row: str, task: Task, img: torch.Tensor, seed: int | None, secs: float) -> None:
        img = img.clamp(0, 1)
        p, s = psnr(img, x), ssim(img, x)
        for i, name in enumerate(names):
            records.append(
                {
                    "task": task.name,
                    "row": row,
                    "image": name,
                    "seed": seed,
                    "psnr": p[i].item(),
                    "ssim": s[i].item(),
                    "seconds": secs,
                }
            )

    for task in all_tasks:
        y, truth = observe(task, x, a.data_seed)
        grid: dict[str, torch.Tensor] = {}
        up = y if y.shape == x.shape else F.interpolate(y, size=x.shape[-2:], mode="nearest")
        record("degraded input", task, up, None, 0.0)
        grid["degraded input"] = up
        for kind in task.baselines:
            if kind == "swinir" and swinir is None:
                continue
            t0 = time.time()
            img = run_baseline(kind, task, y, truth, swinir)
            record(baseline_label(kind, task), task, img, None, time.time() - t0)
            grid[baseline_label(kind, task)] = img
        for label, (method, ov, quick_ov) in methods.items():
            for setting in a.settings:
                experiment = RELEASED[method][task.name] if setting == "released" else None
                if setting == "released" and experiment is None:
                    continue
                row = f"{label}, quick" if setting == "quick" else f"{label}, released preset"
                for seed in a.seeds:
                    t0 = time.time()
                    extra = quick_ov if setting == "quick" else []
                    img = run_method(
                        method, [*ov, *extra], experiment, prior, task, y, truth, kernel_size, seed
                    )
                    secs = time.time() - t0
                    record(row, task, img, seed, secs)
                    grid.setdefault(row, img)
                    print(f"  {task.name:14s} {row:34s} seed {seed} {secs:6.1f} s", flush=True)
        cols = [torch.cat(list(r.clamp(0, 1)), dim=-2) for r in [*grid.values(), x]]
        save_image(torch.cat(cols, dim=-1), out / f"grid_{task.name}.png")
        done = summarise([r for r in records if r["task"] == task.name])
        print(
            f"{task.name}: "
            + ", ".join(f"{k} {v[task.name]['psnr']:.2f}" for k, v in done.items()),
            flush=True,
        )

    # rows: the input, the baselines, then the methods (in the order they ran)
    summary = summarise(
        sorted(records, key=lambda r: (r["row"] != "degraded input", r["seed"] is not None))
    )
    task_names = [t.name for t in all_tasks]
    table = format_table(summary, task_names)
    stochastic = (
        f"mean over seeds {' '.join(map(str, a.seeds))} ± the standard deviation over seeds"
        if len(a.seeds) > 1
        else f"seed {a.seeds[0]} only (no spread)"
    )
    header = (
        f"PSNR (dB) / SSIM, mean over {len(names)} image(s) at {a.size} px; method rows: "
        f"{stochastic}; observations from data seed {a.data_seed}. "
        "Bold: best PSNR (input and oracle rows excluded).\n\n"
    )
    presets = "; ".join(
        f"{label}: " + ", ".join(f"{t} {RELEASED[m][t]}" for t in task_names if RELEASED[m][t])
        for label, (m, _, _) in methods.items()
    )
    if "released" in a.settings:
        header += f"Released preset rows use the method settings of (task preset): {presets}.\n\n"
    used = "\n\nImages: " + ", ".join(f"{n} ({p if p else 'scikit-image'})" for n, p in images)
    (out / "quality.md").write_text(header + table + used + "\n")
    (out / "quality.json").write_text(json.dumps(summary, indent=1))
    with open(out / "quality.csv", "w", newline="") as f:
        w = csv.DictWriter(
            f, fieldnames=["task", "row", "image", "seed", "psnr", "ssim", "seconds"]
        )
        w.writeheader()
        w.writerows(records)
    print("\n" + header + table + used)


if __name__ == "__main__":
    main()
