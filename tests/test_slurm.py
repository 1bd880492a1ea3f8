"""bir on a real SLURM cluster: one node on this machine (``make slurm-up``), jobs submitted by
hydra-submitit-launcher exactly as the README shows them.

The README's ``slurm``-marked block is run here, with the size overrides of ``test_readme.py``
appended: 2 DDP tasks of ``bir-train`` agree and leave their checkpoint and W&B offline run in the
job folder; a 4-job guidance sweep of ``bir-restore`` on the sample prior finishes and
``bir-report`` tabulates it; a training job cancelled with ``scancel`` after its first checkpoint
and submitted again resumes from that checkpoint. The module starts the cluster when it is not
running (and stops it afterwards); it is skipped, with the reason in the test summary, only where
``slurm-wlm``/``munge`` cannot be installed. About 2-3 minutes on 2 idle cores: marked slow, run by
``make test-all`` and by ``.ci/run`` after the default suite.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCRIPT = ROOT / "scripts" / "slurm_local.sh"


def _load_readme_module():
    spec = importlib.util.spec_from_file_location("readme_contract", HERE / "test_readme.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


readme = _load_readme_module()


def slurm_commands() -> dict[str, readme.Command]:
    """The README's slurm-marked commands by their first two words (and sweep kind)."""
    cmds = [c for c in readme.all_commands() if c.kind == "slurm"]
    out = {}
    for c in cmds:
        words = c.text.split()
        key = " ".join(words[:2]) if words[0] == "make" else words[0]
        assert key not in out, f"two README slurm commands start with {key!r}"
        out[key] = c
    assert set(out) == {
        "make slurm-up",
        "bir-train",
        "bir-restore",
        "bir-report",
        "make slurm-down",
    }
    return out


