"""Model versions in the pool: Triton's NAME/VERSION/model.onnx beside flat NAME.onnx files (version 1).

A model `m.onnx` has the versions of its directory `m/` (each a positive integer directory holding a
`model.onnx`) and, when `m/1/` does not exist, the flat file `m.onnx` as version 1. The sidecar's
`version_policy` (Triton's: {"latest": {"num_versions": N}}, {"all": {}}, {"specific": {"versions":
[...]}}; latest 1 by default) picks the versions served; a request naming none gets the newest of them.

Inside the worker one version is an *entry*: `m.onnx` for a flat file, `m.onnx@V` for a directory's
version. Entries key the session cache, statistics, unload markers and the polling ledger.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from broker.errors import ModelNotFound

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
SUFFIX = ".onnx"


def entry(name: str, version: int, flat: bool) -> str:
    return name if flat else f"{name}@{version}"


def split(entry_name: str) -> tuple[str, int | None]:
    """(model name, version) of an entry; version None for a flat file."""
    base, at, version = entry_name.rpartition("@")
    if at and version.isdigit() and base.endswith(SUFFIX):
        return base, int(version)
    return entry_name, None


def path_of(prefix: str, entry_name: str) -> str:
    """The file of an entry, `prefix` being the pool directory with a trailing separator."""
    name, version = split(entry_name)
    if version is None:
        return prefix + name
    return os.path.join(prefix + name[: -len(SUFFIX)], str(version), MODEL_FILE)


def parse_version(name: str, version: Any) -> int | None:
    """None for "no version named"; else the positive integer; ModelNotFound for anything else."""
    if version is None or version == "":
        return None
    if type(version) is int and version > 0:
        return version
    if isinstance(version, str) and version.isdigit() and int(version) > 0 and len(version) < 19:
        return int(version)
    raise ModelNotFound(f"model {name} has no version {version!r}: versions are positive integers")


def on_disk(prefix: str, name: str) -> dict[int, str]:
    """{version: entry} of every version of `name` in the pool (empty when there is none)."""
    found: dict[int, str] = {}
    directory = prefix + name[: -len(SUFFIX)]
    try:
        with os.scandir(directory) as items:
            for item in items:
                if item.name.isdigit() and int(item.name) > 0 and len(item.name) < 19 \
                        and os.path.isfile(os.path.join(item.path, MODEL_FILE)):
                    found[int(item.name)] = entry(name, int(item.name), False)
    except (FileNotFoundError, NotADirectoryError):
        pass
    if 1 not in found and os.path.isfile(prefix + name):
        found[1] = name
    return found


def policy_of(policy: Any) -> dict:
    """The version_policy to show in a model configuration: the sidecar's when valid, else latest 1."""
    return policy if _valid(policy) else {"latest": {"num_versions": 1}}


def _valid(policy: Any) -> bool:
    if not (isinstance(policy, dict) and len(policy) == 1):
        return False
    (kind, args), = policy.items()
    args = args if isinstance(args, dict) else {}
    if kind == "all":
        return True
    if kind == "latest":
        return type(args.get("num_versions", 1)) is int and args.get("num_versions", 1) >= 1
    if kind == "specific":
        wanted = args.get("versions")
        return isinstance(wanted, list) and all(type(v) is int for v in wanted)
    return False


def served(versions: list[int], policy: Any, name: str = "") -> list[int]:
    """The versions (sorted) a version_policy serves out of `versions` (sorted)."""
    if policy is None:
        return versions[-1:]
    if isinstance(policy, dict) and len(policy) == 1:
        (kind, args), = policy.items()
        args = args if isinstance(args, dict) else {}
        if kind == "all":
            return versions
        if kind == "latest":
            n = args.get("num_versions", 1)
            if type(n) is int and n >= 1:
                return versions[-n:]
        if kind == "specific":
            wanted = args.get("versions")
            if isinstance(wanted, list) and all(type(v) is int for v in wanted):
                return [v for v in versions if v in set(wanted)]
    if len(_warned) < 1024 and (name, repr(policy)) not in _warned:  # NOTE: once, not on every request
        _warned.add((name, repr(policy)))
        log.warning("model %s: version_policy %r is not one of latest/all/specific; serving the newest", name,
                    policy)
    return versions[-1:]


_warned: set[tuple[str, str]] = set()
