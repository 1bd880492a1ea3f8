"""bir-bench quality makes every blurred observation with the forward model each method inverts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from bir.bench_quality import BLUR_PADDING, method_operator, observe, tasks
from bir.operators import KernelMLPBlur, convolve_per_image

BLUR_TASKS = [t for t in tasks(7) if "blur" in t.op_spec["kind"]]


@pytest.mark.parametrize("task", BLUR_TASKS, ids=lambda t: t.name)
def test_methods_invert_the_model_that_made_the_observation(task):
    x = torch.rand(2, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    task = dataclasses.replace(task, sigma=0.0)  # the forward model alone
    y, truth = observe(task, x, seed=3)
    psf = truth["kernel"]  # [B, 1, k, k], convolution PSF
    assert task.op_spec["padding"] == BLUR_PADDING and truth["operator"].padding == BLUR_PADDING
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
        for kind in task.baselines:
            label = baseline_label(kind, task)
            assert is_oracle(label) == (task.blind and kind in ("wiener", "richardson_lucy"))
        if task.blind:
            assert "blind_richardson_lucy" in task.baselines  # a baseline that is not an oracle


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
