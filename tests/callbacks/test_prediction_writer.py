import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from bir.callbacks import PredictionWriter
from bir.data.datasets import RestoreFolderDataset, collate
from bir.data.io import read_image, save_image


class HalfModule(pl.LightningModule):
    """Returns lq / 2, a 3x3 kernel and curves; NaN for names listed in ``nan_names``."""

    def __init__(self, nan_names=()):
        super().__init__()
        self.nan_names = set(nan_names)
        self.calls = []

    def predict_step(self, batch, batch_idx):
        out = batch["lq"] / 2
        for i, n in enumerate(batch["name"]):
            self.calls.append(n)
            if n in self.nan_names:
                out[i, 0, 0, 0] = float("nan")
        b = out.shape[0]
        return {
            "name": batch["name"],
            "restored": out,
            "kernel": torch.full((b, 1, 3, 3), 1 / 9),
            "loss_curve": torch.linspace(1, 0, 5).repeat(b, 1),
            "scale_trajectory": torch.arange(4.0).repeat(b, 1),
            "extras": {"seed": batch["index"]},
        }


def _inputs(tmp_path, n=3):
    for k in range(n):
        save_image(torch.full((3, 16, 16), 0.2 * (k + 1)), tmp_path / "in" / f"img{k}.png")
        save_image(torch.full((3, 16, 16), 0.1 * (k + 1)), tmp_path / "gt" / f"img{k}.png")


def _run(tmp_path, module, writer, batch_size=2):
    ds = RestoreFolderDataset(tmp_path / "in", gt=tmp_path / "gt", exclude=writer.done_names())
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False
    )
    if len(ds):
        loader = DataLoader(ds, batch_size=batch_size, collate_fn=collate)
        trainer.predict(module, loader, return_predictions=False)
    return ds


def _strict_json(path):
    """Parse ``path`` as strict JSON: a bare NaN / Infinity is an error."""

    def refuse(token):
        raise ValueError(f"{path} holds a bare {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _truncated_jpeg(path, seed=0):
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.kron(arr, np.ones((2, 2, 1), np.uint8))).save(path, quality=90)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with Image.open(path) as im:  # passes the start-up check
        im.verify()


def test_writes_everything_and_summary(tmp_path):
    _inputs(tmp_path)
    w = PredictionWriter(tmp_path / "out")
    _run(tmp_path, HalfModule(), w)
    out = tmp_path / "out"
    assert torch.allclose(read_image(out / "img1.png"), torch.full((3, 16, 16), 0.2), atol=1 / 255)
    assert np.allclose(np.load(out / "kernels" / "img0.npy"), 1 / 9)
    assert (out / "curves" / "img2_scale.png").exists()
    rec = json.loads((out / "records" / "img0.json").read_text())
    assert rec["metrics"]["psnr"] > 40  # output 0.1 vs gt 0.1 up to 8-bit rounding
    assert rec["extras"]["seed"] == 0 and rec["final_loss"] == pytest.approx(0.0)
    summary = (out / "summary.md").read_text()
    assert "| psnr |" in summary and "3 images" in summary
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == 4
    assert not list(out.rglob("*.tmp"))


def test_resume_skips_done_images(tmp_path):
    _inputs(tmp_path)
    w = PredictionWriter(tmp_path / "out", metrics=())
    _run(tmp_path, HalfModule(), w)
    m2 = HalfModule()
    ds = _run(tmp_path, m2, PredictionWriter(tmp_path / "out", metrics=()))
    assert len(ds) == 0 and m2.calls == []
    (tmp_path / "out" / "img1.png").unlink()
    m3 = HalfModule()
    _run(tmp_path, m3, PredictionWriter(tmp_path / "out", metrics=()))
    assert m3.calls == ["img1"]


