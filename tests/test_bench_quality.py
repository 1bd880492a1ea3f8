"""bir-bench quality makes every blurred observation with the forward model each method inverts;
the benchmark tasks (``tasks()``, ``conf/benchmark``) observe through ``conf/operator`` configs
and give the observations the removed ``op_spec`` dicts gave."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from bir.bench_quality import BLUR_PADDING, CONF, known_operator, method_operator, observe, tasks
from bir.errors import UsageError
from bir.operators import KernelMLPBlur, LowLightOperator, convolve_per_image
from bir.operators.synthetic import motion_kernel
from bir.random import sample_generators

BLUR_TASKS = [t for t in tasks(7) if "blur" in t.operator]


@pytest.mark.parametrize("task", BLUR_TASKS, ids=lambda t: t.name)
def test_methods_invert_the_model_that_made_the_observation(task):
    x = torch.rand(2, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    task = dataclasses.replace(task, sigma=0.0)  # the forward model alone
    y, truth = observe(task, x, seed=3)
    psf = truth["kernel"]  # [B, 1, k, k], convolution PSF
    assert task.overrides["padding"] == BLUR_PADDING and truth["operator"].padding == BLUR_PADDING
    for method in ("bird", "bir_d"):
        op = method_operator(method, task, truth, kernel_size=7)
        if not task.blind:
            assert op is truth["operator"]
            continue
        assert op.padding == BLUR_PADDING
        if isinstance(op, KernelMLPBlur):  # its blur with the true PSF is the observation
            ours = convolve_per_image(x, psf, op.padding)
        else:  # BIR-D / GDP: K * x + M with K = the true kernel (in the operator's direction), M = 0
            op.init_batch(x.shape)
            with torch.no_grad():
                k = psf.expand(-1, 3, -1, -1)
                op.kernel.copy_(k.flip(-1, -2) if op.correlate else k)
                if op.mask is not None:
                    op.mask.zero_()
            ours = op(x)
        torch.testing.assert_close(ours.clamp(0, 1), y, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["inpaint_25", "motion_deblur"])
def test_non_blind_methods_keep_the_random_truth_of_the_observation(name):
    (task,) = [dataclasses.replace(t, sigma=0.0, blind=False) for t in tasks(7) if t.name == name]
    x = torch.rand(2, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    y, truth = observe(task, x, seed=3)
    op = method_operator("bird", task, truth, kernel_size=7)
    op.init_batch(x.shape, sample_generators(5, range(2), stream=1))  # as a method does
    torch.testing.assert_close(op(x).clamp(0, 1), y, rtol=0, atol=1e-6)


def test_lowlight_methods_learn_a_factor_of_an_observation_that_is_x_over_four():
    (task,) = [t for t in tasks(9) if t.name == "lowlight"]
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y, truth = observe(dataclasses.replace(task, sigma=0.0), x, seed=0)
    torch.testing.assert_close(y, x / 4, rtol=0, atol=0)
    assert truth["factor"].tolist() == [0.25]
    for method in ("bird", "bir_d", "gdp"):
        op = method_operator(method, task, truth, kernel_size=9)
        assert type(op) is LowLightOperator and op is not truth["operator"]
        assert op.factor_init_std == 0.01 and op.use_mask  # conf/operator/lowlight.yaml


# --- the observations the removed op_spec dicts gave ----------------------------------------
def _blur(x: torch.Tensor, kernel: torch.Tensor, padding: str) -> torch.Tensor:
    """Convolution (flipped kernel) of ``[1, 3, H, W]`` with ``[k, k]``, the size kept."""
    p = kernel.shape[-1] // 2
    signed = padding == "zeros_signed"  # zeros on the [-1, 1] scale
    if signed:
        x = 2 * x - 1
    x = F.pad(x, (p, p, p, p), mode="reflect" if padding == "reflect" else "constant")
    out = F.conv2d(x, kernel.flip(-1, -2).expand(3, 1, -1, -1), groups=3)
    return (out + 1) / 2 if signed else out


def old_observation(x: torch.Tensor, spec: dict, sigma: float, gens: list) -> torch.Tensor:
    """Frozen formulas of the removed ``bir.operators.synthetic.degrade(x, op_spec, sigma,
    generators)`` (and of bench_quality's low-light branch, kind ``lowlight``): per image, the
    random truth (a motion kernel, a mask seed) and then the noise from its generator."""
    kind, size = spec["kind"], spec.get("kernel_size", 41)
    h, w = x.shape[-2:]
    mask = None
    if kind == "gaussian_blur":
        r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        g = torch.exp(-(r[:, None] ** 2 + r[None] ** 2) / (2 * spec["blur_sigma"] ** 2))
        kernels = [(g / g.sum()).float()] * len(gens)
    elif kind == "motion_blur":
        kernels = [motion_kernel(size, spec["intensity"], g, 64) for g in gens]
    if kind in ("gaussian_blur", "motion_blur"):
        pad = spec.get("padding", "reflect")
        clean = torch.cat([_blur(x[i : i + 1], k, pad) for i, k in enumerate(kernels)])
    elif kind == "avgpool":
        clean = F.avg_pool2d(x, spec["scale"])
    elif kind == "bicubic":
        s = spec["scale"]
        clean = F.interpolate(x, size=(h // s, w // s), mode="bicubic", antialias=True)
    elif kind == "inpaint":  # random: a seed from the image's generator, then the pixels kept
        seeds = [int(torch.randint(2**62, (), generator=g)) for g in gens]
        draws = [torch.rand(h, w, generator=torch.Generator().manual_seed(s)) for s in seeds]
        mask = torch.stack([(u < spec["keep_ratio"]).float()[None] for u in draws])
        clean = x * mask
    elif kind == "identity":
        clean = x
    elif kind == "grayscale":
        luma = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        clean = luma.expand(-1, 3, -1, -1)
    elif kind == "lowlight":
        clean = spec["factor"] * x
    noise = torch.stack([torch.randn(clean.shape[1:], generator=g) for g in gens])
    y = (clean + sigma * noise).clamp(0, 1)
    return y if mask is None else y * mask  # missing pixels carry no noise


def _gauss(k, s, pad="reflect"):
    return {"kind": "gaussian_blur", "kernel_size": k, "blur_sigma": s, "padding": pad}


RANDOM_MASK = {"kind": "inpaint", "mask_kind": "random", "keep_ratio": 0.75}
#: every synthetic task as it was written in the old vocabulary: (op_spec, noise sigma)
OLD_BENCH_QUALITY = {
    "deblur_known": (_gauss(9, 1.6), 0.01),
    "deblur_blind": (_gauss(9, 1.6), 0.01),
    "motion_deblur": ({"kind": "motion_blur", "kernel_size": 9, "intensity": 0.5}, 0.01),
    "sr_x4": ({"kind": "bicubic", "scale": 4}, 0.0),
    "denoise": ({"kind": "identity"}, 25 / 255),
    "inpaint_25": (RANDOM_MASK, 0.0),
    "lowlight": ({"kind": "lowlight", "factor": 0.25}, 0.01),
}
OLD_CONF_BENCHMARK = {
    ("bir_d_imagenet", "sr4"): ({"kind": "bicubic", "scale": 4}, 0.0),
    ("bir_d_imagenet", "deblur"): (_gauss(9, 3.0), 0.0),
    ("bir_d_imagenet", "inpaint25"): (RANDOM_MASK, 0.0),
    ("bir_d_imagenet", "colorization"): ({"kind": "grayscale"}, 0.0),
    ("bird", "gaussian_deblur"): (_gauss(41, 3.0, "zeros_signed"), 0.05),
    ("bird", "motion_deblur"): (
        {"kind": "motion_blur", "kernel_size": 41, "intensity": 0.5, "padding": "zeros_signed"},
        0.05,
    ),
    ("bird", "sr8"): ({"kind": "avgpool", "scale": 8}, 0.05),
    ("bird", "denoise"): ({"kind": "identity"}, 0.1),
}


def test_bench_quality_observations_are_those_of_the_old_specs():
    assert [t.name for t in tasks(9)] == list(OLD_BENCH_QUALITY)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for task in tasks(9):
        spec, sigma = OLD_BENCH_QUALITY[task.name]
        y, _ = observe(task, x, seed=3)
        want = old_observation(x, spec, sigma, sample_generators(3, range(2), stream=7))
        torch.testing.assert_close(y, want, rtol=0, atol=1e-6, msg=task.name)


def _prepare_benchmark():
    path = Path(__file__).resolve().parents[1] / "scripts" / "prepare_benchmark.py"
    spec = importlib.util.spec_from_file_location("prepare_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_config_observations_are_those_of_the_old_specs():
    degrade_task = _prepare_benchmark().degrade_task
    synthetic = {
        (f.stem, name): task
        for f in sorted((CONF / "benchmark").glob("*.yaml"))
        for name, task in OmegaConf.to_container(OmegaConf.load(f))["tasks"].items()
        if "operator" in task
    }
    assert set(synthetic) == set(OLD_CONF_BENCHMARK)
    gt = torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(1))
    for key, task in synthetic.items():
        spec, sigma = OLD_CONF_BENCHMARK[key]
        for index in (0, 5):  # prepare_benchmark: image index's generator of the config seed
            lq, truth = degrade_task(task, gt, seed=0, index=index)
            gens = sample_generators(0, [index], stream=0)
            want = old_observation(gt[None], spec, sigma, gens)[0]
            torch.testing.assert_close(lq, want, rtol=0, atol=1e-6, msg=str(key))
        if "blur" in spec["kind"]:  # the truth saved next to lq
            assert truth["kernel"].shape == (1, spec["kernel_size"], spec["kernel_size"])
        if spec["kind"] == "inpaint":
            assert truth["mask"].shape == (1, 48, 48)


def test_benchmark_operator_names_and_fields_fail_in_one_line(tmp_path, capsys):
    with pytest.raises(UsageError, match="operator 'gaussian_blur': no .*choose one of .*"):
        known_operator("gaussian_blur")
    with pytest.raises(UsageError, match="no field blur_sigma; its fields: kernel, kernel_size"):
        known_operator("gaussian_blur_known", {"blur_sigma": 3.0})
    cfg = tmp_path / "b.yaml"
    cfg.write_text(
        "dataset: {gt_dir: gt, size: null}\n"
        "tasks: {t: {operator: gaussian_blur_known, overrides: {mask_kind: box}}}\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        _prepare_benchmark().main([str(cfg), "--data-root", str(tmp_path), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "b.yaml: operator gaussian_blur_known: no field mask_kind" in err
    assert not (tmp_path / "gt").exists()  # nothing written


# --- images, the table ---------------------------------------------------------------------
def test_images_from_files_folders_and_sample_names(tmp_path):
    from bir.bench_quality import load_image, resolve_images
    from bir.data.io import save_image
    from bir.errors import UsageError

    g = torch.Generator().manual_seed(1)
    img = torch.rand(3, 40, 60, generator=g)
    save_image(img, tmp_path / "one.png")
    (tmp_path / "set" / "sub").mkdir(parents=True)
    save_image(torch.rand(3, 20, 20, generator=g), tmp_path / "set" / "a.png")
    save_image(torch.rand(3, 20, 20, generator=g), tmp_path / "set" / "sub" / "b.png")
    found = resolve_images([str(tmp_path / "one.png"), str(tmp_path / "set"), "coffee"])
    assert [n for n, _ in found] == ["one", "a", "sub/b", "coffee"]
    assert found[-1][1] is None and found[1][1] == tmp_path / "set" / "a.png"
    # centre square of min(crop, shorter side), area-resized: 40x40 centre of 40x60 -> 20 px
    got = load_image("one", tmp_path / "one.png", crop=256, size=20)
    centre = F.avg_pool2d(img[None, :, :, 10:50], 2)[0]
    torch.testing.assert_close(got, centre, atol=2 / 255, rtol=0)  # 8-bit PNG round-off
    with pytest.raises(UsageError, match="not an image file, a folder or a scikit-image"):
        resolve_images([str(tmp_path / "missing.png")])
    with pytest.raises(UsageError, match="several images are named one"):
        resolve_images([str(tmp_path / "one.png"), str(tmp_path / "one.png")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no image"):
        resolve_images([str(tmp_path / "empty")])


def _rec(row, task, image, seed, p, s=0.5):
    return {"row": row, "task": task, "image": image, "seed": seed, "psnr": p, "ssim": s}


def test_summary_means_over_images_then_seeds_with_the_spread():
    from bir.bench_quality import summarise

    recs = [
        _rec("M", "t", "a", 0, 10.0),
        _rec("M", "t", "b", 0, 14.0),  # seed 0: mean 12
        _rec("M", "t", "a", 1, 16.0),
        _rec("M", "t", "b", 1, 20.0),  # seed 1: mean 18
        _rec("M", "t", "a", 2, 13.0),
        _rec("M", "t", "b", 2, 17.0),  # seed 2: mean 15
        _rec("input", "t", "a", None, 5.0),
        _rec("input", "t", "b", None, 7.0),
    ]
    cell = summarise(recs)["M"]["t"]
    assert cell["psnr"] == pytest.approx(15.0) and cell["seeds"] == 3 and cell["images"] == 2
    assert cell["psnr_std"] == pytest.approx(3.0)  # sample std of 12, 18, 15
    base = summarise(recs)["input"]["t"]
    assert base["psnr"] == pytest.approx(6.0) and base["psnr_std"] == 0.0 and base["seeds"] == 1


def test_table_never_marks_an_oracle_or_the_input_best():
    from bir.bench_quality import format_table, summarise

    recs = [
        _rec("degraded input", "t", "a", None, 40.0),
        _rec("Wiener (oracle: true kernel)", "t", "a", None, 30.0),
        _rec("blind RL", "t", "a", None, 20.0),
        _rec("BIRD, quick", "t", "a", 0, 21.0),
        _rec("BIRD, quick", "t", "a", 1, 23.0),
        _rec("GDP, quick", "u", "a", 0, 9.0),
    ]
    lines = format_table(summarise(recs), ["t", "u"]).splitlines()
    row = {line.split(" | ")[0][2:]: line for line in lines[2:]}
    assert "**" not in row["degraded input"] and "**" not in row["Wiener (oracle: true kernel)"]
    assert "**22.00 ± 1.41 / 0.500** | –" in row["BIRD, quick"]  # best of t, no u cell
    assert "20.00 / 0.500" in row["blind RL"] and "±" not in row["blind RL"]
    assert row["GDP, quick"].endswith("| **9.00 / 0.500** |")


def test_blind_columns_label_true_kernel_baselines_as_oracles():
    from bir.bench_quality import baseline_label, is_oracle

    for task in tasks(9):
        labels = [baseline_label(kind, task) for kind in task.baselines]
        for kind, label in zip(task.baselines, labels, strict=True):
            assert is_oracle(label) == (task.blind and kind in ("wiener", "richardson_lucy"))
        if task.blind:  # a baseline that is not an oracle
            assert not all(map(is_oracle, labels))
        if task.blind and "wiener" in task.baselines:  # blurs: one that estimates the kernel
            assert "blind_richardson_lucy" in task.baselines


def test_bench_arguments_fail_in_one_line(capsys):
    from bir.bench_quality import main

    for argv, needle in (
        (["--tasks", "nope"], "--tasks nope: unknown task"),
        (["--methods", "X"], "--methods 'X': unknown"),
        (["--seeds", "1", "1"], "--seeds: give each seed once"),
        (["--images", "/no/such.png"], "--images /no/such.png: not an image"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["quality", *argv])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and needle in err and len(err.splitlines()) == 1


def test_released_rows_use_presets_that_exist():
    from bir.bench_quality import CONF, RELEASED

    names = {t.name for t in tasks(9)}
    for method, by_task in RELEASED.items():
        assert set(by_task) == names
        for preset in filter(None, by_task.values()):
            text = (CONF / "experiment" / f"{preset}.yaml").read_text()
            assert f"override /method: {method}" in text or f"/method: {method}" in text, preset


def test_released_rows_take_the_presets_method_settings():
    from bir.bench_quality import compose_method

    quick = compose_method("bir_d", ["method.steps=100"]).method
    released = compose_method("bir_d", [], "bir_d_deblur").method
    assert quick.steps == 100 and quick.noisy_observation is False
    assert released.steps is None and released.noisy_observation is True  # 1000 steps, as released
    bird = compose_method("bird", ["seed=5"], "bird_deblur")
    assert bird.method.save_every == 10 and bird.method.loss_range == "signed" and bird.seed == 5