def _cluster_up() -> bool:
    return subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def cluster():
    """The local cluster, started with the README's ``make slurm-up`` when it is not running."""
    cmds = slurm_commands()
    started = False
    if not _cluster_up():
        if shutil.which("make") is None:
            pytest.skip("SLURM tests skipped: `make` is not installed")
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmds["make slurm-up"].text,
            shell=True,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if proc.returncode == 3:  # scripts/slurm_local.sh: packages cannot be installed here
            pytest.skip(
                "SLURM tests skipped: slurm-wlm/munge cannot be installed here: "
                + proc.stderr.strip().splitlines()[-1]
            )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        print(f"local SLURM cluster started in {time.perf_counter() - t0:.1f} s")
        started = True
    yield cmds
    if started:
        proc = subprocess.run(
            cmds["make slurm-down"].text,
            shell=True,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert not _cluster_up()


#: the sacct stand-in of scripts/slurm_local.sh (no slurmdbd here): submitit learns from it that
#: a job ended without a result (cancelled), instead of waiting for one
SACCT_SHIM_DIR = "/var/lib/bir-slurm/bin"


def _env() -> dict:
    env = readme._env()
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    env["PATH"] = os.pathsep.join([SACCT_SHIM_DIR, env["PATH"]])
    return env


def run_readme(cmd, cwd: Path, extra: list[str] = (), timeout: int = 600, wait: bool = True):
    """A README command as written + its size overrides + ``extra`` (test instrumentation)."""
    text = readme.fill_placeholders(cmd.text, cwd)
    line = " ".join([text, *cmd.size_overrides(), *extra])
    if not wait:
        return subprocess.Popen(
            ["bash", "-c", line],
            cwd=cwd,
            env=_env(),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["bash", "-c", line], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    print(f"[{time.perf_counter() - t0:5.1f} s] {line}")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc


def _sweep_dir(root: Path) -> Path:
    (sweep,) = [p for p in root.iterdir() if p.is_dir()]
    return sweep


def _slurm_jobs(sweep: Path) -> list[Path]:
    """submitit's folder of each SLURM job of a sweep (named by job id), oldest first."""
    dirs = [p for p in (sweep / ".submitit").iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(dirs, key=lambda p: int(p.name))


def _job_logs(sweep: Path) -> str:
    return "\n".join(
        p.read_text(errors="replace") for p in sorted(sweep.glob(".submitit/*/*_log.*"))
    )


def _step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]


def test_ddp_training_job_two_ranks_agree_and_leave_checkpoint_and_wandb_run(cluster, tmp_path):
    dump = tmp_path / "ranks"
    run_readme(
        cluster["bir-train"],
        tmp_path,
        [
            "+callbacks.dump._target_=cli_helpers.WeightDump",
            f"+callbacks.dump.dir={dump}",
            "+callbacks.start._target_=slurm_helpers.RecordStart",
            f"+callbacks.start.dir={dump}",
        ],
    )
    sweep = _sweep_dir(tmp_path / "multirun" / "quickstart")
    (jobdir,) = _slurm_jobs(sweep)
    script = next(jobdir.glob("*_submission.sh")).read_text()
    assert "--ntasks-per-node=2" in script and "--gpus-per-node=0" in script
    assert "srun" in script
    # two SLURM tasks, ranks 0 and 1 of one job, trained the same weights
    starts = [json.loads(p.read_text()) for p in sorted(dump.glob("start-*.json"))]
    assert sorted(s["env"]["SLURM_PROCID"] for s in starts) == ["0", "1"]
    assert {s["env"]["SLURM_JOB_ID"] for s in starts} == {jobdir.name}
    assert {s["world_size"] for s in starts} == {2}
    r0, r1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    assert r0["step"] == r1["step"] == 3
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    job = sweep / "0"
    assert _step(job / "checkpoints" / "last.ckpt") == 3
    assert (job / ".hydra" / "config.yaml").is_file()
    (run,) = list(job.glob("wandb/offline-run-*/run-*.wandb"))
    assert run.stat().st_size > 1000


@pytest.fixture(scope="module")
def sample_prior(tmp_path_factory):
    """A sample prior from the README's own training command (2 steps, size overrides)."""
    root = tmp_path_factory.mktemp("prior")
    (cmd,) = [
        c for c in readme.all_commands() if c.text.startswith("bir-train experiment=prior_samples")
    ]
    run_readme(cmd, root)
    ckpt = root / "outputs" / "prior_samples" / "prior_samples" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return root


def test_guidance_sweep_of_four_jobs_and_report(cluster, sample_prior, tmp_path):
    shutil.copytree(sample_prior / "outputs", tmp_path / "outputs")
    readme.write_images(tmp_path / "lq", size=64)
    readme.write_images(tmp_path / "gt", size=64)
    run_readme(cluster["bir-restore"], tmp_path)
    sweep = _sweep_dir(tmp_path / "multirun" / "restore")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    # one sbatch array of 4 tasks, each a job of its own on the cluster
    (script,) = list(sweep.glob(".submitit/*/*_submission.sh"))
    assert "--array=0-3%4" in script.read_text()  # 4 tasks, at most 4 at once
    tasks = sorted(p.name for p in (sweep / ".submitit").iterdir() if "_" in p.name and p.is_dir())
    assert tasks == [f"{script.parent.name}_{k}" for k in range(4)]
    assert all(list((sweep / ".submitit" / t).glob("*_result.pkl")) for t in tasks)
    for job in jobs:
        assert sorted(p.name for p in (job / "images").glob("*.png")) == ["im0.png", "im1.png"]
    proc = run_readme(cluster["bir-report"], tmp_path)
    lines = (sweep / "report.csv").read_text().strip().splitlines()
    assert len(lines) == 5 and "psnr" in lines[0]
    for name in (
        "guidance_scale=1000 adaptive_scale=false",
        "guidance_scale=80000 adaptive_scale=true",
    ):
        assert name in proc.stdout.lower()  # Hydra writes the swept booleans as False/True
    assert (sweep / "report.png").stat().st_size > 1000


def test_cancelled_job_resumes_from_its_checkpoint_when_resubmitted(cluster, tmp_path):
    start = tmp_path / "starts"
    extra = [
        "trainer.max_steps=12",
        "callbacks.model_checkpoint.every_n_train_steps=3",
        "callbacks.model_checkpoint.save_top_k=-1",
        "hydra.sweep.dir=multirun/resume",
        "+callbacks.pace._target_=slurm_helpers.Pace",
        "+callbacks.pace.seconds=1.0",
        "+callbacks.start._target_=slurm_helpers.RecordStart",
        f"+callbacks.start.dir={start}",
    ]
    sweep = tmp_path / "multirun" / "resume"
    last = sweep / "0" / "checkpoints" / "last.ckpt"
    first = run_readme(cluster["bir-train"], tmp_path, extra, wait=False)
    try:
        deadline = time.time() + 300
        while not last.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.5)
        assert last.exists(), "no checkpoint before the deadline"
        time.sleep(0.5)  # let rank 0 finish writing it
        (jobdir,) = _slurm_jobs(sweep)
        subprocess.run(["scancel", jobdir.name], check=True)
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode != 0  # the launcher reports the cancelled job
    cancelled_at = _step(last)
    assert 3 <= cancelled_at < 12
    # the same command with ckpt_path=last: a new job that starts from last.ckpt, not step 0
    run_readme(cluster["bir-train"], tmp_path, [*extra, "ckpt_path=last"])
    jobdirs = _slurm_jobs(sweep)
    assert len(jobdirs) == 2
    starts = {}
    for p in start.glob("start-*-rank0.json"):
        rec = json.loads(p.read_text())
        starts[rec["env"]["SLURM_JOB_ID"]] = rec["global_step"]
    assert starts[jobdirs[0].name] == 0
    assert starts[jobdirs[1].name] == cancelled_at
    assert "Restoring states from the checkpoint" in _job_logs(sweep)
    assert _step(last) == 12
