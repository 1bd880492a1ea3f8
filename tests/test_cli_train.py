"""bir-train end to end through the real console script: DDP on CPU, resume after a kill."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import NO_VALIDATION

BIN = Path(sys.executable).parent
HERE = Path(__file__).parent

# a tiny, fast version of the quickstart recipe
TINY = [
    "experiment=quickstart",
    "data.train.crop_size=32",
    "data.batch_size=2",
    "trainer.log_every_n_steps=1",
    "callbacks.model_checkpoint.monitor=null",
    "callbacks.model_checkpoint.filename='step{step:03d}'",
    "model.log_images_every_n_steps=0",
    "model.scheduler.total_steps=20",
]


def run_train(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [str(BIN / "bir-train"), *TINY, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode not in (0, 17):
        print(proc.stdout[-4000:], proc.stderr[-4000:])
    return proc


def _step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]


@pytest.mark.ddp
def test_train_ddp_cpu_two_ranks_agree(tmp_path):
    proc = run_train(
        [
            *NO_VALIDATION,
            "trainer=ddp_cpu",
            "trainer.max_steps=3",
            "run_name=ddp",
            "+callbacks.dump._target_=cli_helpers.WeightDump",
            f"+callbacks.dump.dir={tmp_path / 'w'}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0
    r0 = torch.load(tmp_path / "w" / "rank0.pt")
    r1 = torch.load(tmp_path / "w" / "rank1.pt")
    assert r0["step"] == r1["step"] == 3
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    run = tmp_path / "outputs" / "quickstart" / "ddp"
    assert _step(run / "checkpoints" / "last.ckpt") == 3
    assert (run / ".hydra" / "config.yaml").exists()


def _final_val(run: Path) -> dict[str, float]:
    """The last logged validation metrics of a run (its CSV log)."""
    with open(run / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/psnr")]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("val/") and v}


@pytest.mark.slow  # three training runs; tests/data/test_resumable_order.py checks the order fast
def test_train_killed_and_resumed_ends_where_an_uninterrupted_run_ends(tmp_path):
    # 13 sample photos, batch 4: 3 batches per epoch. Checkpoints every 2 steps; the killed run
    # dies after step 3, so the resumed run restarts mid-epoch 0 and crosses into epochs 1 and 2.
    common = [
        "data.batch_size=4",
        "data.train.repeat=1",
        "data.val.crop_size=32",
        "trainer.max_steps=6",
        "trainer.val_check_interval=6",
        "trainer.check_val_every_n_epoch=null",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.model_checkpoint.save_top_k=-1",
        "+callbacks.dump._target_=cli_helpers.WeightDump",
    ]
    full_args = [*common, "run_name=full", f"+callbacks.dump.dir={tmp_path / 'w_full'}"]
    full = run_train(full_args, tmp_path)
    assert full.returncode == 0
    resume = [*common, "run_name=resume", f"+callbacks.dump.dir={tmp_path / 'w_resumed'}"]
    killed = run_train(
        [*resume, "+callbacks.kill._target_=cli_helpers.KillAt", "+callbacks.kill.step=3"], tmp_path
    )
    assert killed.returncode == 17  # died mid-run, after the step-2 checkpoint
    runs = tmp_path / "outputs" / "quickstart"
    ckpts = runs / "resume" / "checkpoints"
    assert _step(ckpts / "last.ckpt") == 2
    resumed = run_train([*resume, "ckpt_path=last"], tmp_path)
    assert resumed.returncode == 0
    assert "Restoring states from the checkpoint" in resumed.stdout + resumed.stderr
    assert _step(ckpts / "last.ckpt") == 6
    assert all((ckpts / f"step00{k}.ckpt").exists() for k in (2, 4, 6))
    # the same batches, crops, flips and degradations: the same weights and final metrics
    a = torch.load(tmp_path / "w_full" / "rank0.pt")
    b = torch.load(tmp_path / "w_resumed" / "rank0.pt")
    assert a["step"] == b["step"] == 6 and a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        torch.testing.assert_close(b["state"][k], a["state"][k], rtol=0, atol=1e-6, msg=k)
    val_full, val_resumed = _final_val(runs / "full"), _final_val(runs / "resume")
    assert "val/psnr" in val_full and val_full.keys() == val_resumed.keys()
    for k, v in val_full.items():
        assert abs(val_resumed[k] - v) < 1e-5, (k, v, val_resumed[k])


def test_train_bad_config_key_is_a_clear_error(tmp_path):
    proc = run_train([*NO_VALIDATION, "model.not_an_argument=1", "trainer.max_steps=1"], tmp_path)
    assert proc.returncode != 0
    assert "not_an_argument" in proc.stderr
