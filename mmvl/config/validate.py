"""The check of a whole training config before any expensive work, and the size knobs that fill it.

``validate_config(cfg)`` refuses, naming the dotted key, the closest known name and the known names: unknown
top-level names, unknown keys of ``train``/``data``/``optim`` (:mod:`mmvl.config.schema`), keys of every
``type=`` dict (encoders, heads, pipeline steps) that its class does not take (``Registry.check``, the same
check ``build`` makes), tokenizer recipes, sizes that disagree with their knob, and a warmup that never ends.
Nothing is built and no data is read.

The knobs (``img_size`` in 2D; ``volume_size``, ``spacing``, ``hu_window`` in 3D) are top-level values that the
arguments a class lists in its ``config_knobs`` take (the image encoder's ``img_size``, ``ResizePad``'s and
``CropOrPad``'s ``size``, ``Resample``'s ``spacing``, ``IntensityWindow``'s ``low``/``high``):
:func:`resolve_config` fills those that are left out and refuses those that are given and differ, so one
``--cfg-options img_size=448`` sizes the model and both pipelines together. ``Config.fromfile`` fills them as it
loads (:func:`fill_knobs`) and ``Config.merge_options`` moves the arguments that follow a knob with it
(:func:`follow_knob`), so code that reads a loaded config sees the sizes it will train with.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import Any

from mmvl.config import Config
from mmvl.config.schema import (
    CACHE_KINDS,
    DATA_DEFAULTS,
    DATA_TYPES,
    KNOBS,
    ON_ERROR,
    OPTIM_DEFAULTS,
    OPTIM_TYPES,
    REPORT_AUGMENT_DEFAULTS,
    REPORT_TRUNCATIONS,
    SECTIONS,
    TRAIN_DEFAULTS,
    VIEW_POLICIES,
)
from mmvl.errors import ConfigError, RegistryError
from mmvl.registry import ENCODERS, HEADS, TRANSFORMS, Registry, accepted_arguments, unknown_key_message

SECTION_DEFAULTS = {"train": TRAIN_DEFAULTS, "data": DATA_DEFAULTS, "optim": OPTIM_DEFAULTS}
PIPELINES = ("train_pipeline", "eval_pipeline")
# What the model builder (mmvl.models.vlm) gives each head besides its config: the encoders' widths and the
# image encoder, and what it takes out of the head config itself (the log name and the loss weight).
HEAD_BUILDER_KEYS = ("image_dim", "text_dim", "image_encoder", "name", "loss_weight")
# Arguments of train_wordpiece_tokenizer that the trainer passes itself.
TOKENIZER_TRAINER_ARGS = ("texts", "out_dir")


# -- where the type= dicts are ------------------------------------------------------------------------------------
def registered_dicts(cfg: Mapping[str, Any]) -> Iterator[tuple[str, Any, Registry, tuple[str, ...]]]:
    """``(dotted key, dict, registry, keys the builder provides)`` of every ``type=`` dict the trainer builds:
    the encoders, each head and each step of both pipelines."""
    model = cfg.get("model")
    if isinstance(model, Mapping):
        for key in ("image_encoder", "text_encoder"):
            if model.get(key) is not None:
                yield f"model.{key}", model[key], ENCODERS, ()
        heads = model.get("heads")
        if isinstance(heads, Mapping):
            yield "model.heads", heads, HEADS, HEAD_BUILDER_KEYS
        elif isinstance(heads, Sequence) and not isinstance(heads, str):
            for index, head in enumerate(heads):
                yield f"model.heads.{index}", head, HEADS, HEAD_BUILDER_KEYS
    data = cfg.get("data")
    if isinstance(data, Mapping):
        for name in PIPELINES:
            steps = data.get(name)
            if isinstance(steps, Sequence) and not isinstance(steps, str):
                for index, step in enumerate(steps):
                    yield f"data.{name}.{index}", step, TRANSFORMS, ()


def _class_of(node: Any, registry: Registry) -> Any:
    """The registered class of a ``type=`` dict, or None (not a dict, no type, unknown type: the check says so)."""
    if not isinstance(node, Mapping) or not isinstance(node.get("type"), str):
        return None
    try:
        return registry.get(node["type"])
    except RegistryError:
        return None


# -- the knobs ----------------------------------------------------------------------------------------------------
def knob_fields(cfg: Mapping[str, Any]) -> Iterator[tuple[str, MutableMapping, str, str, int | None]]:
    """``(dotted key, dict, argument, knob, index)`` of every argument that takes its value from a knob (the
    class's ``config_knobs``); ``index`` picks one element of the knob (``hu_window[0]`` for ``low``)."""
    for where, node, registry, _ in registered_dicts(cfg):
        cls = _class_of(node, registry)
        for argument, target in getattr(cls, "config_knobs", {}).items():
            knob, index = (target, None) if isinstance(target, str) else target
            yield f"{where}.{argument}", node, argument, knob, index


def _knob_value(cfg: Mapping[str, Any], knob: str, index: int | None) -> Any:
    value = cfg.get(knob)
    if value is None or index is None:
        return value
    return value[index]


def _same(a: Any, b: Any) -> bool:
    """Equal as config values: lists and tuples alike, ``64 == 64.0``."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def fill_knobs(cfg: MutableMapping[str, Any]) -> list[tuple[str, Any, str, Any]]:
    """Fill, in place, every knob argument left out from its knob (where the knob is set). Returns the arguments
    that are given and differ from it: ``(dotted key, value, knob expression, knob value)``."""
    if not any(cfg.get(knob) is not None for knob in KNOBS):
        return []  # nothing to fill: spare the registry imports
    disagreements = []
    for dotted, node, argument, knob, index in knob_fields(cfg):
        expected = _knob_value(cfg, knob, index)
        if expected is None:
            continue
        if argument not in node:
            node[argument] = expected
        elif not _same(node[argument], expected):
            disagreements.append((dotted, node[argument], knob if index is None else f"{knob}[{index}]", expected))
    return disagreements


def follow_knob(cfg: MutableMapping[str, Any], knob: str, old: Any, new: Any) -> None:
    """``--cfg-options knob=new``: the arguments that followed the knob (left out, or equal to its old value)
    take the new value; those that were given otherwise stay, and the check refuses them."""
    if old is None and new is None:
        return
    for _, node, argument, name, index in knob_fields(cfg):
        if name != knob:
            continue
        before = None if old is None else (old if index is None else old[index])
        if argument not in node or (before is not None and _same(node[argument], before)):
            node[argument] = new if (index is None or new is None) else new[index]
            if node[argument] is None:
                del node[argument]


def resolve_config(cfg: Mapping[str, Any]) -> Config:
    """A copy of ``cfg`` with every knob argument filled from its knob: the config to check, dump and train
    with. An argument given with a value other than its knob's is refused, naming both."""
    resolved = Config(Config(cfg).to_dict())
    object.__setattr__(resolved, "filename", getattr(cfg, "filename", None))
    for dotted, value, knob, expected in fill_knobs(resolved):
        base = knob.split("[")[0]
        raise ConfigError(
            f"{dotted}={value!r} disagrees with {knob}={expected!r}. The size settings are set once, at the top "
            f"level: set {base}=... (it fills {dotted} and the matching steps of both pipelines) and leave "
            f"{dotted} out of the config"
        )
    used = {knob for _, _, _, knob, _ in knob_fields(resolved)}
    for knob in KNOBS:
        if resolved.get(knob) is not None and knob not in used:
            takers = sorted({f"{getattr(cls, '__name__', cls)}.{argument}" for registry in (ENCODERS, TRANSFORMS, HEADS)
                             for cls in map(registry.get, registry.names())
                             for argument, target in getattr(cls, "config_knobs", {}).items()
                             if (target if isinstance(target, str) else target[0]) == knob})
            raise ConfigError(f"{knob}={resolved[knob]!r} is set but nothing in this config takes it (it fills "
                              f"{', '.join(takers)}); remove it or set the knob this config's encoder and "
                              "pipelines use")
    return resolved


# -- the check ----------------------------------------------------------------------------------------------------
def known_keys(cfg: Mapping[str, Any], path: Sequence[str]) -> set[str] | None:
    """The keys the dict at ``path`` (``("data",)``, ``("model", "image_encoder")``) may hold, or None where this
    check does not know them. ``Config.merge_options`` lets a new key in only where it is known."""
    path = tuple(path)
    if not path:
        return set(SECTIONS) | set(KNOBS)
    if len(path) == 1 and path[0] in SECTION_DEFAULTS:
        return set(SECTION_DEFAULTS[path[0]])
    if path == ("model",):
        return _model_keys()
    dotted = ".".join(path)
    for where, node, registry, provided in registered_dicts(cfg):
        if where == dotted:
            cls = _class_of(node, registry)
            if cls is None:
                return None
            names, _ = accepted_arguments(cls, node, where)
            return None if names is None else names | set(provided) | {"type"}
    if path[0] == "model" and path[-1] == "tokenizer":
        return _tokenizer_keys()
    return None


def _model_keys() -> set[str]:
    from mmvl.models.vlm import VisionLanguageModel

    return set(inspect.signature(VisionLanguageModel).parameters) | {"type"}


def _tokenizer_keys() -> set[str]:
    from mmvl.data.tokenizer import train_wordpiece_tokenizer

    return (set(inspect.signature(train_wordpiece_tokenizer).parameters) - set(TOKENIZER_TRAINER_ARGS)) | {"type"}


def _check_keys(mapping: Mapping[str, Any], known: set[str], where: str, what: str) -> None:
    for key in mapping:
        if key not in known:
            dotted = f"{where}.{key}" if where else str(key)
            raise ConfigError(unknown_key_message(dotted, known, what))


def _check_choice(section: Mapping[str, Any], key: str, choices: Sequence[str], where: str,
                  any_case: bool = False) -> None:
    value = section.get(key, choices[0])
    if (value.lower() if any_case and isinstance(value, str) else value) not in choices:
        names = [c for c in choices if isinstance(c, str)]
        close = difflib.get_close_matches(value, names, n=1) if isinstance(value, str) else []
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where}.{key}={value!r} is not one of {', '.join(repr(c) for c in choices)}.{hint}")


