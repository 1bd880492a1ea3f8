"""Every file of the config tree composes into the command that uses it, resolves completely, and
builds what is small enough to build here (tiny networks, operators, degradations, priors,
training modules, CPU trainers, callbacks, loggers). A file that no rule below covers fails."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from tests.conftest import CONF, EXPERIMENT_CHOICES, compose_run, experiment_entry

FILES = sorted(p.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml"))

#: tiny parts that make a training module small enough to build
TINY_MODEL = {
    "stage1": ["net=swinir_tiny", "degradation=second_order_tiny"],
    "stage2": [
        "net=controlnet_tiny",
        "net@model.stage1=swinir_tiny",
        "degradation=second_order_tiny",
        "model.stage1_ckpt_path=null",
    ],
    "pixel_ddpm": ["net=unet_adm_tiny", "degradation=none"],
}
#: zero-shot methods that build from a prior and an operator alone (the others load weights)
ZERO_SHOT = {"baseline", "bird", "bir_d", "gdp"}
RESTORE = ["input=in", "output=out", "ckpt=x"]
#: what a sweep needs besides its own file (the method it sweeps, that method's prior/operator)
SWEEP_NEEDS = {
    "guidance_scale": ["method=gdp", "prior=tiny", "operator=kernel_mask"],
    "step_size": ["prior=tiny", "operator=kernel_mask"],
}


def plan(rel: str) -> tuple[str, list[str], str | None]:
    """(entry, overrides, node to instantiate or None) for the config file ``rel``."""
    *group, name = rel.removesuffix(".yaml").split("/")
    group = "/".join(group)
    if not group:  # an entry point
        user = {"restore": RESTORE, "degrade": ["input=in", "output=out"], "eval": ["pred=p"]}
        return name, user.get(name, []), None
    if group == "experiment":
        if experiment_entry(name) == "train":
            return "train", [f"experiment={name}", *EXPERIMENT_CHOICES.get(name, [])], None
        method = "method" if name.startswith(("bird_", "bir_d_", "gdp_")) else None
        return "restore", [f"experiment={name}", "prior=tiny", *RESTORE], method
    if group == "method":
        build = "method" if name in ZERO_SHOT else None
        return "restore", [f"method={name}", "prior=tiny", "operator=kernel_mask", *RESTORE], build
    if group in ("operator", "prior"):
        build = group if group == "operator" or name == "tiny" else None
        return "restore", [f"{group}={name}", "method=baseline", *RESTORE], build
    if group == "net":
        return "train", [f"net={name}"], "net" if name.endswith("_tiny") else None
    if group == "model":
        return "train", [f"model={name}", *TINY_MODEL[name]], "model"
    if group == "degradation":
        return "degrade", [f"degradation={name}", "input=in", "output=out"], "degradation"
    if group == "trainer":
        cpu = name in ("cpu", "ddp_cpu", "default")
        return "train", [f"trainer={name}"], "trainer" if cpu else None
    if group == "callbacks":
        return (
            ("restore", [f"callbacks={name}", *RESTORE], "callbacks")
            if name == "predict"
            else (
                "train",
                [f"callbacks={name}"],
                "callbacks",
            )
        )
    if group == "callbacks/model_checkpoint":
        overrides = [f"+callbacks/model_checkpoint@callbacks.model_checkpoint={name}"]
        return "train", overrides, "callbacks"
    if group == "schedule":
        return "train", ["model=pixel_ddpm", f"schedule@model.schedule={name}"], None
    if group == "data":
        extra = EXPERIMENT_CHOICES["prior_folder"] if name == "photos" else []
        return "train", [f"data={name}", *extra], None
    if group == "logger":
        return "train", [f"logger={name}"], "logger" if name != "wandb" else None
    if group in ("paths", "hydra", "launcher"):
        return "train", [f"{group}={name}"], None
    if group == "sweep":
        return "restore", [f"sweep={name}", *SWEEP_NEEDS.get(name, []), *RESTORE], None
    if group == "benchmark":
        return "restore", [f"+benchmark={name}", "method=baseline", *RESTORE], None
    raise AssertionError(f"no rule composes {rel}: add one to tests/test_configs.py")


def test_the_tree_ships_inside_the_package(monkeypatch):
    import importlib

    import bir
    import bir.cli

    monkeypatch.delenv("BIR_CONFIG_DIR", raising=False)
    assert importlib.reload(bir.cli).CONFIG_DIR == str(Path(bir.__file__).parent / "conf")
    assert len(FILES) > 100 and "train.yaml" in FILES and "experiment/quickstart.yaml" in FILES


@pytest.mark.parametrize("rel", FILES)
def test_every_config_file_composes_resolves_and_builds(rel, tmp_path):
    entry, overrides, node = plan(rel)
    cfg = compose_run(entry, overrides, tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert resolved["task_name"]
    if node is None:
        return
    torch.manual_seed(0)
    built = instantiate(cfg[node])
    if isinstance(cfg[node], DictConfig) and "_target_" not in cfg[node]:  # a dict of parts
        assert set(built) == set(cfg[node]) and all(v is not None for v in built.values())
    else:
        target = get_object(cfg[node]._target_)
        if isinstance(target, type):
            assert isinstance(built, target)
        else:  # a factory (e.g. load_pixel_prior): it returns what its annotation names
            returns = inspect.signature(target, eval_str=True).return_annotation
            assert isinstance(built, returns)


def test_the_slurm_launcher_and_the_sweeps_reach_hydra(tmp_path):
    """The launcher and sweeper settings live in the ``hydra`` node (not in the job config)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        slurm = compose("train", ["launcher=slurm", "trainer=ddp"], return_hydra_config=True)
        sweeps = {
            name: compose("restore", [f"sweep={name}", *SWEEP_NEEDS.get(name, []), *RESTORE], True)
            for name in ("baseline_balance", "guidance_scale", "optuna_baseline", "step_size")
        }
    launcher = slurm.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (1, 4, 4)
    assert sweeps["optuna_baseline"].hydra.sweeper._target_.endswith("OptunaSweeper")
    for name, cfg in sweeps.items():
        assert cfg.hydra.sweeper.params, name