def test_nan_output_is_not_written_but_others_are(tmp_path):
    _inputs(tmp_path)
    w = PredictionWriter(tmp_path / "out", metrics=())
    with pytest.raises(RuntimeError, match="img1"):
        _run(tmp_path, HalfModule(nan_names=["img1"]), w)
    out = tmp_path / "out"
    assert (out / "img0.png").exists() and (out / "img2.png").exists()
    assert not (out / "img1.png").exists()
    rec = _strict_json(out / "skipped" / "img1.json")
    assert rec["reason"] == "non-finite output" and "1 values" in rec["error"]
    assert "- non-finite output: 1 (img1)" in (out / "summary.md").read_text()
    # a later run that succeeds clears the record
    _run(tmp_path, HalfModule(), PredictionWriter(out, metrics=()))
    assert (out / "img1.png").exists() and not (out / "skipped" / "img1.json").exists()
    assert "skipped" not in (out / "summary.md").read_text()


@pytest.mark.parametrize("batch_size", [1, 2])
def test_read_errors_during_the_run_skip_the_image_and_the_run_goes_on(
    tmp_path, batch_size, caplog
):
    _inputs(tmp_path)
    _truncated_jpeg(tmp_path / "in" / "bad.jpg")  # an input that fails to decode mid-run
    _truncated_jpeg(tmp_path / "gt" / "img2.jpg", seed=1)  # a ground truth that does
    (tmp_path / "gt" / "img2.png").unlink()
    module, out = HalfModule(), tmp_path / "out"
    with caplog.at_level("WARNING"):
        _run(tmp_path, module, PredictionWriter(out, save_curves=False), batch_size=batch_size)
    assert module.calls == ["img0", "img1"]  # the method never sees an unreadable image
    assert sorted(p.name for p in out.glob("*.png")) == ["img0.png", "img1.png"]
    warned = [r.getMessage() for r in caplog.records if "bad.jpg" in r.getMessage()]
    assert len(warned) == 1 and "truncated" in warned[0]
    summary = (out / "summary.md").read_text()
    assert "\n2 images; output in" in summary
    assert "2 images skipped" in summary and "- unreadable: 2 (bad, img2)" in summary
    assert "img2.jpg" in _strict_json(out / "skipped" / "img2.json")["error"]
    # the input is repaired: a resumed run restores it and forgets the skip
    save_image(torch.full((3, 16, 16), 0.8), tmp_path / "in" / "bad.jpg")
    module = HalfModule()
    _run(tmp_path, module, PredictionWriter(out, save_curves=False), batch_size=batch_size)
    assert module.calls == ["bad"]  # img2 is skipped again (its GT is still truncated)
    assert "- unreadable: 1 (img2)" in (out / "summary.md").read_text()


def test_inputs_dropped_at_start_up_are_counted_in_the_summary(tmp_path):
    _inputs(tmp_path)
    (tmp_path / "in" / "garbage.png").write_bytes(b"not an image")
    _run(tmp_path, HalfModule(), PredictionWriter(tmp_path / "out", metrics=(), save_curves=False))
    assert "- unreadable: 1 (garbage)" in (tmp_path / "out" / "summary.md").read_text()


def test_empty_and_hidden_outputs_are_not_done(tmp_path):
    _inputs(tmp_path)
    w = PredictionWriter(tmp_path / "out", metrics=(), save_curves=False)
    _run(tmp_path, HalfModule(), w)
    out = tmp_path / "out"
    (out / "img1.png").write_bytes(b"")  # a full disk or a copy tool's placeholder
    save_image(torch.zeros(3, 4, 4), out / ".img9.png")
    save_image(torch.zeros(3, 4, 4), out / "skipped" / "img8.png")
    assert w.done_names() == {"img0", "img2"}
    m = HalfModule()
    _run(tmp_path, m, PredictionWriter(out, metrics=(), save_curves=False))
    assert m.calls == ["img1"] and (out / "img1.png").stat().st_size > 0


class IdentityModule(HalfModule):
    """Returns the input unchanged (PSNR against itself is infinite) and a NaN extra."""

    def predict_step(self, batch, batch_idx):
        b = batch["lq"].shape[0]
        return {
            "name": batch["name"],
            "restored": batch["lq"].clone(),
            "extras": {
                "nan": torch.full((b,), float("nan")),
                "ok": torch.ones(b),
                "pair": torch.tensor([[float("inf"), 1.0]] * b),
            },
        }


