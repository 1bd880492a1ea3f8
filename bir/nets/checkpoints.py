"""Reading checkpoints from local files, format detection and strict, explained loading.

Released weights come in several wrappings: bare state dicts (``*.pth``, ``*.pt``), Lightning
checkpoints (``{"state_dict": ...}``), ldm "full" checkpoints with every submodel under a prefix
(``model.diffusion_model.``, ``first_stage_model.``, ``cond_stage_model.``), BasicSR-style
``{"params_ema": ...}`` and safetensors files. :func:`load_checkpoint` unwraps these to a flat
``name -> tensor`` dict; :func:`load_state_dict_checked` loads it and, on a mismatch, raises an
error that lists what is missing, unexpected and of the wrong shape.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

# Wrapper keys, tried in order, under which frameworks store the actual state dict.
_WRAPPER_KEYS = ("state_dict", "params_ema", "params", "model_state_dict", "model", "module")


class MissingCheckpointError(FileNotFoundError):
    """A weights file is not where the config says; the message says what to download and where."""


class CheckpointMismatchError(RuntimeError):
    """A state dict does not fit a module; the message lists the offending keys."""

    def __init__(self, name: str, missing: list[str], unexpected: list[str], mismatched: list[str]):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched

        def fmt(title: str, keys: list[str]) -> str:
            if not keys:
                return ""
            shown = "\n    ".join(keys[:20])
            more = f"\n    ... and {len(keys) - 20} more" if len(keys) > 20 else ""
            return f"\n  {title} ({len(keys)}):\n    {shown}{more}"

        super().__init__(
            f"checkpoint does not match {name}:"
            + fmt("missing keys", missing)
            + fmt("unexpected keys", unexpected)
            + fmt("shape mismatches", mismatched)
        )


def missing_checkpoint_error(
    path: str | os.PathLike, what: str, url: str | None = None, config_key: str | None = None
) -> MissingCheckpointError:
    """Build the error for a weights file that is not on disk."""
    msg = f"{what} weights not found at {path}."
    if url:
        msg += f" Download them from {url}"
        msg += f" and place the file at {path}" if config_key is None else ""
    if config_key:
        msg += f" {'and' if url else 'Then'} set {config_key}=/path/to/{Path(path).name}"
        msg += " (or put the file at the path above)."
    msg += " bir never downloads weights at run time."
    return MissingCheckpointError(msg)


def _read_file(path: Path) -> object:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # Older Lightning/ldm checkpoints pickle extra objects (hyper-parameters, callbacks).
        # Only ever used on files the user configured explicitly.
        return torch.load(path, map_location="cpu", weights_only=False)


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
        raise missing_checkpoint_error("<unset>", what, url, config_key)
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise missing_checkpoint_error(path, what, url, config_key)
    try:
        obj = _read_file(path)
    except Exception as err:
        raise RuntimeError(f"{what} checkpoint {path} could not be read: {err}") from err
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
) -> tuple[list[str], list[str]]:
    """``module.load_state_dict`` with a readable error listing every mismatching key.

    Returns (missing, unexpected) when ``strict`` is False; raises
    :class:`CheckpointMismatchError` on any mismatch when it is True (shape mismatches always).
    """
    missing, unexpected, mismatched = compare_state_dict(module, state)
    if mismatched or (strict and (missing or unexpected)):
        raise CheckpointMismatchError(name, missing, unexpected, mismatched)
    module.load_state_dict(dict(state), strict=False)
    return missing, unexpected