def _check_data(data: Mapping[str, Any]) -> None:
    _check_choice(data, "type", DATA_TYPES, "data")
    # values ManifestDataset would refuse with a plain ValueError deep in the build: named here, before the work dir
    _check_choice(data, "view_policy", VIEW_POLICIES, "data")
    _check_choice(data, "on_error", ON_ERROR, "data")
    _check_choice(data, "cache", CACHE_KINDS, "data")
    _check_choice(data, "report_truncation", REPORT_TRUNCATIONS, "data")
    _check_report_augment(data.get("report_augment"))
    for name in PIPELINES:
        steps = data.get(name)
        if not isinstance(steps, Sequence) or isinstance(steps, str) or not steps:
            raise ConfigError(f"data.{name} must be a non-empty list of dict(type=...) steps, got {steps!r} "
                              "(see configs/_base_/datasets/)")


def _check_report_augment(augment: Any) -> None:
    if augment is None:
        return
    if not isinstance(augment, Mapping):
        raise ConfigError(f"data.report_augment must be None or dict(shuffle=..., drop=...), got {augment!r}")
    _check_keys(augment, set(REPORT_AUGMENT_DEFAULTS), "data.report_augment", "report augmentation")
    shuffle, drop = ({**REPORT_AUGMENT_DEFAULTS, **augment}[key] for key in ("shuffle", "drop"))
    if not isinstance(shuffle, bool):
        raise ConfigError(f"data.report_augment.shuffle must be True or False, got {shuffle!r}")
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0.0 <= drop < 1.0:
        raise ConfigError(f"data.report_augment.drop must be a number in [0, 1) (the probability of leaving a "
                          f"sentence out), got {drop!r}")