def test_records_and_curves_are_strict_json(tmp_path):
    for k in range(2):
        save_image(torch.full((3, 16, 16), 0.2 * (k + 1)), tmp_path / "in" / f"img{k}.png")
    (tmp_path / "gt").symlink_to(tmp_path / "in")  # gt = input: PSNR is +inf
    _run(tmp_path, IdentityModule(), PredictionWriter(tmp_path / "out", save_curves=False))
    rec = _strict_json(tmp_path / "out" / "records" / "img0.json")
    # the infinite PSNR stays readable as such (bir.metrics.summary): "inf", not null
    assert rec["metrics"]["psnr"] == "inf" and rec["metrics"]["ssim"] == pytest.approx(1.0)
    assert rec["extras"] == {"nan": None, "ok": 1.0, "pair": [None, 1.0]}
    _inputs(tmp_path / "second")
    _run(tmp_path / "second", HalfModule(nan_names=()), PredictionWriter(tmp_path / "o2"))
    assert _strict_json(tmp_path / "o2" / "curves" / "img0.json")["loss_curve"][0] == 1.0


def _alexnet_features(path):
    """A random torchvision AlexNet ``features.*`` state dict saved as the release would be."""
    import torchvision

    torch.manual_seed(1)
    state = torchvision.models.alexnet().state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v for k, v in state.items() if k.startswith("features.")}, path)
    return path


@pytest.mark.parametrize("how", ["weights", "weights_dir"])
def test_lpips_uses_the_configured_weights_file(tmp_path, how):
    from bir import metrics as M

    for k in range(2):  # AlexNet needs at least 32 x 32 px
        save_image(torch.rand(3, 32, 32), tmp_path / "in" / f"img{k}.png")
        save_image(torch.rand(3, 32, 32), tmp_path / "gt" / f"img{k}.png")
    alex = _alexnet_features(tmp_path / "w" / "alexnet-owt-7be5be79.pth")
    where = (
        {"weights": {"lpips_alex": str(alex)}} if how == "weights" else {"weights_dir": alex.parent}
    )
    w = PredictionWriter(tmp_path / "out", metrics=("psnr", "lpips"), save_curves=False, **where)
    _run(tmp_path, HalfModule(), w)
    for k in range(2):
        rec = json.loads((tmp_path / "out" / "records" / f"img{k}.json").read_text())
        lq = read_image(tmp_path / "in" / f"img{k}.png")
        gt = read_image(tmp_path / "gt" / f"img{k}.png")
        expected = M.lpips((lq / 2)[None], gt[None], weights_path=alex).item()
        assert rec["metrics"]["lpips"] == pytest.approx(expected, rel=1e-5)
        assert set(rec["metrics"]) == {"psnr", "psnr_y", "lpips"}
    assert "| lpips |" in (tmp_path / "out" / "summary.md").read_text()


def test_metrics_the_writer_cannot_compute_fail_before_any_work(tmp_path):
    from bir.errors import UsageError
    from bir.nets.checkpoints import MissingCheckpointError

    with pytest.raises(UsageError, match=r"\['fid'\] are distribution metrics.*bir-eval"):
        PredictionWriter(tmp_path / "out", metrics=("psnr", "fid"))
    with pytest.raises(UsageError, match="unknown metrics"):
        PredictionWriter(tmp_path / "out", metrics=("psnrr",))
    with pytest.raises(MissingCheckpointError, match="prediction_writer.weights.dists"):
        PredictionWriter(tmp_path / "out", metrics=("dists",), weights_dir=tmp_path / "none")
    assert not (tmp_path / "out").exists()


def test_a_metric_failing_on_one_image_leaves_the_others(tmp_path, caplog):
    """SSIM needs 11x11 px: on 8x8 images it is left out with one warning, PSNR is kept."""
    for k in range(2):
        save_image(torch.full((3, 8, 8), 0.2 * (k + 1)), tmp_path / "in" / f"img{k}.png")
        save_image(torch.full((3, 8, 8), 0.1 * (k + 1)), tmp_path / "gt" / f"img{k}.png")
    _run(tmp_path, HalfModule(), PredictionWriter(tmp_path / "out", save_curves=False))
    rec = json.loads((tmp_path / "out" / "records" / "img1.json").read_text())
    assert set(rec["metrics"]) == {"psnr", "psnr_y"}
    assert sum("metric ssim skipped" in r.getMessage() for r in caplog.records) == 1
