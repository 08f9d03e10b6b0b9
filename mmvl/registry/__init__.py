"""Registries mapping ``type=`` names in configs to classes: ``ENCODERS``, ``HEADS``, ``DATASETS``, ``TRANSFORMS``."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from mmvl.errors import RegistryError


class Registry:
    """A name -> class table filled by the ``@REGISTRY.register()`` decorator next to each class.

    ``locations`` are modules imported on the first lookup so that their decorators run; that keeps
    this package free of imports from ``mmvl.models`` and ``mmvl.data`` (dependencies point one way).
    """

    def __init__(self, name: str, locations: Iterable[str] = ()):
        self.name = name
        self._locations = tuple(locations)
        self._imported = False
        self._table: dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None, *aliases: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(obj: Callable[..., Any]) -> Callable[..., Any]:
            for key in (name or obj.__name__, *aliases):
                if key in self._table and self._table[key] is not obj:
                    raise RegistryError(
                        f"{self.name} registry: '{key}' is already registered to {self._table[key]!r}"
                    )
                self._table[key] = obj
            return obj

        return decorator

    def _import_locations(self) -> None:
        if not self._imported:
            self._imported = True
            for module in self._locations:
                importlib.import_module(module)

    def names(self) -> list[str]:
        self._import_locations()
        return sorted(self._table)

    def __contains__(self, name: str) -> bool:
        self._import_locations()
        return name in self._table

    def get(self, name: str) -> Callable[..., Any]:
        self._import_locations()
        if name not in self._table:
            close = difflib.get_close_matches(name, self._table, n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise RegistryError(
                f"unknown {self.name} type '{name}'.{hint} Registered {self.name} types: {', '.join(self.names())}"
            )
        return self._table[name]

    def build(self, cfg: Mapping[str, Any], **extra: Any) -> Any:
        """Build ``cfg["type"]`` with the other keys (and ``extra``) as keyword arguments."""
        return build(cfg, self, **extra)

    def __repr__(self) -> str:
        return f"Registry({self.name!r}, {self.names()})"


def build(cfg: Mapping[str, Any], registry: Registry, **extra: Any) -> Any:
    """Build an object from a config dict holding ``type=`` and its keyword arguments."""
    if not isinstance(cfg, Mapping) or "type" not in cfg:
        raise RegistryError(f"a {registry.name} config must be a dict with a 'type' key, got {cfg!r}")
    kwargs = {k: v for k, v in cfg.items() if k != "type"}
    kwargs.update(extra)
    cls = registry.get(cfg["type"])
    try:
        return cls(**kwargs)
    except TypeError as err:
        # A misspelt argument name is the usual cause; say which type and which keys were given.
        raise RegistryError(
            f"cannot build {registry.name} '{cfg['type']}' with arguments {sorted(kwargs)}: {err}"
        ) from err


ENCODERS = Registry("encoder", locations=["mmvl.models.encoders"])
HEADS = Registry("head", locations=["mmvl.models.heads"])
DATASETS = Registry("dataset", locations=["mmvl.data.datasets", "mmvl.data.shards"])
TRANSFORMS = Registry("transform", locations=["mmvl.data.transforms"])

__all__ = ["Registry", "build", "ENCODERS", "HEADS", "DATASETS", "TRANSFORMS"]