def _check_model(model: Mapping[str, Any]) -> None:
    from mmvl.models.finetune import check_mode

    _check_keys(model, _model_keys(), "model", "model")
    check_mode(model.get("mode", "full"), model.get("lora"))
    if model.get("init_from") is not None and not isinstance(model["init_from"], str):
        raise ConfigError(f"model.init_from must be a work dir, checkpoint or zoo entry (folder or name), got "
                          f"{model['init_from']!r}")
    if not model.get("image_encoder"):
        raise ConfigError("model.image_encoder is not set: give dict(type='vit2d', ...) (see configs/_base_/models/)")
    if not model.get("heads"):
        raise ConfigError("model.heads is empty: add at least one head, e.g. dict(type='clip', embed_dim=512)")
    recipes = [(where, node["tokenizer"]) for where, node, _, _ in registered_dicts({"model": model})
               if isinstance(node, Mapping) and isinstance(node.get("tokenizer"), Mapping)]
    for where, recipe in recipes:
        _check_keys(recipe, _tokenizer_keys(), f"{where}.tokenizer", "a tokenizer recipe (train_wordpiece_tokenizer)")
        if recipe.get("type", "wordpiece") != "wordpiece":
            raise ConfigError(f"{where}.tokenizer.type={recipe['type']!r}: the trainer builds 'wordpiece' "
                              "vocabularies only; give dict(type='wordpiece', ...) or a tokenizer directory")
    text = model.get("text_encoder")
    shared = [(where, recipe) for where, recipe in recipes
              if not (where == "model.text_encoder" and isinstance(text, Mapping) and text.get("pretrained"))]
    for where, recipe in shared[1:]:  # the trainer trains one vocabulary, from the first recipe, for all of them
        if dict(recipe) != dict(shared[0][1]):
            raise ConfigError(f"{where}.tokenizer={dict(recipe)} differs from {shared[0][0]}.tokenizer="
                              f"{dict(shared[0][1])}: the trainer trains one WordPiece vocabulary for both; make "
                              "them equal")


