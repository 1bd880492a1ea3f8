"""Reading checkpoints from local files, format detection and strict, explained loading.

Released weights come in several wrappings: bare state dicts (``*.pth``, ``*.pt``), Lightning
checkpoints (``{"state_dict": ...}``), ldm "full" checkpoints with every submodel under a prefix
(``model.diffusion_model.``, ``first_stage_model.``, ``cond_stage_model.``), BasicSR-style
``{"params_ema": ...}`` and safetensors files. :func:`load_checkpoint` unwraps these to a flat
``name -> tensor`` dict; :func:`load_state_dict_checked` loads it and, on a mismatch, raises an
error that lists what is missing, unexpected and of the wrong shape.

Where a network sits inside a checkpoint is the network class's business: it declares
``checkpoint_prefixes`` (where its released files put it, e.g. ``model.diffusion_model.`` for the
SD UNet), and optionally ``checkpoint_ignored`` (keys of other parts the files carry),
``checkpoint_what`` and ``checkpoint_url`` (for the errors). :func:`net_weights` looks under those
prefixes and under :data:`WRAPPER_PREFIXES`, where bir's own Lightning modules and common wrappers
put any network; :func:`load_net` is the one loader every config and module uses.

This module is a leaf: it imports nothing from bir.
"""

from __future__ import annotations

import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

# Wrapper keys, tried in order, under which frameworks store the actual state dict.
_WRAPPER_KEYS = ("state_dict", "params_ema", "params", "model_state_dict", "model", "module")

#: Where any network may sit in a checkpoint, after its class's own ``checkpoint_prefixes``. When
#: a file holds two copies (bir's PixelDDPM: the EMA under ``ema_net.`` beside the trained
#: ``net.``), the first prefix wins: EMA copies, then the attribute bir's Lightning modules keep
#: the net under, then DataParallel and other wrappers, the bare state dict last.
WRAPPER_PREFIXES = ("ema_net.", "net_ema.", "ema.", "net.", "model.net.", "model.", "module.", "")


class MissingCheckpointError(FileNotFoundError):
    """A weights file is not where the config says; the message says what to download and where."""


class CheckpointMismatchError(RuntimeError):
    """A state dict does not fit a module; the message shows the first offending keys, one a
    line, and (``hint``) which network the checkpoint was trained with and how to build it."""

    shown = 5  # keys listed per kind; the full lists are on the exception

    def __init__(
        self,
        name: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[str],
        hint: str = "",
    ):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f"checkpoint does not match {name}:"]
        kinds = {"missing keys": missing, "unexpected keys": unexpected}
        kinds["shape mismatches"] = mismatched
        for title, keys in kinds.items():
            if keys:
                lines.append(f"  {title} ({len(keys)}):")
                lines += [f"    {k}" for k in keys[: self.shown]]
            if len(keys) > self.shown:
                lines.append(f"    ... and {len(keys) - self.shown} more")
        super().__init__("\n".join(lines) + (f"\n{hint}" if hint else ""))


#: where bir's training runs store the network's config in their checkpoints
NET_CONFIG_KEY = "bir_net"


def stored_net_config(path: str | os.PathLike | None) -> dict | None:
    """The network config a bir training run stored in its checkpoint (``{"choice": group file,
    "config": resolved node, "overrides": fields that differ from the group file}``), or None
    (no such file, not a bir checkpoint, or not readable without running code)."""
    if path is None or str(path) in ("", "None", "null"):
        return None
    path = Path(os.path.expanduser(str(path)))
    if path.suffix == ".safetensors" or not path.is_file():
        return None
    try:
        # the tensors stay on disk; a file trusted to unpickle in full is read only for weights
        obj = _read_file(path, mmap=True, full_if_trusted=False)
    except Exception:
        return None
    found = obj.get(NET_CONFIG_KEY) if isinstance(obj, Mapping) else None
    return found if isinstance(found, Mapping) else None


def net_mismatch_hint(path: str | os.PathLike, module: nn.Module, net_key: str | None) -> str:
    """Lines for a mismatch error: the net the checkpoint was trained with (its stored config),
    the net this run builds, and the overrides that build the checkpoint's net instead."""
    n_params = sum(p.numel() for p in module.parameters())
    built = f"  this run builds net {type(module).__name__} ({n_params:,} parameters)"
    stored = stored_net_config(path)
    if stored is None:
        if net_key:
            built += f"\n  choose the network the checkpoint was made for ({net_key}=...)"
        return built
    config = dict(stored.get("config") or {})
    target = config.pop("_target_", "?")
    args = " ".join(f"{k}={v}" for k, v in config.items())
    lines = [f"  the checkpoint was trained with net {target} {args} (its stored config)", built]
    if net_key:
        group, _, field = net_key.rpartition(".")
        fix = [f"net@{net_key}={stored['choice']}"] if stored.get("choice") else []
        overrides = stored.get("overrides") if stored.get("choice") else config
        fix += [f"{net_key}.{k}={_override_value(v)}" for k, v in (overrides or {}).items()]
        lines.append("  fix: add these overrides: " + " ".join(fix))
    return "\n".join(lines)


