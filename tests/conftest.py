"""Shared test set-up: CPU only, offline, deterministic, quiet."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from bir.cli import CONFIG_DIR  # noqa: E402

warnings.filterwarnings("ignore", message=".*LeafSpec.*")
torch.set_num_threads(min(2, os.cpu_count() or 1))

#: the config tree every entry point reads (bir/conf, or the folder in BIR_CONFIG_DIR)
CONF = Path(CONFIG_DIR)


def compose_config(entry: str, *overrides: str, hydra_config: bool = False) -> DictConfig:
    """The config of ``entry`` (train | restore | degrade | eval) composed with ``overrides``;
    restore and degrade get placeholder ``input``/``output`` folders (an override replaces them).
    ``hydra_config`` keeps the ``hydra`` node (sweeper, launcher)."""
    from hydra import compose, initialize_config_dir

    if entry in ("restore", "degrade"):
        overrides = ("input=x", "output=y", *overrides)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(entry, overrides=list(overrides), return_hydra_config=hydra_config)


def compose_run(entry: str, overrides: list[str], root: Path) -> DictConfig:
    """The job config Hydra hands ``entry``'s main: composed with ``overrides``, its run folder
    ``root/outputs/<task_name>/<run_name>`` set as Hydra's output dir (so ``${hydra:...}``
    resolves), the ``hydra`` node removed."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(entry, overrides=overrides, return_hydra_config=True)
    OmegaConf.set_readonly(cfg, False)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(root / "outputs" / cfg.task_name / cfg.run_name)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


#: what a user must give an experiment (its ??? keys)
EXPERIMENT_CHOICES = {
    "prior_folder": ["data.train.root=photos/train", "data.val.root=photos/holdout"]
}


def experiment_entry(name: str) -> str:
    """``restore`` or ``train``: the command of ``experiment/<name>.yaml``, from its usage line."""
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    entries = [e for e in ("restore", "train") if f"bir-{e} experiment={name}" in text]
    assert len(entries) == 1, f"experiment/{name}.yaml needs one usage line (bir-train/restore)"
    return entries[0]


def net_config(name: str) -> DictConfig:
    """``conf/net/<name>.yaml`` as written (no composition: a net file has no defaults)."""
    return OmegaConf.load(CONF / "net" / f"{name}.yaml")


def build_net(name: str, **overrides) -> torch.nn.Module:
    """The network of ``conf/net/<name>.yaml``, with keys overridden (nested keys merge)."""
    from hydra.utils import instantiate

    return instantiate(OmegaConf.merge(net_config(name), overrides))


#: ``bir-train`` overrides for a run without validation (toy training runs in tests)
NO_VALIDATION = [
    "data.val=null",
    "trainer.val_check_interval=null",
    "trainer.check_val_every_n_epoch=null",
    "callbacks.model_checkpoint.monitor=null",
]


@pytest.fixture
def single_thread():
    """One torch thread for the test (modules opt in with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``): tiny nets are overhead-bound, and
    one thread is several times faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory):
    """The scikit-image photographs written as PNG folders (train/ and holdout/)."""
    from bir.data.samples import materialize_samples

    root = tmp_path_factory.mktemp("samples")
    materialize_samples(root)
    return root
