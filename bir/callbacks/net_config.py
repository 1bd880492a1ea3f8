"""The network's config in every checkpoint a training run writes, and read back to restore.

A checkpoint then says which network it holds: ``bir-restore`` builds that network without any
``net`` override (:func:`use_stored_net_configs`), and when the file is loaded into another
architecture the error names the checkpoint's net (group file and overridden fields) and the
overrides that build it (:func:`bir.nets.checkpoints.net_mismatch_hint`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from bir.nets.checkpoints import NET_CONFIG_KEY, UnsafeCheckpointError, stored_net_config

log = logging.getLogger("bir")

#: the net nodes of the restore configs -> the key of the checkpoint each is loaded from
CHECKPOINT_NETS = {
    "method.net": "method.ckpt_path",  # method=swinir (ckpt=...)
    "method.stage1": "method.stage1_ckpt_path",  # method=diffbir's stage 1
    "method.controlldm": "method.controlldm.control_ckpt_path",  # method=diffbir's stage 2
    "prior.net": "prior.ckpt_path",  # prior=...
}


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


def overridden_keys(overrides: Sequence[str]) -> list[tuple[str, str]]:
    """``(config key, override)`` of command-line overrides: ``method.net.embed_dim=8`` sets
    ``method.net.embed_dim``, ``net@method.net=swinir_tiny`` the node ``method.net``."""
    keys = []
    for override in overrides:
        key = re.sub(r"^[~+]+", "", override.split("=", 1)[0])
        keys.append((key.split("@", 1)[1] if "@" in key else key, override))
    return keys


def checked_net_config(config: Mapping, path: object) -> DictConfig:
    """The stored config as a node to instantiate, once every ``_target_`` in it is known to
    name a network class of bir (a weights file never chooses which code runs)."""

    def targets(node):
        if isinstance(node, Mapping):
            if "_target_" in node:
                yield node["_target_"]
            for value in node.values():
                yield from targets(value)
        elif isinstance(node, list | tuple):
            for value in node:
                yield from targets(value)

    from hydra.utils import get_class

    for target in targets(config):
        try:
            ok = str(target).startswith("bir.nets.") and issubclass(get_class(target), nn.Module)
        except Exception:
            ok = False
        if not ok:
            raise UnsafeCheckpointError(
                f"{path} was not used to build a network: its stored net config names "
                f"{target!r}, not a network class of bir.nets. Choose the net with overrides "
                "(net@method.net=... or prior.net.*=...) instead."
            )
    return OmegaConf.create(dict(config))


def _short(value) -> str:
    """A field for a log line: a sub-network as its class name."""
    if isinstance(value, Mapping):
        return f"<{str(value.get('_target_', '...')).rpartition('.')[2]}>"
    return str(value)


def use_stored_net_configs(cfg: DictConfig, overrides: Sequence[str] = ()) -> list[str]:
    """Build each net of :data:`CHECKPOINT_NETS` from the config its checkpoint stores.

    A node whose checkpoint (a file bir trained) stores a net config is replaced by it, unless
    the command line overrides the node (``net@method.net=...``, ``method.net.embed_dim=...``):
    explicit overrides win. The checkpoint's own path keeps this run's value. Returns the log
    lines, one a node, saying which config builds the net.
    """
    lines = []
    for node, ckpt_key in CHECKPOINT_NETS.items():
        if not isinstance(OmegaConf.select(cfg, node), DictConfig):
            continue
        path = OmegaConf.select(cfg, ckpt_key, default=None)
        stored = stored_net_config(path)
        if stored is None or not isinstance(stored.get("config"), Mapping):
            continue
        mine = [
            o
            for k, o in overridden_keys(overrides)
            if (k == node or k.startswith(node + ".")) and k != ckpt_key
        ]
        if mine:
            lines.append(
                f"{node}: the network of this run's config and overrides ({' '.join(mine)}), "
                f"not the one stored in {path}"
            )
            continue
        config = checked_net_config(stored["config"], path)
        with open_dict(cfg):
            OmegaConf.update(cfg, node, config, merge=False)
            if ckpt_key.startswith(node + "."):  # the file being loaded stays this run's
                OmegaConf.update(cfg, ckpt_key, path, merge=False)
        fields = [stored.get("choice") or config.get("_target_")]
        fields += [f"{k}={_short(v)}" for k, v in (stored.get("overrides") or {}).items()]
        lines.append(f"{node}: the network stored in {path} ({' '.join(fields)})")
    for line in lines:
        log.info(line)
    return lines
