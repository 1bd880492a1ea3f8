"""W&B offline runs read back from their ``.wandb`` files, as ``wandb sync`` would upload them.

A ``run-<id>.wandb`` file is W&B's transaction log: a 7-byte header (``:W&B``, magic 0xBEE1,
version 0), then LevelDB-style log records in 32 KiB blocks, each chunk framed by
``crc32(type + data)`` (4 bytes), a length (2 bytes) and a type (full / first / middle / last).
Each assembled record is a ``wandb.proto.wandb_internal_pb2.Record``: wandb's own protobuf
schema decodes it, nothing here guesses at the content. No network is used.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from tests.conftest import NO_VALIDATION

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    """Every record of a ``.wandb`` file, decoded with wandb's protobuf schema (CRC-checked)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), data[:7]
    out, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and n == 0:  # zero-filled rest of the last block
            break
        chunk = data[pos + 7 : pos + 7 + n]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"bad checksum at byte {pos} of {path}"
        pos += 7 + n
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
    return out


def _items(items) -> dict:
    return {(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in items}


class WandbRun:
    """What a run's ``.wandb`` file holds: config, history rows, run record, files."""

    def __init__(self, wandb_file: Path):
        self.dir = wandb_file.parent
        self.config: dict = {}
        self.history: list[dict] = []
        self.run = None
        for rec in read_records(wandb_file):
            kind = rec.WhichOneof("record_type")
            if kind == "config":
                self.config.update(_items(rec.config.update))
            elif kind == "history":
                self.history.append(_items(rec.history.item))
            elif kind == "run":
                self.run = rec.run

    def media(self, key: str, type_: str) -> list[dict]:
        """History values of ``key`` (split into ``key/...`` fields) whose ``_type`` is ``type_``."""
        rows = []
        for h in self.history:
            fields = {k[len(key) + 1 :]: v for k, v in h.items() if k.startswith(key + "/")}
            if fields.get("_type") == type_:
                rows.append(fields)
        return rows


def runs_under(folder: Path) -> list[WandbRun]:
    return [WandbRun(p) for p in sorted(folder.rglob("wandb/offline-run-*/run-*.wandb"))]


def _env() -> dict:
    return {
        **os.environ,
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
        "CUDA_VISIBLE_DEVICES": "",
    }


def _run(cmd: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(BIN / cmd), *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def _git_head() -> str | None:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except OSError:
        return None


def _inputs(folder: Path, n: int = 2) -> None:
    import torch

    from bir.data.io import save_image

    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    for k in range(n):
        save_image(torch.rand(3, 16, 16, generator=g), folder / f"im{k}.png")


def test_reader_rejects_a_corrupted_record(tmp_path):
    """The checksum is verified: one flipped byte in a record is reported, not decoded."""
    from wandb.proto import wandb_internal_pb2 as pb

    rec = pb.Record()
    rec.history.item.add(key="x", value_json="1.5")
    body = rec.SerializeToString()
    good = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
    good += struct.pack("<IHB", zlib.crc32(bytes([FULL]) + body), len(body), FULL) + body
    path = tmp_path / "run-x.wandb"
    path.write_bytes(good)
    (back,) = read_records(path)
    assert _items(back.history.item) == {"x": 1.5}
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    path.write_bytes(bytes(bad))
    with pytest.raises(AssertionError, match="bad checksum"):
        read_records(path)


def test_training_run_has_resolved_config_git_commit_per_step_metrics_and_grids(tmp_path):
    args = [
        "experiment=quickstart",
        "logger=wandb",
        "run_name=wb",
        "tags=[readback]",
        "data.train.crop_size=32",
        "data.batch_size=2",
        *NO_VALIDATION,
        "trainer.max_steps=3",
        "trainer.log_every_n_steps=1",
        "model.log_images_every_n_steps=2",
    ]
    _run("bir-train", args, tmp_path)
    run_dir = tmp_path / "outputs" / "quickstart" / "wb"
    (run,) = runs_under(run_dir)
    # the resolved config: interpolations replaced by their values
    cfg = run.config
    assert cfg["trainer"]["max_steps"] == 3 and cfg["net"]["embed_dim"] == 24
    assert Path(cfg["paths"]["output_dir"]).resolve() == run_dir.resolve()
    assert "${" not in json.dumps(cfg)
    assert cfg["tags"] == ["readback"] and list(run.run.tags) == ["readback"]
    # the git state of the bir checkout
    assert cfg["git"]["commit"] == _git_head() and isinstance(cfg["git"]["dirty"], bool)
    # one train/loss per optimiser step, finite
    losses = {h["trainer/global_step"]: h["train/loss"] for h in run.history if "train/loss" in h}
    assert sorted(losses) == [0, 1, 2], losses
    assert all(isinstance(v, float) and v == v for v in losses.values())
    # image grids written as files of the run
    grids = [
        m
        for h in run.history
        for k, m in h.items()
        if k.endswith("/_type") and m in ("image-file", "images/separated")
    ]
    assert grids, "no image grid logged"
    from bir.data.io import read_image

    pngs = list((run.dir / "files" / "media" / "images").rglob("*.png"))
    assert pngs
    for p in pngs:  # LQ | output | GT panels of 32 px crops, side by side
        img = read_image(p)
        assert img.shape[0] == 3 and img.shape[-1] >= 3 * 32
        assert 0.05 < img.mean() < 0.95 and img.std() > 0.02  # photographs, not a blank image


def test_predict_sweep_runs_share_a_group_and_hold_grids_and_the_per_image_table(tmp_path):
    import torch

    from bir.data.io import read_image

    _inputs(tmp_path / "in")
    args = [
        "-m",
        "method=baseline",
        "method.kind=wiener",
        "method.balance=0.01,0.1",
        "logger=wandb",
        "input=in",
        "gt=in",
        "output=${hydra:runtime.output_dir}/images",
        "callbacks.progress_bar=null",
    ]
    proc = _run("bir-restore", args, tmp_path)
    # the summary table is shown once per job (not again when the CLI reads it back)
    assert (proc.stdout + proc.stderr).count("| metric | mean | std | count |") == 2
    (sweep,) = (tmp_path / "multirun" / "restore").iterdir()
    runs = runs_under(sweep)
    assert len(runs) == 2
    assert {r.run.run_group for r in runs} == {sweep.name}
    assert sorted(r.config["method"]["balance"] for r in runs) == [0.01, 0.1]
    for run in runs:
        job = run.dir.parent.parent
        assert run.config["git"]["commit"] == _git_head()
        assert Path(run.config["output"]).resolve() == (job / "images").resolve()
        # one LQ | output | GT grid per image, the files present
        grids = run.media("predict/images", "images/separated")
        assert len(grids) == 2 and {g["width"] for g in grids} == {3 * 16}
        for g in grids:
            (name,), (caption,) = g["filenames"], g["captions"]
            img = read_image(run.dir / "files" / name)
            assert img.shape == (3, g["height"], g["width"]) == (3, 16, 48)
            # LQ and GT panels are the input photo (gt=in) in 8 bits, not a blank image
            source = read_image(tmp_path / "in" / f"{caption.split(':')[0]}.png")
            assert torch.allclose(img[..., :16], source, atol=1 / 255)
            assert torch.allclose(img[..., 32:], source, atol=1 / 255)
        # the per-image table equals the metrics.csv the writer left next to the images
        (table,) = run.media("predict/metrics", "table-file")
        data = json.loads((run.dir / "files" / table["path"]).read_text())
        assert table["nrows"] == 2 == len(data["data"])
        rows = {r[data["columns"].index("name")]: r for r in data["data"]}
        import csv

        with (job / "images" / "metrics.csv").open() as f:
            for want in csv.DictReader(f):
                got = rows[want["name"]]
                psnr = got[data["columns"].index("psnr")]
                assert psnr == pytest.approx(float(want["psnr"]), rel=1e-6)


def test_restore_without_ground_truth_prints_no_metric_table(tmp_path):
    _inputs(tmp_path / "in")
    proc = _run(
        "bir-restore",
        ["method=baseline", "input=in", "output=out", "callbacks.progress_bar=null"],
        tmp_path,
    )
    text = proc.stdout + proc.stderr
    assert "| metric |" not in text
    assert "2 images; output in" in text
    assert "| metric |" not in (tmp_path / "out" / "summary.md").read_text()
