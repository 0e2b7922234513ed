"""Config layering: defaults in code -> ``--config FILE.yaml`` -> ``--set key=value`` -> flags."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from .errors import DfkdError


OPEN = "objective"  # a section whose keys belong to the chosen objective, checked by it


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


def as_config(cls: type, value: Any, where: str = "config") -> Any:
    """``value`` as the typed config ``cls`` (a dataclass): itself, or a plain dict of some of its
    keys (the rest at their defaults; an unknown key or a wrong type is one line naming it)."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise DfkdError(f"{where}: expected a {cls.__name__} or a dict of its keys, got {type(value).__name__}")
    from dataclasses import asdict

    base = asdict(cls())
    _merge(base, copy.deepcopy(value), where)
    return cls(**base)


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


def resolve_config(defaults: dict, config_file: str | Path | None = None, sets: list[str] = (),
                   flags: dict | None = None) -> dict:
    """Apply the layers in order; unknown keys are errors naming the file or flag."""
    cfg = copy.deepcopy(defaults)
    if config_file:
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
        _merge(cfg, data, f"--config {path}")
    for item in sets:
        _merge(cfg, parse_set(item), f"--set {item}")
    for key, value in (flags or {}).items():
        if value is not None:
            _merge(cfg, _nest(key, value), f"--{key.split('.')[-1].replace('_', '-')}")
    return cfg


def _nest(key: str, value: Any) -> dict:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value
