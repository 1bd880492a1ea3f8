"""One GPU check: the speed and memory figures users ask for, at real size, in one Markdown table.

    python scripts/gpu_check.py               # CUDA, real sizes: about 8 minutes on an H100/H200
    python scripts/gpu_check.py --smoke       # CPU, tiny nets and sizes, a few steps (the tests)
    make gpu-check

Every network is built at its released size from bir's configs (``bir/conf/net/*.yaml``) with
random weights (no files needed): SD 2.1 UNet + ControlNet + VAE + OpenCLIP ViT-H text tower
(``controlnet_sd21``), ADM 256 unconditional (``prior=adm256_uncond``) and DiffBIR's SwinIR
(``swinir_diffbir``). Each row is a ratio against a baseline measured in the same run:

- stage-2 training at 512 px: largest batch that fits (doubling, then bisection on CUDA
  out-of-memory) and images/s there, bf16 autocast + gradient checkpointing vs fp32 without;
- stage-1 SwinIR training step at 512 px crops: bf16 + channels_last + torch.compile vs fp32 eager;
- DiffBIR two-stage inference at 512 px, 50 steps, CFG on: seconds per image, bf16 vs fp32;
  peak memory at 2048 px (tiled) vs 512 px (a few steps: memory does not depend on the count);
- BIRD at 256 px on the ADM network, both gradient modes: images per hour at batch 8 bf16 vs
  batch 1 fp32 eager (the released code's setting), from a few timed iterations of 100;
- BIR-D and GDP at 256 px, 100 respaced steps: images per hour, batch 8 bf16 vs batch 1 fp32;
- the second-order degradation on the device: images/s at batch 32 x 256 px vs the per-sample
  reference of ``scripts/bench_degradations.py``.

Where bf16 or compile changes outputs, "max |diff|" is the largest absolute difference of the
output against fp32 eager on the same inputs and noise (images in [0, 1]). Peak memory is
``torch.cuda.max_memory_allocated`` (empty on CPU). A section that fails (or would overrun
``--budget-s``) prints its reason in its row instead of stopping the run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # bench_degradations (per-sample reference)


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: ``REAL`` on CUDA, ``SMOKE`` on the CPU (tiny nets, a few steps)."""

    controlnet: str
    swinir: str
    prior: str
    stage2_size: int
    stage2_max_batch: int
    stage2_steps: int
    swinir_crop: int
    swinir_batch: int
    swinir_steps: int
    compile: bool
    diffbir_size: int
    diffbir_large: int
    diffbir_steps: int
    diffbir_memory_steps: int
    bird_size: int
    bird_batch: int
    bird_delta_t: int
    bird_iterations: int  # timed iterations (images/hour extrapolates to BIRD_ITERATIONS)
    bir_d_size: int
    bir_d_batch: int
    bir_d_steps: int
    degradation_batch: int
    degradation_size: int
    degradation_repeats: int


BIRD_ITERATIONS = 100  # the released BIRD's iterations per image (deblurring)

REAL = Plan(
    controlnet="controlnet_sd21",
    swinir="swinir_diffbir",
    prior="adm256_uncond",
    stage2_size=512,
    stage2_max_batch=64,
    stage2_steps=3,
    swinir_crop=512,
    swinir_batch=8,
    swinir_steps=10,
    compile=True,
    diffbir_size=512,
    diffbir_large=2048,
    diffbir_steps=50,
    diffbir_memory_steps=2,
    bird_size=256,
    bird_batch=8,
    bird_delta_t=100,
    bird_iterations=2,
    bir_d_size=256,
    bir_d_batch=8,
    bir_d_steps=100,
    degradation_batch=32,
    degradation_size=256,
    degradation_repeats=3,
)
SMOKE = Plan(
    controlnet="controlnet_tiny",
    swinir="swinir_tiny",
    prior="tiny",
    stage2_size=32,
    stage2_max_batch=1,
    stage2_steps=1,
    swinir_crop=32,
    swinir_batch=2,
    swinir_steps=1,
    compile=False,
    diffbir_size=32,
    diffbir_large=64,
    diffbir_steps=2,
    diffbir_memory_steps=1,
    bird_size=16,
    bird_batch=2,
    bird_delta_t=500,
    bird_iterations=1,
    bir_d_size=16,
    bir_d_batch=2,
    bir_d_steps=2,
    degradation_batch=2,
    degradation_size=32,
    degradation_repeats=1,
)