def _override_value(value) -> str:
    """A value as Hydra's override grammar reads it (lists without spaces)."""
    if isinstance(value, list | tuple):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    if value is None:
        return "null"
    return str(value)


def missing_checkpoint_error(
    path: str | os.PathLike | None, what: str, url: str | None = None, config_key: str | None = None
) -> MissingCheckpointError:
    """The error for a weights file that is not set (``path`` None) or not on disk.

    It names the file, where it is published and the config key to set, worded for each case:
    ``model weights not found at nope.ckpt (no such file). Set ckpt=/path/to/nope.ckpt ...``.
    """
    key = config_key or "the checkpoint path"
    if path is None:
        msg = f"{what} weights are not set: give the file with {key}=/path/to/weights.ckpt."
    else:
        name = Path(path).name
        msg = (
            f"{what} weights not found at {path} (no such file). "
            f"Set {key}=/path/to/{name} where the file really is"
            + (", or put it at the path above." if config_key else ".")
        )
    if url:
        msg += f" The file is published at {url}."
    msg += " bir never downloads weights at run time."
    return MissingCheckpointError(msg)


class UnsafeCheckpointError(RuntimeError):
    """A weights file holds a pickled object that could run code when loaded; it was not loaded."""


class _Inert:
    """Stand-in for a class that released training checkpoints pickle beside their weights
    (Lightning's ``ModelCheckpoint`` used as a dict key, ...). Unpickling it runs none of the
    file's code and keeps nothing: bir reads only the tensors."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


#: Globals that released checkpoints need, mapped to what bir unpickles them as. Everything else
#: is refused by ``torch.load(weights_only=True)``; :func:`trust_pickle_files` is the opt-in.
_STAND_INS = [
    (_Inert, f"{pkg}.callbacks.{mod}.{cls}")
    for pkg in ("pytorch_lightning", "lightning.pytorch")
    for mod, cls in (("model_checkpoint", "ModelCheckpoint"), ("early_stopping", "EarlyStopping"))
] + [
    # a dict subclass (hyper-parameters): read as the plain mapping it holds
    (OrderedDict, f"{pkg}.utilities.parsing.AttributeDict")
    for pkg in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric")
]

#: Files the user allowed, for this run only, to be unpickled in full (``trust_pickle=[...]``).
_TRUSTED: set[Path] = set()


def trust_pickle_files(paths: Iterable[str | os.PathLike] | str | None) -> None:
    """Allow these files (and only these) to be loaded with the full, code-running unpickler.

    The entry points call this with the run's ``trust_pickle`` list; nothing else adds to it.
    """
    if paths is None:
        return
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    _TRUSTED.update(Path(os.path.expanduser(str(p))).resolve() for p in paths)


def _numpy_globals() -> list:
    """numpy scalars and dtypes, which Lightning and numpy-based trainers store as metadata."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch
        return []
    scalar = getattr(np, "_core", getattr(np, "core", None)).multiarray.scalar
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return [scalar, np.dtype, *dtypes]


def _refused_global(err: Exception) -> str | None:
    """The name of the global that ``torch.load(weights_only=True)`` refused, if that was why."""
    match = re.search(r"GLOBAL ([\w.]+)", str(err))
    return match.group(1) if match else None


def _read_file(path: Path, mmap: bool = False, full_if_trusted: bool = True) -> object:
    """Read a weights file without running code from it (safetensors, or ``weights_only``),
    unless the user trusted it (``full_if_trusted``); ``mmap`` leaves the tensors on disk
    (zip-format files only)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if full_if_trusted and path.resolve() in _TRUSTED:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    try:
        with torch.serialization.safe_globals([*_STAND_INS, *_numpy_globals()]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        name = _refused_global(err)
        if name is None:
            raise
        raise UnsafeCheckpointError(
            f"{path} was not loaded: it holds a pickled object ({name}) that could run code when "
            "loaded, and bir reads weights files without running code. If you made this file or "
            f"trust who did, allow it for this run with trust_pickle=[{path}]"
        ) from None


def unwrap_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a checkpoint object (Lightning, BasicSR, bare)."""
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    for key in _WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], Mapping | nn.Module):
            return unwrap_state_dict(obj[key])
    raise ValueError(
        "could not find a state dict in the checkpoint; top-level keys: "
        + ", ".join(map(str, list(obj.keys())[:20]))
    )


