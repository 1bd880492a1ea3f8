"""Checks of a composed config before anything is built, each failure worded as what to change.

The entry points run these first, so a mistake in a setting costs no model loading and reads as
one line (a :class:`bir.errors.UsageError`) instead of an OmegaConf or instantiation traceback:

- :func:`require`: top-level values the user must give (``input=``, ``output=``).
- :func:`resolve_all`: every value resolves; a ``${prior}`` whose group was not chosen names the
  group and lists its choices (``add prior=NAME, one of: adm256_uncond, ...``); a deeper ``???``
  names its key.
- :func:`check_arguments`: every ``_target_`` node only sets arguments its callable takes, and
  arguments annotated with plain ``int`` / ``float`` / ``bool`` / ``str`` (or a union of them)
  get a value of that type (``method.steps='abc'`` names the key and the type). Annotations with
  any other type (lists, tensors, literals, classes) are left to the callable.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationKeyError, MissingMandatoryValue

from bir.errors import UsageError

#: keys of a ``_target_`` node that Hydra consumes (never passed to the callable)
HYDRA_KEYS = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})
_SCALARS = (int, float, bool, str, type(None))
_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def group_choices(config_dir: str | Path, group: str) -> list[str]:
    """The option names of config group ``group`` (the ``*.yaml`` stems in its folder)."""
    return sorted(p.stem for p in (Path(config_dir) / group).glob("*.yaml"))


def require(cfg: DictConfig, keys: Mapping[str, str]) -> None:
    """Raise for the first of ``keys`` (name -> what it is) that is unset (``???`` or null)."""
    for key, what in keys.items():
        if OmegaConf.is_missing(cfg, key) or OmegaConf.select(cfg, key) is None:
            raise UsageError(f"{key}= is required: {what}")


def _children(node: DictConfig | ListConfig, path: str) -> Iterator[tuple[str, Any, Any]]:
    """(child path, key, container) of every direct child of ``node``."""
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        sub = f"{path}.{key}" if path else str(key)
        if isinstance(node, ListConfig):
            sub = f"{path}[{key}]"
        yield sub, key, node


def resolve_all(cfg: DictConfig, config_dir: str | Path) -> None:
    """Resolve every value of ``cfg``; raise one :class:`UsageError` for what does not resolve.

    Interpolations of an unchosen config group (``prior: ${prior}`` with no ``prior=``) are
    gathered into one message that lists each group's choices from ``config_dir``.
    """
    groups: dict[str, list[str]] = {}  # group -> keys that refer to it

    def walk(node: DictConfig | ListConfig, path: str) -> None:
        for sub, key, container in _children(node, path):
            try:
                value = container[key]
            except MissingMandatoryValue:
                raise UsageError(f"{sub} is required (it is ???): set {sub}=...") from None
            except InterpolationKeyError as err:
                match = re.search(r"Interpolation key '([^']+)' not found", str(err))
                ref = match.group(1) if match else "?"
                root = ref.split(".")[0]
                if group_choices(config_dir, root):
                    groups.setdefault(root, []).append(sub)
                    continue
                raise UsageError(f"{sub} refers to ${{{ref}}}, which is not set") from None
            if isinstance(value, DictConfig | ListConfig):
                walk(value, sub)

    walk(cfg, "")
    if groups:
        needs = "; ".join(
            f"{', '.join(keys)} need{'s' if len(keys) == 1 else ''} {_article(group)} {group}: "
            f"add {group}=NAME, "
            f"one of: {', '.join(group_choices(config_dir, group))}"
            for group, keys in groups.items()
        )
        raise UsageError(needs)


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _accepted(annotation: Any) -> tuple[type, ...] | None:
    """The scalar types an annotation allows, or None when it involves anything else."""
    members = (
        typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType)
        else (annotation,)
    )
    return tuple(members) if all(m in _SCALARS for m in members) else None


def _fits(value: Any, accepted: tuple[type, ...]) -> bool:
    if value is None:
        return type(None) in accepted
    if isinstance(value, bool):  # before int: bool is an int subclass
        return bool in accepted
    if isinstance(value, int):
        return int in accepted or float in accepted
    if isinstance(value, float):
        return float in accepted
    if isinstance(value, str):
        return str in accepted
    return False  # a list or a dict where a scalar belongs


def _signature(target: str) -> tuple[inspect.Signature, dict[str, Any]] | None:
    """Signature and resolved type hints of a ``_target_``; None when it cannot be inspected
    (then instantiation reports the problem itself, with its traceback)."""
    import hydra.utils

    try:
        obj = hydra.utils.get_object(target)
    except Exception:
        return None
    func = obj.__init__ if inspect.isclass(obj) else obj
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    try:
        hints = typing.get_type_hints(inspect.unwrap(func))
    except Exception:  # annotations naming what the module imports only for type checkers
        hints = {}
    return sig, hints


def check_arguments(cfg: DictConfig) -> None:
    """Check every ``_target_`` node of ``cfg`` against its callable (module docstring)."""
    seen: set[int] = set()

    def check_node(node: DictConfig, path: str) -> None:
        found = _signature(str(node["_target_"]))
        if found is None:
            return
        sig, hints = found
        params = sig.parameters
        open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for key in node.keys():
            key = str(key)
            if key in HYDRA_KEYS:
                continue
            where = f"{path}.{key}" if path else key
            if key not in params:
                if open_kwargs:
                    continue
                names = [n for n, p in params.items() if p.kind is not p.VAR_POSITIONAL]
                raise UsageError(
                    f"{where} is not an argument of {node['_target_']}; it takes: {', '.join(names)}"
                )
            accepted = _accepted(hints.get(key, inspect.Parameter.empty))
            if accepted is None:
                continue
            if params[key].default is None:
                accepted = (*accepted, type(None))
            value = node[key]
            if not _fits(value, accepted):
                shown = value if not isinstance(value, DictConfig | ListConfig) else "a list/dict"
                words = " or ".join(_TYPE_WORDS[t] for t in accepted if t in _TYPE_WORDS)
                if type(None) in accepted:
                    words += " or null"
                raise UsageError(f"{where} must be {words}; got {shown!r}")

    def walk(node: DictConfig | ListConfig, path: str) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, DictConfig) and "_target_" in node:
            check_node(node, path)
        for sub, key, container in _children(node, path):
            value = container[key]
            if isinstance(value, DictConfig | ListConfig):
                walk(value, sub)

    walk(cfg, "")


__all__ = ["check_arguments", "group_choices", "require", "resolve_all"]
