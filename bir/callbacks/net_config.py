"""Store the network's config in every checkpoint a training run writes.

A checkpoint then says which network it holds: when it is loaded into another architecture the
error names the checkpoint's net (group file and overridden fields) and the overrides that
build it (:func:`bir.nets.checkpoints.net_mismatch_hint`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

from bir.nets.checkpoints import NET_CONFIG_KEY


def net_config_record(net: DictConfig, choice: str | None, config_dir: str | Path) -> dict:
    """``{"choice", "config", "overrides"}`` for the resolved ``net`` node chosen as ``choice``
    (a file of ``config_dir/net``); ``overrides`` are the fields that differ from that file."""
    config = OmegaConf.to_container(net, resolve=True)
    overrides = dict(config)
    group_file = Path(config_dir) / "net" / f"{choice}.yaml" if choice else None
    if group_file is not None and group_file.is_file():
        defaults = OmegaConf.to_container(OmegaConf.load(group_file), resolve=False)
        overrides = {k: v for k, v in config.items() if defaults.get(k, object()) != v}
    else:
        choice = None
    overrides.pop("_target_", None)
    return {"choice": choice, "config": config, "overrides": overrides}


class StoreNetConfig(pl.Callback):
    """Writes ``record`` (see :func:`net_config_record`) under ``bir_net`` in each checkpoint."""

    def __init__(self, record: Mapping):
        self.record = dict(record)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[NET_CONFIG_KEY] = self.record
