"""``bir-report``: one table (CSV and Markdown) and a plot for a Hydra multirun folder.

    bir-report multirun/restore/2026-11-23_10-00-00 [--metrics psnr lpips] [--out DIR]

Every job folder of the sweep holds ``.hydra/overrides.yaml`` (what was swept) and
``.hydra/config.yaml``. Metrics come from the job's predict summary (``<output>/metrics.csv``,
averaged over images as ``summary.md`` and the sweeper's value are: non-finite values, such as the
infinite PSNR of an exact restoration, are left out and counted in ``<metric>_nonfinite``,
:mod:`bir.metrics.summary`) or from its training logs (``csv/metrics.csv``, last logged value of
each column), whichever exists. A ``*_nonfinite`` column that is 0 in every job is left out. Jobs are named by their swept values (``guidance_scale=1000
adaptive_scale=true``). The plot shows each metric that varies against the first numeric swept key,
one line per setting of the other swept keys (e.g. PSNR against guidance scale, adaptive vs fixed),
on a log axis when that key spans decades.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from collections import defaultdict
from pathlib import Path

import yaml

from bir.data.io import atomic_write_bytes
from bir.metrics import NONFINITE_SUFFIX, flat_means, parse_value, summarize_columns


def _read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _num(v):
    """A finite number, or None (:func:`bir.metrics.parse_value`)."""
    x = parse_value(v)
    return x if x is not None and math.isfinite(x) else None


def job_metrics(job: Path, config: dict) -> dict[str, float]:
    """Mean of each numeric column over images (predict, :func:`bir.metrics.summarize_columns`)
    or last logged values (training)."""
    out: dict[str, float] = {}
    output = config.get("output")
    candidates = [Path(output) / "metrics.csv"] if isinstance(output, str) else []
    candidates += [job / "images" / "metrics.csv"]
    for path in candidates:
        if path.is_file():
            rows = _read_csv(path)
            out.update(flat_means(summarize_columns(rows)))
            out["images"] = float(len(rows))
            return out
    train_csv = job / "csv" / "metrics.csv"
    if train_csv.is_file():
        for r in _read_csv(train_csv):
            for k, v in r.items():
                if _num(v) is not None and k not in ("epoch",):
                    out[k] = _num(v)
    return out


def _count_columns(rows: list[dict]) -> None:
    """``<metric>_nonfinite`` columns: 0 where a job left nothing out; gone when 0 in every job."""
    keys = {k for r in rows for k in r if k.endswith(NONFINITE_SUFFIX)}
    for k in keys:
        if any(r.get(k) for r in rows):
            for r in rows:
                r.setdefault(k, 0.0)
        else:
            for r in rows:
                r.pop(k, None)


def _job_number(job: Path) -> tuple:
    """Sort key: Hydra's job number (folder ``<num>`` or ``<num>_...``), then the path."""
    head = job.name.split("_", 1)[0]
    return (int(head) if head.isdigit() else math.inf, str(job))


def collect(sweep_dir: Path) -> list[dict]:
    """One row per job, in job-number order: its overrides (as columns) and its metrics."""
    rows = []
    jobs = [ov.parent.parent for ov in sweep_dir.rglob(".hydra/overrides.yaml")]
    for job in sorted(jobs, key=_job_number):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
        cfg_path = job / ".hydra" / "config.yaml"
        config = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else {}
        row: dict = {"job": str(job.relative_to(sweep_dir))}
        for o in overrides:
            key, _, value = o.partition("=")
            if key.lstrip("+~") in ("input", "output", "gt", "ckpt", "sweep"):
                continue
            row[key.lstrip("+~")] = value
        row.update(job_metrics(job, config or {}))
        rows.append(row)
    return rows


def swept_keys(rows: list[dict], metric_keys: set[str]) -> list[str]:
    """Override keys whose value differs between jobs (in command-line order)."""
    keys = [k for k in rows[0] if k != "job" and k not in metric_keys] if rows else []
    return [k for k in keys if len({str(r.get(k)) for r in rows}) > 1]


def constant_columns(rows: list[dict], keys) -> list[str]:
    """Keys with one value in every job (``images`` when every job restored the same set)."""
    return [k for k in keys if len({str(r.get(k)) for r in rows}) == 1]


def short_names(keys: list[str]) -> dict[str, str]:
    """Shortest dotted suffix of each key that is unique among ``keys``
    (``method.guidance_scale`` -> ``guidance_scale``)."""
    names = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            cand = ".".join(parts[-n:])
            if all(o == k or not (o == cand or o.endswith("." + cand)) for o in keys):
                break
        names[k] = cand
    return names


