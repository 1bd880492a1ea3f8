"""Build the inputs of a benchmark from a local copy of its dataset.

    python scripts/prepare_benchmark.py bir/conf/benchmark/bir_d_imagenet.yaml \
        --data-root /data --out benchmarks/bir_d_imagenet [--tasks sr4 deblur] [--limit 10]

Writes, under ``--out``: ``gt/<name>.png`` (centre-cropped, resized ground truths),
``<task>/lq/<name>.png`` (degraded with a fixed per-image seed: ``operator:`` tasks observe
``y = A(x) + sigma n`` through the ``bir/conf/operator`` config they name, with their ``overrides``
(:func:`bir.operators.synthetic.observe`), ``degradation:`` tasks run a ``bir/conf/degradation``
pipeline, paired ``lq_dir:`` tasks are copied), ``<task>/truth/<name>.pt`` (kernels / masks
when the operator has them), ``files.txt`` and ``benchmark.json`` (the resolved config, with the
published figures).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from bir.cli import CONFIG_DIR
from bir.data.io import list_images, read_image, save_image
from bir.errors import UsageError
from bir.random import sample_generators


def centre_square(img: torch.Tensor, size: int | None) -> torch.Tensor:
    """Centre crop ``[3, H, W]`` to a square and resize (bicubic, antialiased) to ``size``."""
    if size is None:
        return img
    h, w = img.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    img = img[:, top : top + s, left : left + s]
    if s != size:
        img = F.interpolate(img[None], size=(size, size), mode="bicubic", antialias=True)[0]
    return img.clamp(0, 1)


def select_files(root: Path, list_file: str | None, num_images: int | None) -> list[Path]:
    """Files named by ``list_file`` (relative to ``root``) or the first ``num_images`` under root."""
    if list_file:
        files = [
            root / line.strip() for line in Path(list_file).read_text().splitlines() if line.strip()
        ]
    else:
        files = list_images(root)
    return files[:num_images] if num_images else files


def degrade_task(task: dict, gt: torch.Tensor, seed: int, index: int) -> tuple[torch.Tensor, dict]:
    """Degrade one ``[3, H, W]`` image for ``task``; returns ``lq`` and tensors to save."""
    gens = sample_generators(seed, [index], stream=0)
    if "operator" in task:
        from bir.bench_quality import known_operator
        from bir.operators.synthetic import observe

        op = known_operator(task["operator"], task.get("overrides"))
        lq, truth = observe(gt[None], op, float(task.get("sigma", 0.0)), gens)
        return lq[0], {k: v[0] for k, v in truth.items() if isinstance(v, torch.Tensor)}
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    # composed, not loaded: a degradation file may extend another through its defaults list
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        overrides = [f"degradation={task['degradation']}", "input=x", "output=y"]
        pipeline = instantiate(compose("degrade", overrides=overrides).degradation)
    result = pipeline(gt[None], gens)
    return result.lq[0], {}


def prepare(
    cfg: dict, data_root: Path, out: Path, tasks: list[str] | None, limit: int | None
) -> dict:
    """Write ground truths and degraded inputs for the chosen tasks; returns the manifest."""
    ds = cfg["dataset"]
    chosen = {k: t for k, t in cfg["tasks"].items() if not tasks or k in tasks}
    for task in chosen.values():  # a wrong operator name or field fails before anything is written
        if "operator" in task:
            from bir.bench_quality import known_operator

            known_operator(task["operator"], task.get("overrides"))
    names: list[str] = []
    if ds.get("gt_dir"):
        root = data_root / ds["gt_dir"]
        files = select_files(root, ds.get("list_file"), limit or ds.get("num_images"))
        for p in files:
            name = p.relative_to(root).with_suffix("").as_posix()
            names.append(name)
            if not (out / "gt" / f"{name}.png").exists():
                save_image(centre_square(read_image(p), ds.get("size")), out / "gt" / f"{name}.png")
    for task_name, task in chosen.items():
        lq_dir = out / task_name / "lq"
        if "lq_dir" in task:  # paired real data: copy (resized like the gt when a size is set)
            src = data_root / task["lq_dir"]
            for p in select_files(src, None, limit or ds.get("num_images")):
                name = p.relative_to(src).with_suffix("").as_posix()
                save_image(centre_square(read_image(p), ds.get("size")), lq_dir / f"{name}.png")
            continue
        for index, name in enumerate(names):
            gt = read_image(out / "gt" / f"{name}.png")
            lq, truth = degrade_task(task, gt, int(cfg.get("seed", 0)), index)
            save_image(lq, lq_dir / f"{name}.png")
            if truth:
                (out / task_name / "truth" / name).parent.mkdir(parents=True, exist_ok=True)
                torch.save(truth, out / task_name / "truth" / f"{name}.pt")
    (out / "files.txt").write_text("".join(f"{n}\n" for n in names))
    (out / "benchmark.json").write_text(json.dumps(cfg, indent=1))
    return cfg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", type=Path, help="a bir/conf/benchmark/*.yaml file")
    parser.add_argument("--data-root", type=Path, required=True, help="folder holding the datasets")
    parser.add_argument("--out", type=Path, required=True, help="where to write gt/ and <task>/lq/")
    parser.add_argument("--tasks", nargs="*", default=None, help="subset of the config's tasks")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images")
    parser.add_argument("--override", nargs="*", default=[], help="OmegaConf dotlist overrides")
    args = parser.parse_args(argv)
    cfg = OmegaConf.merge(OmegaConf.load(args.config), OmegaConf.from_dotlist(args.override))
    try:
        prepare(
            OmegaConf.to_container(cfg, resolve=True),
            args.data_root,
            args.out,
            args.tasks,
            args.limit,
        )
    except UsageError as err:
        print(f"prepare_benchmark: error: {args.config.name}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"prepared {args.config.stem} in {args.out}")


if __name__ == "__main__":
    main()