def load_checkpoint(
    path: str | os.PathLike | None,
    *,
    what: str = "model",
    url: str | None = None,
    config_key: str | None = None,
) -> dict[str, torch.Tensor]:
    """Read a local weights file and return a flat ``name -> tensor`` dict.

    Args:
        path: the file (``.ckpt``, ``.pt``, ``.pth``, ``.bin``, ``.safetensors``).
        what: human name of the weights, for error messages ("SD 2.1 UNet").
        url: where the file is published, for the error message when it is missing.
        config_key: the config key that sets the path, for the error message.
    """
    if path is None or str(path) in ("", "None", "null"):
        raise missing_checkpoint_error(None, what, url, config_key)
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise missing_checkpoint_error(path, what, url, config_key)
    try:
        obj = _read_file(path)
    except UnsafeCheckpointError:
        raise
    except Exception as err:
        raise RuntimeError(
            f"{what} checkpoint {path} could not be read as a weights file "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'})"
        ) from None
    try:
        return unwrap_state_dict(obj)
    except ValueError as err:
        raise RuntimeError(f"{what} checkpoint {path}: {err}") from err


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys that start with ``prefix``, with the prefix removed (others dropped)."""
    if not prefix:
        return dict(state)
    n = len(prefix)
    return {k[n:]: v for k, v in state.items() if k.startswith(prefix)}


def common_prefixes(state: Mapping[str, torch.Tensor], depth: int = 2) -> dict[str, int]:
    """Count keys per leading ``depth`` name components (for inspection and format detection)."""
    counts: dict[str, int] = {}
    for k in state:
        p = ".".join(k.split(".")[:depth])
        counts[p] = counts.get(p, 0) + 1
    return counts


def select_prefix(
    state: Mapping[str, torch.Tensor], candidates: Iterable[str], expected_keys: Iterable[str]
) -> dict[str, torch.Tensor]:
    """Strip the first candidate prefix under which the most of ``expected_keys`` are found.

    Lets one loader accept a bare state dict (prefix ``""``) as well as the same weights nested in
    a Lightning or ldm checkpoint (``"model."``, ``"net."``, ``"model.diffusion_model."`` ...).
    """
    expected = set(expected_keys)
    best, best_hits = dict(state), -1
    for prefix in candidates:
        sub = strip_prefix(state, prefix)
        hits = len(expected.intersection(sub))
        if hits > best_hits:
            best, best_hits = sub, hits
    return best


def net_weights(
    net: nn.Module, state: Mapping[str, torch.Tensor], first: Iterable[str] = ()
) -> dict[str, torch.Tensor]:
    """The part of a checkpoint's flat ``state`` that holds ``net``: found under the class's
    ``checkpoint_prefixes`` or :data:`WRAPPER_PREFIXES` (``first``: prefixes tried before those,
    e.g. a module's EMA copy), without the keys the class lists in ``checkpoint_ignored``."""
    own = getattr(net, "checkpoint_prefixes", ())
    prefixes = dict.fromkeys((*first, *own, *WRAPPER_PREFIXES))
    sub = select_prefix(state, prefixes, net.state_dict().keys())
    ignored = tuple(getattr(net, "checkpoint_ignored", ()))
    return {k: v for k, v in sub.items() if not k.startswith(ignored)} if ignored else sub


def load_net(
    net: nn.Module,
    path: str | os.PathLike | None,
    *,
    what: str | None = None,
    url: str | None = None,
    config_key: str | None = None,
    net_key: str | None = None,
) -> nn.Module:
    """Load ``net`` strictly from the local weights file ``path`` and return it (``None`` keeps
    its weights: tests and random smoke runs).

    Any wrapping :func:`load_checkpoint` reads, with the network found by :func:`net_weights`.
    ``what`` and ``url`` (default: the class's ``checkpoint_what`` / ``checkpoint_url``) and
    ``config_key`` word the missing-file error; ``net_key`` (the config node that builds ``net``)
    words the mismatch error (:func:`net_mismatch_hint`).
    """
    if path is None:
        return net
    what = what or getattr(net, "checkpoint_what", type(net).__name__)
    url = url if url is not None else getattr(net, "checkpoint_url", None)
    state = load_checkpoint(path, what=what, url=url, config_key=config_key)
    name = f"{what} ({path})"
    load_state_dict_checked(net, net_weights(net, state), name=name, source=path, net_key=net_key)
    return net


def compare_state_dict(
    module: nn.Module, state: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, shape-mismatched) keys of ``state`` against ``module``, sorted."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    )
    return missing, unexpected, mismatched


def load_state_dict_checked(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    name: str = "model",
    strict: bool = True,
    source: str | os.PathLike | None = None,
    net_key: str | None = None,
) -> tuple[list[str], list[str]]:
    """``module.load_state_dict`` with a readable error listing the mismatching keys.

    Returns (missing, unexpected) when ``strict`` is False; raises
    :class:`CheckpointMismatchError` on any mismatch when it is True (shape mismatches always).
    With ``source`` (the file ``state`` came from) the error says which network the file was
    trained with and, with ``net_key`` (the config node that builds ``module``, e.g.
    ``method.net``), which overrides build that network.
    """
    missing, unexpected, mismatched = compare_state_dict(module, state)
    if mismatched or (strict and (missing or unexpected)):
        hint = net_mismatch_hint(source, module, net_key) if source is not None else ""
        raise CheckpointMismatchError(name, missing, unexpected, mismatched, hint)
    module.load_state_dict(dict(state), strict=False)
    return missing, unexpected
