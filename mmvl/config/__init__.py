"""Python config files with ``_base_`` inheritance, typed ``--cfg-options`` overrides and a re-loadable dump.

The format follows mmengine's: a config is a Python file whose top-level names (``model``, ``data``,
``train``, ``optim``...) are plain dicts and values; ``_base_ = ["../_base_/x.py"]`` merges the named
files first, dicts merging key by key; ``_delete_=True`` inside a dict replaces the base dict instead.
"""

from __future__ import annotations

import ast
import copy
import difflib
import os
import pprint
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mmvl.errors import ConfigError

BASE_KEY = "_base_"
DELETE_KEY = "_delete_"


class ConfigDict(dict):
    """A dict whose keys can also be read as attributes (``cfg.model.image_encoder.depth``)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        for key, value in self.items():
            super().__setitem__(key, _wrap(value))

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(_unknown_key_message(name, self, "config")) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, _wrap(value))

    def __deepcopy__(self, memo: dict) -> ConfigDict:
        return ConfigDict({k: copy.deepcopy(v, memo) for k, v in self.items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts and lists (what goes into checkpoints and JSON)."""
        return _unwrap(self)


def _wrap(value: Any) -> Any:
    if isinstance(value, dict) and not isinstance(value, ConfigDict):
        return ConfigDict(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def _unwrap(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    return value


def _unknown_key_message(key: str, mapping: Mapping, where: str) -> str:
    close = difflib.get_close_matches(str(key), [str(k) for k in mapping], n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown key '{key}' in {where}.{hint} Known keys: {', '.join(sorted(map(str, mapping)))}"


def merge(base: dict[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``child`` into a copy of ``base``: dicts recursively, everything else replaced."""
    merged = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, Mapping) and value.get(DELETE_KEY, False):
            merged[key] = {k: copy.deepcopy(v) for k, v in value.items() if k != DELETE_KEY}
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(dict(merged[key]), value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_file(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in chain:
        raise ConfigError(f"circular _base_ inheritance: {' -> '.join(map(str, (*chain, path)))}")
    namespace: dict[str, Any] = {"__file__": str(path), "__name__": "__mmvl_config__"}
    try:
        code = compile(path.read_text(), str(path), "exec")
        exec(code, namespace)  # configs are trusted Python, as in mmengine
    except SyntaxError as err:
        raise ConfigError(f"{path}: syntax error on line {err.lineno}: {err.msg}") from err
    values = {
        key: value
        for key, value in namespace.items()
        if not key.startswith("__")
        and not (key.startswith("_") and key != BASE_KEY)
        and not isinstance(value, types.ModuleType | types.FunctionType | type)
    }
    bases = values.pop(BASE_KEY, [])
    if isinstance(bases, str | os.PathLike):
        bases = [bases]
    merged: dict[str, Any] = {}
    for base in bases:
        merged = merge(merged, _read_file((path.parent / base).resolve(), (*chain, path)))
    return merge(merged, values)


def _parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if "," in text:  # a=1,2,3 without brackets
            return [_parse_value(part) for part in text.split(",")]
        return text


def _coerce(key: str, old: Any, new: Any) -> Any:
    """Keep the type the config declares: an int field accepts 3, a float field accepts 3 as 3.0."""
    if old is None or new is None:
        return new
    if isinstance(old, bool) or isinstance(new, bool):
        if isinstance(old, bool) and isinstance(new, bool):
            return new
    elif isinstance(old, float) and isinstance(new, int | float):
        return float(new)
    elif isinstance(old, int) and isinstance(new, int):
        return new
    elif isinstance(old, list | tuple) and isinstance(new, list | tuple):
        return type(old)(new)
    elif isinstance(old, str) and isinstance(new, str):
        return new
    elif isinstance(old, Mapping) and isinstance(new, Mapping):
        return new
    elif isinstance(old, list | tuple) and not isinstance(new, Mapping):
        return type(old)([new])
    raise ConfigError(
        f"--cfg-options {key}: expected a value of type {type(old).__name__} (current value {old!r}), got {new!r}"
    )


class Config(ConfigDict):
    """A merged config; ``Config.fromfile(path)`` reads it, ``dump`` writes a file that re-creates it."""

    filename: str | None = None

    @classmethod
    def fromfile(cls, path: str | os.PathLike) -> Config:
        """Read a config file; arguments that take their value from a size knob (``img_size``...) and are left
        out are filled from it (:func:`mmvl.config.validate.fill_knobs`)."""
        from mmvl.config.validate import fill_knobs

        cfg = cls(_read_file(Path(path).resolve(), ()))
        object.__setattr__(cfg, "filename", str(path))
        fill_knobs(cfg)  # disagreements are the config check's to refuse
        return cfg

    def merge_options(self, options: Iterable[str] | Mapping[str, Any]) -> Config:
        """Apply ``a.b.c=value`` overrides in place (strings are parsed as Python literals).

        A key must exist or be one the config check knows for its place (a ``train`` option, an argument of
        an encoder's class...: :func:`mmvl.config.validate.known_keys`); where the check does not know the
        keys, a new key gets in only inside a dict with ``type=``, and ``validate_config`` checks it after
        the merge. Setting a size knob (``img_size=448``) moves the arguments that follow it.
        """
        if isinstance(options, Mapping):
            items = [(k, v, False) for k, v in options.items()]
        else:
            items = []
            for option in options:
                if "=" not in option:
                    raise ConfigError(f"--cfg-options expects key=value, got '{option}'")
                key, text = option.split("=", 1)
                items.append((key.strip(), text, True))
        from mmvl.config.validate import KNOBS, follow_knob

        for key, value, from_text in items:
            old = self.get(key) if key in KNOBS else None
            self._set_path(key, _parse_value(value) if from_text else value)
            if key in KNOBS:
                follow_knob(self, key, old, self[key])
        return self

    def _set_path(self, dotted: str, value: Any) -> None:
        parts = dotted.split(".")
        node: Any = self
        for depth, part in enumerate(parts):
            where = ".".join(parts[:depth]) or "the config"
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--cfg-options {dotted}: '{where}' is a list of {len(node)}; bad index '{part}'")
                index: Any = int(part)
            elif isinstance(node, Mapping):
                index = part
                if part not in node:
                    from mmvl.config.validate import known_keys

                    known = known_keys(self, parts[:depth]) if last else None
                    if not (part in known if known is not None else last and "type" in node):
                        raise ConfigError(f"--cfg-options {dotted}: "
                                          + _unknown_key_message(part, {**dict.fromkeys(known or ()), **node}, where))
            else:
                raise ConfigError(f"--cfg-options {dotted}: '{where}' is {node!r}, not a dict or list")
            if last:
                old = node[index] if (isinstance(node, list) or index in node) else None
                node[index] = _wrap(_coerce(dotted, old, value))
            else:
                node = node[index]

    def pretty_text(self) -> str:
        header = "# Merged mmvl config" + (f" from {self.filename}" if self.filename else "") + "\n"
        body = "\n".join(
            f"{key} = {pprint.pformat(value, sort_dicts=False, width=100)}\n" for key, value in self.to_dict().items()
        )
        return header + body

    def dump(self, path: str | os.PathLike) -> Path:
        """Write the merged config as a Python file that ``Config.fromfile`` reads back identically."""
        from mmvl.utils import atomic_write_text

        path = Path(path)
        atomic_write_text(path, self.pretty_text())
        return path


__all__ = ["Config", "ConfigDict", "merge"]
