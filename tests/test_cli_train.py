"""bir-train end to end through the real console script: DDP on CPU, resume after a kill."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BIN = Path(sys.executable).parent
HERE = Path(__file__).parent

# a tiny, fast version of the quickstart recipe
TINY = [
    "experiment=quickstart",
    "data.train.crop_size=32",
    "data.batch_size=2",
    "data.val=null",
    "trainer.val_check_interval=null",
    "trainer.check_val_every_n_epoch=null",
    "trainer.log_every_n_steps=1",
    "callbacks.model_checkpoint.monitor=null",
    "callbacks.model_checkpoint.filename='step{step:03d}'",
    "model.log_images_every_n_steps=0",
    "model.scheduler.total_steps=20",
]


def run_train(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    proc = subprocess.run([str(BIN / "bir-train"), *TINY, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    if proc.returncode not in (0, 17):
        print(proc.stdout[-4000:], proc.stderr[-4000:])
    return proc


def _step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]


@pytest.mark.ddp
def test_train_ddp_cpu_two_ranks_agree(tmp_path):
    proc = run_train(["trainer=ddp_cpu", "trainer.max_steps=3", "run_name=ddp",
                      "+callbacks.dump._target_=cli_helpers.WeightDump", f"+callbacks.dump.dir={tmp_path / 'w'}"],
                     tmp_path)  # fmt: skip
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


def test_train_killed_after_checkpoint_resumes_to_the_final_step(tmp_path):
    common = ["trainer.max_steps=8", "run_name=resume", "callbacks.model_checkpoint.every_n_train_steps=4",
              "callbacks.model_checkpoint.save_top_k=-1"]  # fmt: skip
    killed = run_train(
        [*common, "+callbacks.kill._target_=cli_helpers.KillAt", "+callbacks.kill.step=6"], tmp_path
    )
    assert killed.returncode == 17  # died mid-run, after the step-4 checkpoint
    ckpts = tmp_path / "outputs" / "quickstart" / "resume" / "checkpoints"
    assert _step(ckpts / "last.ckpt") == 4
    resumed = run_train([*common, "ckpt_path=last"], tmp_path)
    assert resumed.returncode == 0
    assert "Restoring states from the checkpoint" in resumed.stdout + resumed.stderr
    assert _step(ckpts / "last.ckpt") == 8
    # the csv log continues at step 4 (no steps redone from zero)
    assert (ckpts / "step008.ckpt").exists() and (ckpts / "step004.ckpt").exists()


def test_train_bad_config_key_is_a_clear_error(tmp_path):
    proc = run_train(["model.not_an_argument=1", "trainer.max_steps=1"], tmp_path)
    assert proc.returncode != 0
    assert "not_an_argument" in proc.stderr
