"""DiffBIR inference: shapes and ranges, per-image seeding, CFG, control strength, guidance,
samplers, tiling, SR upscaling, stage-1 checkpoint prefixes and bir-restore end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from bir.cli import CONFIG_DIR
from bir.lit.diffbir import DiffBIR
from bir.tiling import num_tiles


@pytest.fixture(autouse=True)
def _single_thread():
    # tiny nets are overhead-bound: one thread is several times faster on a busy 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_method(seed: int = 0, **overrides) -> DiffBIR:
    """The real method=diffbir config with the tiny networks (random weights, trained-looking
    ControlNet: non-zero zero-convs and hint weights)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("restore", overrides=["method=diffbir", "input=x", "output=y",
                                            "net@method.controlldm=controlnet_tiny",
                                            "net@method.stage1=swinir_tiny"])  # fmt: skip
    torch.manual_seed(seed)
    unet = hydra.utils.instantiate(cfg.method.controlldm.unet)
    nn.init.normal_(unet.out[2].weight, std=0.02)
    controlldm = hydra.utils.instantiate(cfg.method.controlldm, unet=unet, control_ckpt_path=None)
    cn = controlldm.controlnet
    for conv in [*cn.zero_convs, cn.middle_block_out]:
        nn.init.normal_(conv[0].weight, std=0.05)
    nn.init.normal_(cn.input_blocks[0][0].weight, std=0.05)
    stage1 = hydra.utils.instantiate(cfg.method.stage1)
    args = dict(steps=3, seed=5, stage1_ckpt_path=None)
    args.update(overrides)
    return hydra.utils.instantiate(cfg.method, controlldm=controlldm, stage1=stage1, **args)


def lq_batch(indices=(0, 1), h: int = 20, w: int = 28) -> dict:
    g = torch.Generator().manual_seed(0)
    lq = torch.rand(len(indices), 3, h, w, generator=g)
    return {"lq": lq, "index": torch.tensor(list(indices)), "name": [f"im{i}" for i in indices]}


def test_predict_shapes_range_extras_and_per_image_seeds():
    method = tiny_method()
    batch = lq_batch((0, 1))
    out = method.predict_step(batch)
    r = out["restored"]
    assert r.shape == (2, 3, 20, 28) and torch.isfinite(r).all() and r.min() >= 0 and r.max() <= 1
    assert out["name"] == ["im0", "im1"] and "loss_curve" not in out
    ex = out["extras"]
    assert ex["sampler"] == "ddpm" and ex["steps"] == 3 and ex["color_fix"] == "wavelet"
    assert ex["guidance_scale"] == 0.0 and ex["seed"] == 5
    # the same image index gives the same result in any batch; other indices differ
    alone = method.predict_step({**lq_batch((1,)), "lq": batch["lq"][1:]})["restored"]
    torch.testing.assert_close(alone, r[1:], atol=2e-4, rtol=0)
    shifted = method.predict_step({**batch, "index": torch.tensor([7, 8])})["restored"]
    assert (shifted - r).abs().max() > 1e-3


def test_cfg_and_control_strength_in_the_denoiser():
    method = tiny_method(cfg_scale=3.0)
    net = method.controlldm
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 8, 8, generator=g)
    cond = torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([500])
    pos, neg = net.encode_text(["a photo"]), net.encode_text(["blurry"])
    with torch.no_grad():
        got = method.denoiser(pos, neg, cond)(z, t)
        p, n = net(z, t, pos, cond), net(z, t, neg, cond)
        torch.testing.assert_close(got, n + 3.0 * (p - n), atol=1e-5, rtol=1e-5)
        net.set_control_strength(0.0)
        torch.testing.assert_close(net(z, t, pos, cond), net.unet(z, t, context=pos))


def test_guidance_scale_zero_equals_no_guidance_and_positive_scale_pulls_to_stage1():
    batch = lq_batch((0,), 16, 16)
    off = tiny_method(guidance=None).predict_step(batch)["restored"]
    zero = tiny_method(guidance={"scale": 0.0, "repeats": 3}).predict_step(batch)["restored"]
    assert torch.equal(off, zero)
    on = tiny_method(guidance={"scale": 0.01, "repeats": 2})
    out = on.predict_step(batch)
    assert out["loss_curve"].shape == (1, 3) and out["extras"]["guidance_repeats"] == 2
    free = tiny_method().restore(batch["lq"], batch["index"])
    guided = on.restore(batch["lq"], batch["index"])
    # the guided latent ends much closer to the stage-1 latent (the guidance target)
    err = lambda r: (r["latent"] - r["cond"]).pow(2).mean()  # noqa: E731
    assert err(guided) < 0.5 * err(free)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_other_samplers_run_deterministically(sampler):
    batch = lq_batch((0,), 16, 16)
    a = tiny_method(sampler=sampler).predict_step(batch)["restored"]
    b = tiny_method(sampler=sampler).predict_step(batch)["restored"]
    ddpm = tiny_method().predict_step(batch)["restored"]
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert (a - ddpm).abs().max() > 1e-4
    method = tiny_method(sampler=sampler)
    assert len(method.sampling_schedule()) == 3


