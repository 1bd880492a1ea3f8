"""scripts/gpu_check.py: the CPU smoke path end to end, the OOM bisection, the no-CUDA exit."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


@pytest.mark.parametrize(("threshold", "cap"), [(1, 64), (8, 64), (13, 64), (40, 24), (0, 8)])
def test_largest_batch_bisects_to_the_threshold(gpu_check, threshold, cap):
    calls = []

    def fits(b: int) -> bool:
        calls.append(b)
        return b <= threshold

    assert gpu_check.largest_batch(fits, cap) == min(threshold, cap)
    assert len(calls) <= 2 * max(cap, 2).bit_length() + 1  # doubling + bisection, not a scan
    assert max(calls) <= cap


def test_without_cuda_one_clear_line_and_nonzero_exit(gpu_check, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0] and "--smoke" in err[0]


def test_smoke_runs_every_section_and_prints_one_table(gpu_check, capsys):
    threads = torch.get_num_threads()
    try:
        assert gpu_check.main(["--smoke"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0].startswith("| measurement | setting | metric | value")
    body = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    names = " ".join(row[0] for row in body)
    for section in (
        "stage-2 train",
        "stage-1 SwinIR",
        "DiffBIR",
        "BIRD",
        "BIR-D",
        "GDP",
        "second-order degradation",
    ):
        assert section in names, section
    assert not any("failed" in row[-1] or "skipped" in row[-1] for row in body)
    for row in body:
        assert float(row[3]) > 0  # every row measured a positive value
        if row[4]:  # a baseline: the ratio is value / baseline
            baseline = float(row[4].rsplit(":", 1)[1])
            assert re.fullmatch(r"\d+\.\d\dx", row[5])
            assert float(row[5][:-1]) == pytest.approx(float(row[3]) / baseline, abs=0.01, rel=0.01)
    # bf16 changes outputs: the difference to fp32 is reported, finite and small on [0, 1] images
    diffs = [float(row[7]) for row in body if row[7]]
    assert diffs and all(0 <= d < 1 for d in diffs)
