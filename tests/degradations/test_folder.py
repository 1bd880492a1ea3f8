"""degrade_folder: outputs, params.jsonl, resumption, unreadable files; the bir-degrade main."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from bir.data.io import DuplicateNameError, FolderError, read_image, save_image
from bir.degradations import SecondOrderDegradation
from bir.degradations.folder import PARAMS_FILE, degrade_folder

REPO = Path(__file__).resolve().parents[2]


def _make_folder(root: Path) -> None:
    g = torch.Generator().manual_seed(0)
    save_image(torch.rand(3, 32, 32, generator=g), root / "a.png")
    save_image(torch.rand(3, 24, 40, generator=g), root / "sub" / "b.png")
    save_image(torch.rand(3, 32, 32, generator=g), root / "sub" / "c.jpg")
    (root / "broken.png").write_bytes(b"not an image")


def _pipeline() -> SecondOrderDegradation:
    return SecondOrderDegradation(kernel_sizes=[7, 9], kernel_pad_to=9)


def test_writes_images_and_params_and_resumes(tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    _make_folder(src)
    counts = degrade_folder(src, dst, _pipeline(), seed=0)
    assert counts == {"total": 4, "written": 3, "skipped_existing": 0, "unreadable": 1}
    for rel in ("a.png", "sub/b.png", "sub/c.png"):
        lq, gt = read_image(dst / rel), read_image(src / rel.replace("c.png", "c.jpg"))
        assert lq.shape == gt.shape
    records = [json.loads(line) for line in (dst / PARAMS_FILE).read_text().splitlines()]
    assert [r["name"] for r in records] == ["a", "sub/b", "sub/c"]
    assert all("stage1" in r and "final_sinc" in r for r in records)

    # resume: nothing new; after deleting one output only that one is rewritten, identically
    first = read_image(dst / "sub" / "b.png")
    assert degrade_folder(src, dst, _pipeline(), seed=0)["skipped_existing"] == 3
    (dst / "sub" / "b.png").unlink()
    counts = degrade_folder(src, dst, _pipeline(), seed=0)
    assert counts["written"] == 1 and counts["skipped_existing"] == 2
    assert torch.equal(read_image(dst / "sub" / "b.png"), first)
    lines = (dst / PARAMS_FILE).read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[-1]) == records[1]


def test_hydra_main_end_to_end(tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    _make_folder(src)
    cmd = [
        sys.executable,
        "-m",
        "bir.degradations.folder",
        f"input={src}",
        f"output={dst}",
        "degradation=single_stage",
        "degradation.blur_kernel_size=9",
        "seed=3",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*.png")) == [
        "a.png",
        "sub/b.png",
        "sub/c.png",
    ]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["written"] == 3


class _Counting:
    """A pipeline that records how often it ran (to prove a refusal comes before any work)."""

    def __init__(self):
        self.calls = 0
        self.inner = _pipeline()

    def __call__(self, gt, generators):
        self.calls += 1
        return self.inner(gt, generators)


def test_overlapping_folders_are_refused_before_any_work(tmp_path):
    src = tmp_path / "in"
    _make_folder(src)
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    for out in (src, src / "lq", tmp_path):
        pipe = _Counting()
        with pytest.raises(FolderError, match="input="):
            degrade_folder(src, out, pipe, seed=0)
        assert pipe.calls == 0
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before
    assert not (src / "lq").exists()


def test_two_inputs_of_one_name_are_refused_with_the_list(tmp_path):
    src = tmp_path / "in"
    _make_folder(src)
    save_image(torch.rand(3, 16, 16), src / "a.jpg")  # a.png exists: both would be a.png
    pipe = _Counting()
    with pytest.raises(DuplicateNameError, match=r"a \(a.jpg, a.png\)"):
        degrade_folder(src, tmp_path / "out", pipe, seed=0)
    assert pipe.calls == 0 and not (tmp_path / "out").exists()


def test_unwritable_output_is_refused_before_any_work(tmp_path):
    src = tmp_path / "in"
    _make_folder(src)
    (tmp_path / "out").write_text("a file")
    pipe = _Counting()
    with pytest.raises(FolderError, match="is a file"):
        degrade_folder(src, tmp_path / "out", pipe, seed=0)
    with pytest.raises(FolderError, match="does not exist"):
        degrade_folder(tmp_path / "nope", tmp_path / "o2", pipe, seed=0)
    assert pipe.calls == 0


def test_resume_redoes_empty_outputs_ignores_hidden_files_and_clears_temp_files(tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    _make_folder(src)
    save_image(torch.rand(3, 16, 16), src / ".hidden.png")
    save_image(torch.rand(3, 16, 16), src / "v1.2.png")  # a dot in the name is kept
    assert degrade_folder(src, dst, _pipeline(), seed=0)["written"] == 4
    assert (dst / "v1.2.png").exists() and not (dst / ".hidden.png").exists()
    first = read_image(dst / "a.png")
    (dst / "a.png").write_bytes(b"")  # an empty output is not done
    fd, stale = tempfile.mkstemp(prefix=".a.png.", suffix=".tmp", dir=dst / "sub")
    os.close(fd)
    counts = degrade_folder(src, dst, _pipeline(), seed=0)
    assert counts["written"] == 1 and counts["skipped_existing"] == 3
    assert torch.equal(read_image(dst / "a.png"), first)
    assert not os.path.exists(stale)