@dataclass
class Row:
    measurement: str
    setting: str
    metric: str
    value: float | None = None
    baseline: str = ""
    baseline_value: float | None = None
    peak_gib: float | None = None
    max_diff: float | None = None
    note: str = ""

    def cells(self) -> list[str]:
        def fmt(v: float | None) -> str:
            return "" if v is None else f"{v:.4g}"

        ratio = (
            f"{self.value / self.baseline_value:.2f}x"
            if self.value is not None and self.baseline_value
            else ""
        )
        base = f"{self.baseline}: {fmt(self.baseline_value)}" if self.baseline else ""
        return [
            self.measurement,
            self.setting,
            self.metric,
            fmt(self.value),
            base,
            ratio,
            fmt(self.peak_gib),
            fmt(self.max_diff),
            self.note,
        ]


HEADER = [
    "measurement",
    "setting",
    "metric",
    "value",
    "baseline (same run)",
    "ratio",
    "peak GiB",
    "max |diff| vs fp32",
    "note",
]


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":  # (a full gc costs seconds in a large process: CUDA only)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def precision(device: torch.device, bf16: bool):
    """bf16 autocast, or nothing (fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def largest_batch(fits: Callable[[int], bool], cap: int) -> int:
    """Largest batch in [1, cap] with ``fits(batch)`` True: doubling, then bisection.

    Assumes monotonicity (a batch that fits means every smaller one fits). Returns 0 when not
    even batch 1 fits.
    """
    good, bad, b = 0, None, 1
    while True:
        if fits(b):
            good = b
            if b == cap:
                return good
            b = min(2 * b, cap)
        else:
            bad = b
            break
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def compose(config: str, overrides: list[str]):
    """The composed config (cached: sections compose the same configs repeatedly)."""
    return _compose(config, tuple(overrides))


@functools.cache
def _compose(config: str, overrides: tuple[str, ...]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "bir" / "conf"), version_base="1.3"):
        return hydra_compose(config, overrides=list(overrides))


def instantiate(cfg, device: torch.device, **kwargs):
    """Build on the device directly (random init of billion-parameter nets on the GPU is fast)."""
    import hydra

    torch.manual_seed(0)
    with torch.device(device):
        return hydra.utils.instantiate(cfg, **kwargs)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ---------------------------------------------------------------------------- measurements
def _stage2_one(plan: Plan, device: torch.device, cfg, stage1_cfg, bf16: bool, checkpointing: bool):
    """(largest batch, images/s there, peak GiB) of one stage-2 setting."""
    from bir.lit.stage2 import Stage2ControlLDM

    module = Stage2ControlLDM(
        instantiate(cfg.net, device),
        instantiate(stage1_cfg, device),
        optimizer=partial(torch.optim.AdamW, lr=1e-4),
        gradient_checkpointing=checkpointing,
    ).to(device)
    module.train()
    optimizer = module.configure_optimizers()
    size = plan.stage2_size

    def step(b: int) -> None:
        g = torch.Generator().manual_seed(0)
        gt = torch.rand(b, 3, size, size, generator=g).to(device)
        batch = {"gt": gt, "lq": gt.clone(), "index": torch.arange(b)}
        with precision(device, bf16):
            loss, _ = module.diffusion_loss(batch, training=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def fits(b: int) -> bool:
        try:
            step(b)
            sync(device)
            return True
        except RuntimeError as exc:
            if not is_oom(exc):
                raise
            optimizer.zero_grad(set_to_none=True)
            reset_peak(device)
            return False

    batch = largest_batch(fits, plan.stage2_max_batch)
    if batch == 0:
        raise RuntimeError(f"batch 1 at {size} px does not fit")
    reset_peak(device)
    if device.type == "cuda":
        step(batch)  # warm-up at that size
    seconds, _ = timed(lambda: [step(batch) for _ in range(plan.stage2_steps)], device)
    return batch, batch * plan.stage2_steps / seconds, peak_gib(device)


def stage2_training(plan: Plan, device: torch.device) -> list[Row]:
    """Stage-2 step (stage 1, VAE encode, text, ControlNet + frozen UNet, backward, AdamW)."""
    cfg = compose("train", [f"net={plan.controlnet}", "net.sd_ckpt_path=null"])
    stage1_cfg = compose("train", [f"net={plan.swinir}"]).net
    b0, ips0, mem0 = _stage2_one(plan, device, cfg, stage1_cfg, bf16=False, checkpointing=False)
    reset_peak(device)
    b1, ips1, mem1 = _stage2_one(plan, device, cfg, stage1_cfg, bf16=True, checkpointing=True)
    reset_peak(device)
    size, cap = plan.stage2_size, plan.stage2_max_batch
    return [
        Row(
            f"stage-2 train {size} px",
            "fp32, no checkpointing",
            "largest batch",
            b0,
            peak_gib=mem0,
            note=f"capped at {cap}" if b0 == cap else "",
        ),
        Row(
            f"stage-2 train {size} px",
            "bf16 + checkpointing",
            "largest batch",
            b1,
            "fp32",
            b0,
            mem1,
            note=f"capped at {cap}" if b1 == cap else "goal: >= 8 on 80 GB",
        ),
        Row(
            f"stage-2 train {size} px",
            "bf16 + checkpointing",
            "images/s at largest batch",
            ips1,
            "fp32",
            ips0,
            note=f"steps/s {ips1 / b1:.3g} vs {ips0 / b0:.3g}",
        ),
    ]


def _swinir_one(plan: Plan, device: torch.device, cfg, lq, gt, fast: bool):
    """(steps/s, peak GiB, eval output on lq, note) of one SwinIR setting."""
    net = instantiate(cfg, device).train()
    x, note = lq, ""
    if fast:
        net = net.to(memory_format=torch.channels_last)
        x = lq.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    run = torch.compile(net) if fast and plan.compile else net

    def step() -> None:
        with precision(device, fast):
            loss = F.mse_loss(run(x).float(), gt, reduction="sum")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    try:
        step()  # warm-up (and compilation)
    except Exception as exc:  # compile can fail on a platform: measure eager instead
        if run is net:
            raise
        note, run = f"compile failed ({type(exc).__name__}); eager", net
        step()
    reset_peak(device)
    seconds, _ = timed(lambda: [step() for _ in range(plan.swinir_steps)], device)
    result = (plan.swinir_steps / seconds, peak_gib(device))
    net.load_state_dict(instantiate(cfg, device).state_dict())  # the same weights in both runs
    net.eval()
    with torch.no_grad(), precision(device, fast):
        out = run(x).float()
    return *result, out, note


def stage1_training(plan: Plan, device: torch.device) -> list[Row]:
    """SwinIR step: forward, MSE (sum), backward, AdamW; then the outputs of both variants."""
    cfg = compose("train", [f"net={plan.swinir}"]).net
    g = torch.Generator().manual_seed(0)
    lq = torch.rand(plan.swinir_batch, 3, plan.swinir_crop, plan.swinir_crop, generator=g)
    gt = torch.rand(lq.shape, generator=g)
    lq, gt = lq.to(device), gt.to(device)
    sps0, mem0, out0, _ = _swinir_one(plan, device, cfg, lq, gt, fast=False)
    reset_peak(device)
    sps1, mem1, out1, note = _swinir_one(plan, device, cfg, lq, gt, fast=True)
    reset_peak(device)
    label = "bf16 + channels_last" + (" + compile" if plan.compile else "")
    crop = plan.swinir_crop
    return [
        Row(
            f"stage-1 SwinIR train {crop} px",
            "fp32 eager",
            "steps/s",
            sps0,
            peak_gib=mem0,
            note=f"batch {plan.swinir_batch}",
        ),
        Row(
            f"stage-1 SwinIR train {crop} px",
            label,
            "steps/s",
            sps1,
            "fp32 eager",
            sps0,
            mem1,
            max_abs_diff(out1, out0),
            note,
        ),
    ]


def diffbir_inference(plan: Plan, device: torch.device) -> list[Row]:
    """DiffBIR two-stage restoration (SwinIR, ControlLDM sampling with CFG, colour fix)."""
    cfg = compose(
        "restore",
        [
            "method=diffbir",
            "input=x",
            "output=y",
            f"net@method.controlldm={plan.controlnet}",
            f"net@method.stage1={plan.swinir}",
            "method.controlldm.sd_ckpt_path=null",
            "method.controlldm.control_ckpt_path=null",
            "method.stage1_ckpt_path=null",
        ],
    )
    controlldm = instantiate(cfg.method.controlldm, device, control_ckpt_path=None)
    stage1 = instantiate(cfg.method.stage1, device)
    method = (
        instantiate(
            cfg.method,
            device,
            controlldm=controlldm,
            stage1=stage1,
            stage1_ckpt_path=None,
            cfg_scale=4.0,
            steps=plan.diffbir_steps,
        )
        .to(device)
        .eval()
    )

    def restore(size: int, bf16: bool) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        lq = torch.rand(1, 3, size, size, generator=g).to(device)
        with torch.no_grad(), precision(device, bf16):
            return method.restore(lq, torch.tensor([0], device=device))["restored"]

    rows, outs, sec = [], {}, {}
    s = plan.diffbir_size
    for name, bf16 in (("fp32", False), ("bf16", True)):
        restore(s, bf16) if device.type == "cuda" else None  # warm-up
        reset_peak(device)
        sec[name], outs[name] = timed(partial(restore, s, bf16), device)
    rows.append(
        Row(f"DiffBIR {s} px, {plan.diffbir_steps} steps, cfg 4", "fp32", "s/image", sec["fp32"])
    )
    rows.append(
        Row(
            f"DiffBIR {s} px, {plan.diffbir_steps} steps, cfg 4",
            "bf16",
            "images/s",
            1 / sec["bf16"],
            "fp32",
            1 / sec["fp32"],
            max_diff=max_abs_diff(outs["bf16"], outs["fp32"]),
            note=f"{sec['bf16']:.3g} s/image",
        )
    )
    if device.type == "cuda":  # peak memory is a CUDA figure
        method.hparams.steps = plan.diffbir_memory_steps  # memory does not depend on the count
        memory = {}
        for size in (s, plan.diffbir_large):
            reset_peak(device)
            restore(size, True)
            memory[size] = peak_gib(device)
        rows.append(
            Row(
                "DiffBIR peak memory, bf16, tiled",
                f"{plan.diffbir_large} px",
                "peak GiB",
                memory[plan.diffbir_large],
                f"{s} px",
                memory[s],
                note="goal: ratio <= 1.3",
            )
        )
    return rows


def prior_and_operator(plan: Plan, method: str, operator: str, device: torch.device):
    cfg = compose(
        "restore",
        [
            f"method={method}",
            f"operator={operator}",
            f"prior={plan.prior}",
            "prior.ckpt_path=null",
            "input=x",
            "output=y",
        ],
    )
    prior = instantiate(cfg.prior, device)
    torch.nn.init.normal_(prior.net.out[-1].weight, std=0.02)  # released init is zero: eps = 0
    return cfg, prior


def bird_throughput(plan: Plan, device: torch.device) -> list[Row]:
    """BIRD deblurring (kernel MLP): images/hour from a few timed iterations of 100."""
    rows = []
    for network_grad in (False, True):
        cfg, prior = prior_and_operator(plan, "bird", "blur_kernel_mlp", device)
        per_hour, outs = {}, {}
        for name, batch, bf16 in (
            ("batch 1 fp32", 1, False),
            (f"batch {plan.bird_batch} bf16", plan.bird_batch, True),
        ):
            operator = instantiate(cfg.operator, device)
            bird = instantiate(
                cfg.method,
                device,
                prior=prior,
                operator=operator,
                network_grad=network_grad,
                iterations=plan.bird_iterations,
                delta_t=plan.bird_delta_t,
            ).to(device)
            g = torch.Generator().manual_seed(0)
            y = torch.rand(batch, 3, plan.bird_size, plan.bird_size, generator=g).to(device)
            index = torch.arange(batch, device=device)
            with precision(device, bf16):
                bird.restore(y[:1], index[:1]) if device.type == "cuda" else None  # warm-up
                reset_peak(device)
                seconds, out = timed(partial(bird.restore, y, index), device)
            per_image_s = seconds / plan.bird_iterations * BIRD_ITERATIONS / batch
            per_hour[name] = (3600 / per_image_s, peak_gib(device))
            outs[name] = out["restored"][:1].detach()
        (base, _), (fast, mem) = per_hour.values()
        mode = "full backprop" if network_grad else "net under no_grad (released)"
        rows.append(
            Row(
                f"BIRD {plan.bird_size} px, {mode}",
                f"batch {plan.bird_batch} bf16",
                "images/hour",
                fast,
                "batch 1 fp32",
                base,
                mem,
                max_abs_diff(*outs.values()),
                f"{plan.bird_iterations} of {BIRD_ITERATIONS} iterations timed",
            )
        )
        del prior
        reset_peak(device)
    return rows


def bir_d_throughput(plan: Plan, device: torch.device) -> list[Row]:
    """BIR-D (adaptive scale, learned kernel) and GDP (fixed) at 256 px, respaced steps."""
    rows = []
    for method in ("bir_d", "gdp"):
        cfg, prior = prior_and_operator(plan, method, "kernel_mask", device)
        per_hour, outs = {}, {}
        for name, batch, bf16 in (
            ("batch 1 fp32", 1, False),
            (f"batch {plan.bir_d_batch} bf16", plan.bir_d_batch, True),
        ):
            model = instantiate(
                cfg.method,
                device,
                prior=prior,
                operator=instantiate(cfg.operator, device),
                steps=plan.bir_d_steps,
            ).to(device)
            g = torch.Generator().manual_seed(0)
            y = torch.rand(batch, 3, plan.bir_d_size, plan.bir_d_size, generator=g).to(device)
            data = {"lq": y, "index": torch.arange(batch), "name": [f"{i}" for i in range(batch)]}
            with precision(device, bf16):
                reset_peak(device)
                seconds, out = timed(partial(model.predict_step, data), device)
            per_hour[name] = (3600 * batch / seconds, peak_gib(device))
            outs[name] = out["restored"][:1].detach()
        (base, _), (fast, mem) = per_hour.values()
        label = "BIR-D" if method == "bir_d" else "GDP"
        rows.append(
            Row(
                f"{label} {plan.bir_d_size} px, {plan.bir_d_steps} steps",
                f"batch {plan.bir_d_batch} bf16",
                "images/hour",
                fast,
                "batch 1 fp32",
                base,
                mem,
                max_abs_diff(*outs.values()),
            )
        )
        del prior
        reset_peak(device)
    return rows


def degradation_throughput(plan: Plan, device: torch.device) -> list[Row]:
    """SecondOrderDegradation on the device vs bench_degradations' per-sample reference."""
    import random

    from bench_degradations import reference_one

    from bir.degradations import DiffJPEG, SecondOrderDegradation
    from bir.random import sample_generators

    b, s = plan.degradation_batch, plan.degradation_size
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(b, 3, s, s, generator=g).to(device)
    pipeline, jpeg = SecondOrderDegradation().to(device), DiffJPEG().to(device)

    def batched(rep: int) -> None:
        pipeline(gt, sample_generators(rep, range(b), device))

    def per_sample(rep: int) -> None:
        for i in range(b):
            reference_one(gt[i : i + 1], random.Random(rep * 10_000 + i), jpeg)

    with torch.no_grad():
        batched(0), per_sample(0)  # warm-up
        times = {"batched": [], "per-sample": []}
        for rep in range(plan.degradation_repeats):
            times["batched"].append(timed(partial(batched, rep + 1), device)[0])
            times["per-sample"].append(timed(partial(per_sample, rep + 1), device)[0])
    ips = {k: b / sorted(v)[len(v) // 2] for k, v in times.items()}
    return [
        Row(
            f"second-order degradation, {b} x {s} px",
            "batched (bir)",
            "images/s",
            ips["batched"],
            "per-sample reference",
            ips["per-sample"],
        )
    ]


SECTIONS: list[tuple[str, Callable[[Plan, torch.device], list[Row]]]] = [
    ("stage-2 training", stage2_training),
    ("stage-1 SwinIR training", stage1_training),
    ("DiffBIR inference", diffbir_inference),
    ("BIRD", bird_throughput),
    ("BIR-D / GDP", bir_d_throughput),
    ("second-order degradation", degradation_throughput),
]


def run(
    plan: Plan, device: torch.device, budget_s: float, only: list[str] | None = None
) -> list[Row]:
    """Every section in order; one that raises, or starts after the budget is spent, gets one
    row with the reason."""
    start, rows = time.perf_counter(), []
    for name, fn in SECTIONS:
        if only and not any(o in name for o in only):
            continue
        elapsed = time.perf_counter() - start
        if elapsed > budget_s:
            rows.append(Row(name, "", "", note=f"skipped: time budget {budget_s:.0f} s spent"))
            continue
        section_start = time.perf_counter()
        try:
            rows.extend(fn(plan, device))
        except Exception as exc:  # one failing measurement must not hide the others
            message = str(exc).splitlines()[0][:160] if str(exc) else ""
            rows.append(Row(name, "", "", note=f"failed: {type(exc).__name__}: {message}"))
        reset_peak(device)
        print(
            f"[gpu_check] {name}: {time.perf_counter() - section_start:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU path: tiny nets and sizes")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=480.0,
        help="no section starts after this many seconds (default 480)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        help="run only sections whose name contains one of these words",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        device, plan = torch.device("cpu"), SMOKE
        torch.set_num_threads(1)  # tiny nets are overhead-bound: one thread is fastest
    else:
        if not torch.cuda.is_available():
            print(
                "gpu_check: no CUDA device (torch.cuda.is_available() is False); run it on a "
                "GPU machine, or pass --smoke for the CPU path",
                file=sys.stderr,
            )
            return 2
        device, plan = torch.device("cuda"), REAL
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 baselines are true fp32
        torch.backends.cudnn.allow_tf32 = False
    start = time.perf_counter()
    rows = run(plan, device, args.budget_s, args.only)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke sizes)"
    print(
        f"\nbir gpu_check on {name}, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}, {time.perf_counter() - start:.0f} s\n"
    )
    print(markdown(rows))
    return 1 if any(r.note.startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
