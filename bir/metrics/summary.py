"""Summaries of per-image metric values, and the one policy for values that are not finite.

**Policy.** The PSNR of an image identical to its reference is ``+inf`` (its MSE is 0); no other
metric is infinite on valid images. Every summary bir writes or returns - ``bir-eval``'s
``.summary.md``/``.summary.json``, the prediction writer's ``summary.md``, the value
``bir-restore``/``bir-train`` hand to sweepers, ``bir-report`` and the training modules' logged
validation metrics - follows this one rule:

- ``mean`` and ``std`` (population) are taken over the **finite** values only, ``count`` is the
  number of finite values, and ``nonfinite`` the number left out, shown next to the count
  (``3 (+1 non-finite)`` in tables, ``<metric>_nonfinite`` in logs, sweep reports and the
  dictionary ``bir-restore`` returns). With no finite value the mean is NaN (``null`` in JSON).
- Per-image outputs keep the value itself: ``inf`` in CSV files, the string ``"inf"`` in JSON
  records (strict JSON has no infinity); :func:`parse_value` reads both back.

A missing value (a metric that could not be computed for an image, an empty CSV cell) is neither
counted nor left out: it is not a value. See ``docs/metrics.md``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

#: the marker after the count of a metric whose non-finite values were left out
NONFINITE_SUFFIX = "_nonfinite"


def split_finite(values: Tensor) -> tuple[Tensor, int]:
    """``(finite values, number of non-finite values)`` of a 1-D tensor of per-image values."""
    v = values.reshape(-1)
    finite = torch.isfinite(v)
    return v[finite], int((~finite).sum())


def stats_from_sums(total: float, total_sq: float, count: float, nonfinite: float) -> dict:
    """Mean and population std from the running sums over the finite values."""
    n = float(count)
    mean = float(total) / n if n else math.nan
    var = max(float(total_sq) / n - mean**2, 0.0) if n else math.nan
    return {"mean": mean, "std": math.sqrt(var), "count": int(n), "nonfinite": int(nonfinite)}


def parse_value(v) -> float | None:
    """A per-image value as written to a CSV cell or JSON record -> float (``inf`` kept), or
    None when it is missing (empty cell, ``null``, text that is not a number)."""
    if v is None or isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def record_value(v: float) -> float | str:
    """A per-image value for a strict-JSON record: finite floats as they are, others as the
    strings ``"inf"``, ``"-inf"``, ``"nan"`` (read back by :func:`parse_value`)."""
    v = float(v)
    return v if math.isfinite(v) else str(v)


def jsonable(v):
    """Tensors, arrays and numbers -> strict-JSON values; every non-finite float -> None (per-image
    metric values go through :func:`record_value` first, so theirs stay readable)."""
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        v = v.item() if v.numel() == 1 else v.tolist()
    elif isinstance(v, np.ndarray | np.generic):
        v = v.tolist()
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def strict_json(data) -> bytes:
    """``data`` as strict JSON (``allow_nan=False``: never a bare NaN or Infinity), UTF-8."""
    return json.dumps(jsonable(data), indent=1, allow_nan=False).encode()


def summarize(values: Iterable) -> dict:
    """``{"mean", "std", "count", "nonfinite"}`` of per-image values under the policy above;
    missing values (:func:`parse_value` gives None) are skipped."""
    parsed = [x for x in (parse_value(v) for v in values) if x is not None]
    finite = [x for x in parsed if math.isfinite(x)]
    total, total_sq = math.fsum(finite), math.fsum(x * x for x in finite)
    return stats_from_sums(total, total_sq, len(finite), len(parsed) - len(finite))


def summarize_columns(rows: Sequence[Mapping], skip: Iterable[str] = ("name",)) -> dict:
    """:func:`summarize` of every column of ``rows`` (dicts, as read from a CSV file or from
    records) that holds at least one value, in sorted column order."""
    skip = set(skip)
    cols = sorted({k for r in rows for k in r} - skip)
    out = {}
    for c in cols:
        s = summarize(r.get(c) for r in rows)
        if s["count"] or s["nonfinite"]:
            out[c] = s
    return out


def flat_means(stats: Mapping[str, Mapping]) -> dict[str, float]:
    """``{metric: mean, metric_nonfinite: n}`` (the count only where some value was left out):
    the flat form of a summary that sweepers and ``bir-report`` read."""
    out: dict[str, float] = {}
    for name, s in stats.items():
        out[name] = s["mean"]
        if s["nonfinite"]:
            out[name + NONFINITE_SUFFIX] = float(s["nonfinite"])
    return out


def _fmt(v) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def summary_table(stats: Mapping[str, Mapping], single: Mapping[str, float] | None = None) -> str:
    """The Markdown table of a summary: ``| metric | mean | std | count |`` with the number of
    left-out non-finite values after the count, then one row per single value (FID, KID) and,
    when something was left out, a line saying why."""
    lines = ["| metric | mean | std | count |", "|---|---|---|---|"]
    for name, s in stats.items():
        extra = f" (+{s['nonfinite']} non-finite)" if s["nonfinite"] else ""
        lines.append(f"| {name} | {_fmt(s['mean'])} | {_fmt(s['std'])} | {s['count']}{extra} |")
    for name, v in (single or {}).items():
        lines.append(f"| {name} | {_fmt(v)} | | |")
    if any(s["nonfinite"] for s in stats.values()):
        lines.append(
            "\nmean and std are over finite values; non-finite values (PSNR of an output "
            "identical to its ground truth is inf) are left out and counted after the count"
        )
    return "\n".join(lines) + "\n"
