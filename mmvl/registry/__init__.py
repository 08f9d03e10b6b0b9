"""Registries mapping ``type=`` names in configs to classes: ``ENCODERS``, ``HEADS``, ``DATASETS``, ``TRANSFORMS``.

``Registry.check`` refuses a config dict whose keys its class does not take, before anything is built; ``build``
and the config check (:mod:`mmvl.config.validate`) both go through it, so both give the same message.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from mmvl.errors import ConfigError, RegistryError


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

    def check(self, cfg: Mapping[str, Any], where: str | None = None,
              provided: Iterable[str] = ()) -> Callable[..., Any]:
        """The class ``cfg["type"]`` names, once ``cfg`` is known to fit it; nothing is built.

        Every other key must be an argument of the class (:func:`accepted_arguments`) or in ``provided`` (what
        the caller adds itself, e.g. a head's ``image_dim``), and every argument without a default must be
        given. A class may define ``check_config(cfg, where)`` for what its signature cannot say (the fields of
        a nested ``config=dict(...)``). ``where`` is the dotted config key named in messages
        (``"model.image_encoder"``).
        """
        if not isinstance(cfg, Mapping) or "type" not in cfg:
            raise RegistryError(f"{where or 'a ' + self.name + ' config'} must be a dict with a 'type' key "
                                f"(one of: {', '.join(self.names())}), got {cfg!r}")
        name = cfg["type"]
        try:
            cls = self.get(name)
        except RegistryError as err:
            raise RegistryError(f"{where}.type: {err}" if where else str(err)) from None
        what = f"{self.name} '{name}'"
        prefix = f"{where}." if where else ""
        names, required = accepted_arguments(cls, cfg, where or what)
        provided = set(provided)
        given = set(cfg) - {"type"}
        if names is not None:
            for key in sorted(given - names - provided):
                raise ConfigError(unknown_key_message(f"{prefix}{key}", names | provided, what))
        knobs = getattr(cls, "config_knobs", {})
        for key in sorted(required - given - provided):
            knob = knobs.get(key)
            knob = knob if isinstance(knob, str) or knob is None else knob[0]
            hint = f" (or set the top-level {knob}=, which fills it)" if knob else ""
            raise ConfigError(f"{where or 'the config'}: {what} needs '{key}'{hint}")
        if hasattr(cls, "check_config"):
            cls.check_config(cfg, where or what)
        return cls

    def build(self, cfg: Mapping[str, Any], *, where: str | None = None, **extra: Any) -> Any:
        """Build ``cfg["type"]`` with the other keys (and ``extra``) as keyword arguments."""
        return build(cfg, self, where=where, **extra)

    def __repr__(self) -> str:
        return f"Registry({self.name!r}, {self.names()})"


def unknown_key_message(dotted: str, known: Iterable[str], what: str) -> str:
    """``unknown key 'data.manfest' in data. Did you mean 'manifest'? Known keys: ...``"""
    key = dotted.rsplit(".", 1)[-1]
    known = sorted(set(known))
    close = difflib.get_close_matches(key, known, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown key '{dotted}' in {what}.{hint} Known keys: {', '.join(known)}"


def accepted_arguments(cls: Callable[..., Any], cfg: Mapping[str, Any], where: str) -> tuple[set[str] | None,
                                                                                               set[str]]:
    """``(names, required)``: the keyword arguments ``cls(...)`` takes and those without a default.

    ``**kwargs`` of a subclass are followed into its parent's ``__init__`` (``super().__init__(**kwargs)``);
    a class whose ``**kwargs`` go elsewhere says where with a ``forwarded_kwargs(cfg, where)`` classmethod
    returning the names they accept (the timm encoder: those of the timm model class ``model_name`` names).
    ``names`` is ``None`` where that cannot be told (``**kwargs`` reaching a class outside mmvl).
    """
    names: set[str] = set()
    required: set[str] = set()
    if isinstance(cls, type):
        owners = [klass for klass in cls.__mro__ if "__init__" in vars(klass)]
    else:  # a registered function
        owners = [cls]
    for depth, owner in enumerate(owners):
        if not owner.__module__.startswith("mmvl.") and owner.__module__ != cls.__module__:
            return None, required
        parameters = list(inspect.signature(owner.__init__ if isinstance(owner, type) else owner).parameters.values())
        if isinstance(owner, type):
            parameters = parameters[1:]  # self
        forwards = False
        for param in parameters:
            if param.kind is param.VAR_KEYWORD:
                forwards = True
            elif param.kind is not param.VAR_POSITIONAL:
                names.add(param.name)
                if depth == 0 and param.default is param.empty:
                    required.add(param.name)
        if not forwards:
            return names, required
        if "forwarded_kwargs" in vars(owner):
            extra = cls.forwarded_kwargs(cfg, where)
            return (None if extra is None else names | set(extra)), required
    return None, required


def build(cfg: Mapping[str, Any], registry: Registry, *, where: str | None = None, **extra: Any) -> Any:
    """Build an object from a config dict holding ``type=`` and its keyword arguments, once
    :meth:`Registry.check` has found every key to be an argument of its class."""
    kwargs = {k: v for k, v in cfg.items() if k != "type"} if isinstance(cfg, Mapping) else {}
    kwargs.update(extra)
    cls = registry.check({**cfg, **extra} if isinstance(cfg, Mapping) else cfg, where)
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

__all__ = ["Registry", "accepted_arguments", "build", "unknown_key_message", "ENCODERS", "HEADS", "DATASETS",
           "TRANSFORMS"]
