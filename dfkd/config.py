"""Config layering: defaults in code -> ``--config FILE.yaml`` -> ``--set key=value`` -> flags.

Every command resolves its typed config the same way (:func:`resolve`). A config file holds one
command's keys, or sections named after commands (``select:``, ``distill:``, ...) so that one
recipe file serves a whole pipeline: a command reads its own section when the file has one,
else the file's other keys (never another command's section).
"""
from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from .errors import DfkdError


OPEN = "objective"  # a section whose keys belong to the chosen objective, checked by it
COMMANDS = ("train", "eval", "select", "expand", "distill", "pu-train")  # the sections a recipe file may have


def _merge(base: dict, over: dict, where: str, prefix: str = "") -> None:
    for key, value in over.items():
        name = f"{prefix}{key}"
        if key not in base and not prefix.startswith(OPEN + "."):
            raise DfkdError(f"{where}: unknown config key {name!r}; known: {', '.join(prefix + k for k in base)}")
        if isinstance(base.get(key), dict) and isinstance(value, dict):
            _merge(base[key], value, where, name + ".")
        else:
            base[key] = _typed(base.get(key), value, f"{where}: {name}")


def _typed(default: Any, value: Any, where: str) -> Any:
    """``value`` as the type of the key's default (an int is a fine float); a mismatch is an error."""
    if default is None or value is None or isinstance(default, dict):
        return value
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    raise DfkdError(f"{where}={value!r}: expected {'a number' if kind in (int, float) else 'a ' + kind.__name__}"
                    f" like {default!r}")


def parse_set(item: str) -> dict:
    """``a.b=1`` -> ``{"a": {"b": 1}}`` (the value read as YAML: numbers, booleans, lists)."""
    if "=" not in item:
        raise DfkdError(f"--set {item!r}: expected key=value")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    for part in reversed(key.strip().split(".")):
        if not part:
            raise DfkdError(f"--set {item!r}: empty key part")
        value = {part: value}
    return value


def resolve(cls: type, config: Any = None, sets: list[str] = (), flags: dict | None = None,
            command: str | None = None, api: bool = False) -> Any:
    """The typed config ``cls`` (a dataclass) of a command: its defaults, then ``config`` (a YAML
    file's path, a dict, or a ``cls`` itself), ``--set`` items, then ``flags`` (None: not given;
    ``api``: they are keyword arguments of a library call, and errors name them so)."""
    if isinstance(config, cls):  # its values are the defaults the other layers go over
        return cls(**resolve_config(asdict(config), None, sets, flags, api=api))
    if config is not None and not isinstance(config, (str, Path, dict)):
        raise DfkdError(f"config: expected a {cls.__name__}, a dict or a YAML file's path, not {type(config).__name__}")
    return cls(**resolve_config(asdict(cls()), config, sets, flags, command, api))


def resolve_config(defaults: dict, config_file: str | Path | dict | None = None, sets: list[str] = (),
                   flags: dict | None = None, command: str | None = None, api: bool = False) -> dict:
    """Apply the layers in order; unknown keys are errors naming the file or flag. ``config_file``
    may be a dict (the API's config); ``command`` picks its section of a recipe file."""
    cfg = copy.deepcopy(defaults)
    if isinstance(config_file, dict):
        _merge(cfg, _section(config_file, command), "config")
    elif config_file:
        path = Path(config_file)
        if not path.is_file():
            raise DfkdError(f"--config {path}: file not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise DfkdError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        except UnicodeDecodeError:
            raise DfkdError(f"--config {path}: not a text (YAML) file") from None
        if not isinstance(data, dict):
            raise DfkdError(f"--config {path}: expected a mapping of config keys")
        _merge(cfg, _section(data, command), f"--config {path}")
    for item in sets:
        _merge(cfg, parse_set(item), f"--set {item}")
    for key, value in (flags or {}).items():
        if value is not None:
            _merge(cfg, _nest(key, value), key if api else f"--{key.split('.')[-1].replace('_', '-')}")
    return cfg


def _section(data: dict, command: str | None) -> dict:
    """The keys of ``data`` for ``command``: its section if it has one, else the keys outside any
    command's section."""
    if command is not None and isinstance(data.get(command), dict):
        return data[command]
    return {k: v for k, v in data.items() if k not in COMMANDS}


def _nest(key: str, value: Any) -> dict:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value