def _check_schedule(cfg: Mapping[str, Any]) -> None:
    train = {**TRAIN_DEFAULTS, **cfg.get("train", {})}
    optim = {**OPTIM_DEFAULTS, **cfg.get("optim", {})}
    max_steps, warmup = train["max_steps"], optim["warmup_steps"]
    for key, value in (("train.max_steps", max_steps), ("optim.warmup_steps", warmup)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{key} must be a whole number >= 0, got {value!r}")
    if warmup > 0 and warmup >= max_steps:
        raise ConfigError(
            f"optim.warmup_steps={warmup} >= train.max_steps={max_steps}: the learning rate would still be warming "
            f"up when training stops. Set optim.warmup_steps below {max_steps} (e.g. "
            f"optim.warmup_steps={max_steps // 10}) or raise train.max_steps"
        )


def validate_config(cfg: Mapping[str, Any]) -> Config:
    """Check the merged config (after ``--cfg-options``) and return it resolved (:func:`resolve_config`): the
    config to dump and train with. Raises :class:`ConfigError` naming the dotted key and the fix."""
    resolved = resolve_config(cfg)
    _check_keys(resolved, set(SECTIONS) | set(KNOBS), "", "the config's top level")
    for name in ("model", "data"):
        if name not in resolved:
            raise ConfigError(f"the config defines no '{name}' (a training config has model, data, train and optim; "
                              "see configs/)")
    for name, defaults in SECTION_DEFAULTS.items():
        section = resolved.get(name, {})
        if not isinstance(section, Mapping):
            raise ConfigError(f"{name} must be a dict, got {section!r}")
        _check_keys(section, set(defaults), name, name)
    _check_choice(resolved.get("optim", {}), "type", OPTIM_TYPES, "optim", any_case=True)  # as build_optimizer
    _check_data(resolved["data"])
    if not isinstance(resolved["model"], Mapping):
        raise ConfigError(f"model must be a dict, got {resolved['model']!r}")
    _check_model(resolved["model"])
    heads = resolved["model"].get("heads") or []
    reads_reports = bool(resolved["model"].get("text_encoder")) or any(
        isinstance(head, Mapping) and head.get("type") in ("report_gen", "report") for head in heads)
    if resolved["data"].get("report_augment") is not None and not reads_reports:
        raise ConfigError("data.report_augment is set but this model reads no report (no model.text_encoder, no "
                          "report_gen head): remove it, or set data.report_augment=None")
    for where, node, registry, provided in registered_dicts(resolved):
        registry.check(node, where, provided)
    _check_schedule(resolved)
    return resolved


__all__ = ["fill_knobs", "follow_knob", "known_keys", "knob_fields", "resolve_config", "validate_config"]