def job_label(row: dict, swept: list[str], names: dict[str, str]) -> str:
    """The swept values of a job, ``guidance_scale=1000 adaptive_scale=false``."""
    return " ".join(f"{names[k]}={row.get(k)}" for k in swept) or row["folder"]


def log_scale(values: list[float]) -> bool:
    """A log axis when the values are positive and span at least 1.5 decades (x30),
    e.g. guidance scales 1e3 ... 8e4; evenly spaced values keep a linear axis."""
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 30


def to_markdown(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(
    rows: list[dict], x_key: str, group_keys: list[str], metrics: list[str], path: Path
) -> dict[str, str]:
    """One panel per metric against ``x_key``; returns each panel's x scale (linear / log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
    groups = defaultdict(list)
    for r in rows:
        groups[tuple(f"{k.rsplit('.', 1)[-1]}={r.get(k)}" for k in group_keys)].append(r)
    for ax, m in zip(axes[0], metrics):
        for g, rs in sorted(groups.items()):
            pts = sorted(
                (_num(r.get(x_key)), r.get(m))
                for r in rs
                if _num(r.get(x_key)) is not None and r.get(m) is not None
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=" ".join(g) or None)
        ax.set_xlabel(x_key)
        ax.set_ylabel(m)
        if log_scale([_num(r.get(x_key)) for r in rows]):
            ax.set_xscale("log")
        if len(groups) > 1:
            ax.legend(fontsize=7)
    scales = {m: ax.get_xscale() for ax, m in zip(axes[0], metrics)}
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return scales


def report(
    sweep_dir: str | Path, metrics: list[str] | None = None, out: str | Path | None = None
) -> dict:
    """Write ``report.csv``, ``report.md`` and ``report.png`` for a multirun folder.

    Jobs are named by their swept values. The CSV keeps every column (and the job folder); the
    Markdown table and the plot leave out columns with one value in every job, which are listed
    once above the table instead. The plot has one panel per numeric metric that varies.
    """
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"no Hydra job folders (.hydra/overrides.yaml) under {sweep_dir}")
    out = Path(out) if out else sweep_dir
    _count_columns(rows)
    metric_keys = {k for r in rows for k in r if isinstance(r[k], float)}
    override_keys = [k for k in rows[0] if k not in metric_keys and k != "job"]
    override_keys += [
        k for r in rows for k in r if k not in metric_keys and k != "job" and k not in override_keys
    ]
    swept = swept_keys(rows, metric_keys)
    names = short_names(swept)
    for r in rows:
        r["folder"] = r.pop("job")
        r["job"] = job_label(r, swept, names)
    fixed = constant_columns(rows, [*override_keys, *sorted(metric_keys)])
    varying_metrics = [m for m in sorted(metric_keys) if m not in fixed]
    plotted = [m for m in varying_metrics if not m.endswith(NONFINITE_SUFFIX)]
    chosen = [m for m in (metrics or plotted) if m in metric_keys]

    csv_columns = ["job", *override_keys, *sorted(metric_keys), "folder"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=csv_columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(out / "report.csv", buf.getvalue().encode())

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    md = ""
    if fixed and len(rows) > 1:
        md = "Same in every job: " + ", ".join(f"{k}={fmt(rows[0].get(k))}" for k in fixed)
        md += "\n\n"
    md_metrics = varying_metrics if len(rows) > 1 else sorted(metric_keys)
    md += to_markdown(rows, ["job", *md_metrics])
    atomic_write_bytes(out / "report.md", md.encode())
    numeric_swept = [k for k in swept if all(_num(r.get(k)) is not None for r in rows)]
    x_axis = None
    if numeric_swept and chosen:
        x = numeric_swept[0]
        scales = plot(rows, x, [k for k in swept if k != x], chosen, out / "report.png")
        x_axis = {"key": x, "scales": scales}
    print(md)
    return {"rows": rows, "swept": swept, "metrics": chosen, "fixed": fixed, "x_axis": x_axis}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bir-report", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", help="a Hydra multirun folder")
    p.add_argument("--metrics", nargs="*", default=None, help="metrics to plot (default: all)")
    p.add_argument("--out", default=None, help="where to write report.* (default: sweep_dir)")
    a = p.parse_args(argv)
    report(a.sweep_dir, a.metrics, a.out)


if __name__ == "__main__":
    main()
