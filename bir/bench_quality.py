"""``bir-bench quality``: restoration quality on held-out real photographs, against classical
baselines, with a prior that anyone can train offline.

    bir-bench quality --quick                 # 2 CPU cores, < 30 min with a trained prior
    bir-bench quality --prior PATH.ckpt --size 64 --images astronaut coffee

Every task degrades the held-out scikit-image photographs (never seen by the prior or by the
quickstart SwinIR) with a *known* operator at a fixed seed; every method restores the same inputs;
PSNR/SSIM are measured against the originals. Writes ``quality.md`` (rows: methods, columns: tasks,
cells PSNR/SSIM with the best PSNR of each task in bold), ``quality.json`` and one grid image per
task (input | each method | ground truth) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from bir.data.io import save_image
from bir.data.samples import holdout_image
from bir.metrics import psnr, ssim
from bir.random import sample_generators

CONF = Path(__file__).resolve().parent.parent / "conf"
PRIOR_RUN = Path("outputs/prior_samples/prior_samples")
QUICKSTART_ROOT = Path("outputs/quickstart")


@dataclass
class Task:
    """A degradation with known truth; ``op_spec`` as :func:`bir.operators.synthetic.degrade`."""

    name: str
    op_spec: dict
    sigma: float
    blind: bool = False  # methods must estimate the operator (kernel) themselves
    lowlight_factor: float | None = None
    baselines: list[str] = field(default_factory=list)


#: The border of every blur in the benchmark: of the observation y *and* of the blur model every
#: method inverts (the true operator, BIRD's kernel MLP, BIR-D / GDP's kernel), so no method is
#: scored against a forward model it does not have. Reflect puts no artificial frame around a
#: photograph; the released codes' borders (BIRD: zeros on [-1, 1]) are in their presets.
BLUR_PADDING = "reflect"


def tasks(kernel_size: int) -> list[Task]:
    k, pad = kernel_size, BLUR_PADDING
    return [
        Task(
            "deblur_known",
            {"kind": "gaussian_blur", "kernel_size": k, "blur_sigma": 1.6, "padding": pad},
            0.01,
            baselines=["wiener", "richardson_lucy", "swinir"],
        ),  # fmt: skip
        Task(
            "deblur_blind",
            {"kind": "gaussian_blur", "kernel_size": k, "blur_sigma": 1.6, "padding": pad},
            0.01,
            blind=True,
            baselines=["wiener", "richardson_lucy", "swinir"],
        ),  # fmt: skip
        Task(
            "motion_deblur",
            {"kind": "motion_blur", "kernel_size": k, "intensity": 0.5, "padding": pad},
            0.01,
            blind=True,
            baselines=["wiener", "richardson_lucy"],
        ),  # fmt: skip
        Task("sr_x4", {"kind": "bicubic", "scale": 4}, 0.0, baselines=["bicubic"]),
        Task("denoise", {"kind": "identity"}, 25 / 255, baselines=["tv", "swinir"]),
        Task(
            "inpaint_25",
            {"kind": "inpaint", "mask_kind": "random", "keep_ratio": 0.75},
            0.0,
            baselines=[],
        ),  # fmt: skip
        Task("lowlight", {"kind": "identity"}, 0.01, lowlight_factor=0.25, baselines=[]),
    ]


def observe(task: Task, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict]:
    """Degraded observation and the truth (operator, kernel or mask) for a batch of clean images."""
    from bir.operators.synthetic import degrade

    gens = sample_generators(seed, range(x.shape[0]), stream=7)
    if task.lowlight_factor is not None:
        noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens])
        y = (task.lowlight_factor * x + task.sigma * noise).clamp(0, 1)
        return y, {"factor": task.lowlight_factor}
    return degrade(x, task.op_spec, task.sigma, gens)


# ------------------------------------------------------------------------------------------
# baselines
# ------------------------------------------------------------------------------------------
def run_baseline(kind: str, task: Task, y: torch.Tensor, truth: dict, swinir=None) -> torch.Tensor:
    from bir.lit.baselines import ClassicalBaseline

    if kind == "swinir":
        with torch.no_grad():
            return swinir.restore(y)
    if kind == "bicubic":
        return ClassicalBaseline("bicubic", scale=task.op_spec["scale"]).restore(y)
    if kind in ("wiener", "richardson_lucy"):
        outs = []
        for i in range(y.shape[0]):
            kernel = truth["kernel"][i if truth["kernel"].shape[0] > 1 else 0].squeeze().double()
            m = ClassicalBaseline(kind, kernel=kernel.numpy(), balance=0.005, num_iter=30)
            outs.append(m.restore(y[i : i + 1]))
        return torch.cat(outs)
    if kind == "tv":
        return ClassicalBaseline("tv", tv_weight=0.08).restore(y)
    raise ValueError(kind)


# ------------------------------------------------------------------------------------------
# diffusion methods, instantiated from the real configs
# ------------------------------------------------------------------------------------------
def compose_method(method: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("restore", overrides=[f"method={method}", "input=-", "output=-", *overrides])


def method_operator(method: str, task: Task, truth: dict, kernel_size: int):
    """The forward model a method uses: the true operator when the task is non-blind, a learnable
    one (BIRD: kernel MLP; BIR-D/GDP: kernel + mask; low-light: factor + mask) when it is blind,
    with the border the observation was blurred with."""
    from bir.operators import KernelMaskOperator, KernelMLPBlur, LowLightOperator

    if task.lowlight_factor is not None:
        return LowLightOperator()
    if task.blind:
        padding = task.op_spec["padding"]
        if method == "bird":
            return KernelMLPBlur(kernel_size=kernel_size, padding=padding)
        return KernelMaskOperator(kernel_size=kernel_size, channels=3, init_sigma=1.0,
                                  padding=padding)  # fmt: skip
    return truth["operator"]


def run_method(label: str, method: str, overrides: list[str], prior, task: Task, y: torch.Tensor,
               truth: dict, kernel_size: int) -> torch.Tensor:  # fmt: skip
    import hydra

    cfg = compose_method(method, overrides)
    op = method_operator(method, task, truth, kernel_size)
    module = hydra.utils.instantiate(cfg.method, prior=prior, operator=op)
    batch = {"lq": y, "name": [f"{task.name}_{i}" for i in range(y.shape[0])],
             "index": torch.arange(y.shape[0])}  # fmt: skip
    with torch.inference_mode(False), torch.enable_grad():
        out = module.predict_step(batch, 0)
    return out["restored"].detach()


# --quick BIRD: 4 DDIM steps (delta_t 250) instead of 10, lr 0.02 instead of the preset's 0.003, and
# 500 iterations (200 with full backprop, 3x dearer each). The preset's lr needs far more
# iterations: on deblur_known the PSNR still rises at iteration 500 (delta_t 200, lr 0.01:
# 19.3 dB at 150 iterations, 21.1 at 500; delta_t 250, lr 0.02: 21.6 at 500).
BIRD_QUICK = ["method.delta_t=250", "method.lr=0.02"]
METHODS = {
    # label: (method config, overrides, overrides for --quick)
    "BIRD (net no-grad)": (
        "bird",
        ["method.network_grad=false"],
        [*BIRD_QUICK, "method.iterations=500"],
    ),
    "BIRD (full backprop)": (
        "bird",
        ["method.network_grad=true"],
        [*BIRD_QUICK, "method.iterations=200"],
    ),
    "BIR-D": ("bir_d", [], ["method.steps=100"]),
    "GDP": ("gdp", [], ["method.steps=100"]),
}


# ------------------------------------------------------------------------------------------
def load_prior(ckpt: Path):
    import hydra
    from hydra import compose, initialize_config_dir

    from bir.diffusion.prior import PixelPrior

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("restore", overrides=["prior=samples", "input=-", "output=-"])
    net = hydra.utils.instantiate(cfg.prior.net)
    return PixelPrior(net, str(ckpt), dict(cfg.prior.schedule), learned_sigma=True, image_size=64,
                      checkpoint_what="bir sample-photo prior")  # fmt: skip


def ensure_prior(path: str | None, budget_steps: int) -> Path:
    if path:
        return Path(path)
    ckpt = PRIOR_RUN / "checkpoints" / "last.ckpt"
    if not ckpt.exists():
        print(
            f"training the sample prior ({budget_steps} steps): bir-train experiment=prior_samples"
        )
        subprocess.run([str(Path(sys.executable).parent / "bir-train"), "experiment=prior_samples",
                        "run_name=prior_samples", f"trainer.max_steps={budget_steps}",
                        "callbacks.progress_bar=null"], check=True)  # fmt: skip
    return ckpt


def find_swinir(path: str | None = None):
    """The quickstart SwinIR: ``path`` (a run's ``last.ckpt``) or the newest
    ``outputs/quickstart/*/checkpoints/last.ckpt`` under the working directory; None if neither."""
    if path:
        ckpt = Path(path)
        if not ckpt.is_file():
            raise FileNotFoundError(f"--swinir {ckpt}: no such checkpoint")
    else:
        runs = sorted(
            QUICKSTART_ROOT.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime
        )
        if not runs:
            print(f"no quickstart SwinIR under {QUICKSTART_ROOT.resolve()} (run `make demo` or pass "
                  "--swinir RUN/checkpoints/last.ckpt): its rows are left out")  # fmt: skip
            return None
        ckpt = runs[-1]
    import hydra
    from omegaconf import OmegaConf

    from bir.lit.stage1 import Stage1Restoration

    cfg = OmegaConf.load(ckpt.parent.parent / ".hydra" / "config.yaml")
    print(f"SwinIR (quickstart): {ckpt}")
    return Stage1Restoration.for_inference(hydra.utils.instantiate(cfg.net), ckpt)


def fmt_cell(p: float, s: float, best: bool) -> str:
    cell = f"{p:.2f} / {s:.3f}"
    return f"**{cell}**" if best else cell


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="bir-bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("suite", choices=["quality"])
    ap.add_argument("--quick", action="store_true", help="one 64-px photo, fewer iterations/steps")
    ap.add_argument(
        "--prior", default=None, help="prior checkpoint (default: train/load the sample prior)"
    )
    ap.add_argument(
        "--prior-steps", type=int, default=1200, help="steps if the prior must be trained"
    )
    ap.add_argument("--swinir", default=None, help="quickstart SwinIR checkpoint (default: newest "
                    "outputs/quickstart/*/checkpoints/last.ckpt)")  # fmt: skip
    ap.add_argument("--images", nargs="*", default=None, help="held-out photos (astronaut, coffee)")
    ap.add_argument(
        "--size", type=int, default=64, help="centre crop, downscaled to the prior's 64 px"
    )
    ap.add_argument("--tasks", nargs="*", default=None)
    ap.add_argument("--methods", nargs="*", default=None, help=f"subset of {list(METHODS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="outputs/bench_quality")
    a = ap.parse_args(argv)

    torch.manual_seed(a.seed)
    out = Path(a.out)
    images = a.images or (["astronaut"] if a.quick else ["astronaut", "coffee"])
    # crop a large centre region and area-downscale to the prior's 64 px training resolution
    x = torch.stack([F.interpolate(holdout_image(n, 256)[None], size=a.size, mode="area")[0]
                     for n in images])  # fmt: skip
    kernel_size = 9
    all_tasks = [t for t in tasks(kernel_size) if not a.tasks or t.name in a.tasks]
    prior = load_prior(ensure_prior(a.prior, a.prior_steps))
    swinir = find_swinir(a.swinir)
    methods = {k: v for k, v in METHODS.items() if not a.methods or k in a.methods}

    results: dict[str, dict[str, tuple[float, float]]] = {}
    for task in all_tasks:
        y, truth = observe(task, x, a.seed)
        rows: dict[str, torch.Tensor] = {}
        up = y if y.shape == x.shape else F.interpolate(y, size=x.shape[-2:], mode="nearest")
        rows["degraded input"] = up
        for b in task.baselines:
            if b == "swinir" and swinir is None:
                continue
            rows[{"swinir": "SwinIR (quickstart)", "wiener": "Wiener (true kernel)",
                  "richardson_lucy": "Richardson-Lucy (true kernel)", "bicubic": "bicubic",
                  "tv": "TV denoising"}[b]] = run_baseline(b, task, y, truth, swinir)  # fmt: skip
        for label, (method, ov, quick_ov) in methods.items():
            t0 = time.time()
            rows[label] = run_method(label, method, ov + (quick_ov if a.quick else []), prior, task, y,
                                     truth, kernel_size)  # fmt: skip
            print(f"  {task.name:14s} {label:22s} {time.time() - t0:6.1f} s", flush=True)
        for label, img in rows.items():
            p = psnr(img.clamp(0, 1), x).mean().item()
            s = ssim(img.clamp(0, 1), x).mean().item()
            results.setdefault(label, {})[task.name] = (p, s)
        grid = torch.cat(
            [torch.cat(list(r.clamp(0, 1)), dim=-2) for r in [*rows.values(), x]], dim=-1
        )
        save_image(grid, out / f"grid_{task.name}.png")
        print(
            f"{task.name}: " + ", ".join(f"{k} {results[k][task.name][0]:.2f}" for k in rows),
            flush=True,
        )

    names = [t.name for t in all_tasks]
    best = {t: max((r[t][0] for r in results.values() if t in r), default=math.nan) for t in names}
    lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, r in results.items():
        cells = [fmt_cell(r[t][0], r[t][1], r[t][0] == best[t]) if t in r else "–" for t in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    header = (f"PSNR (dB) / SSIM on held-out photographs {images} ({a.size} px), seed {a.seed}"
              f"{', quick settings' if a.quick else ''}.\n\n")  # fmt: skip
    (out / "quality.md").write_text(header + table + "\n")
    (out / "quality.json").write_text(json.dumps(results, indent=1))
    print("\n" + header + table)


if __name__ == "__main__":
    main()