def test_latent_tiling_matches_untiled_when_one_tile_and_blends_otherwise(monkeypatch):
    batch = lq_batch((0,), 32, 32)  # 16 x 16 latents with the factor-2 tiny VAE
    untiled = tiny_method(diffusion_tile_size=None).predict_step(batch)["restored"]
    one_tile = tiny_method(diffusion_tile_size=32).predict_step(batch)["restored"]
    torch.testing.assert_close(one_tile, untiled, atol=1e-6, rtol=0)
    method = tiny_method(diffusion_tile_size=16, diffusion_tile_overlap=8)  # 8-px latent tiles
    calls = []
    forward = method.controlldm.forward
    monkeypatch.setattr(
        method.controlldm, "forward", lambda *a, **k: calls.append(a[0].shape) or forward(*a, **k)
    )
    tiled = method.predict_step(batch)["restored"]
    assert len(calls) == 3 * num_tiles(16, 16, 8, 4) and all(s[-2:] == (8, 8) for s in calls)
    assert torch.isfinite(tiled).all() and tiled.shape == untiled.shape
    assert (tiled - untiled).abs().mean() < 0.2  # same content, seams blended


def test_upscale_and_tiled_stage1():
    method = tiny_method(upscale=2.0, stage1_tile_size=16, stage1_tile_overlap=8)
    calls = []
    stage1_forward = method.stage1.forward
    method.stage1.forward = lambda x: calls.append(x.shape) or stage1_forward(x)
    out = method.predict_step(lq_batch((0,), 12, 14))
    assert out["restored"].shape == (1, 3, 24, 28) and out["extras"]["upscale"] == 2.0
    assert len(calls) == num_tiles(24, 28, 16, 8) and all(s[-2:] == (16, 16) for s in calls)


def test_stage1_weights_load_from_a_v1_full_checkpoint(tmp_path):
    ref = tiny_method(seed=1)
    state = {f"preprocess_model.{k}": v for k, v in ref.stage1.state_dict().items()}
    state["control_model.zero_convs.0.0.weight"] = torch.zeros(1)  # other parts of the file
    torch.save({"state_dict": state}, tmp_path / "general_full_v1.ckpt")
    loaded = tiny_method(seed=2, stage1_ckpt_path=str(tmp_path / "general_full_v1.ckpt"))
    for k, v in loaded.stage1.state_dict().items():
        assert torch.equal(v, ref.stage1.state_dict()[k])
    assert not any(p.requires_grad for p in loaded.stage1.parameters())
    with pytest.raises(Exception, match="not found"):
        tiny_method(stage1_ckpt_path=str(tmp_path / "missing.ckpt"))


def test_bad_settings_are_rejected():
    for bad in ({"sampler": "euler"}, {"prediction": "x0"}, {"color_fix": "hist"}):
        with pytest.raises(Exception, match="must be"):
            tiny_method(**bad)


@pytest.mark.slow
def test_bir_restore_method_diffbir_end_to_end(tmp_path):
    from bir.data.io import save_image

    save_image(torch.rand(3, 20, 24), tmp_path / "in" / "a.png")
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    args = ["method=diffbir", "net@method.controlldm=controlnet_tiny", "net@method.stage1=swinir_tiny",
            "method.stage1_ckpt_path=null", "method.controlldm.control_ckpt_path=null",
            "method.steps=2", "method.guidance.scale=0.1", f"input={tmp_path / 'in'}",
            f"output={tmp_path / 'out'}", "callbacks.progress_bar=null"]  # fmt: skip
    proc = subprocess.run([str(Path(sys.executable).parent / "bir-restore"), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "a.png").is_file()
    record = json.loads((tmp_path / "out" / "records" / "a.json").read_text())
    assert record["extras"]["guidance_scale"] == 0.1 and record["extras"]["sampler"] == "ddpm"
