from __future__ import annotations

import pytest

from mmvl.errors import ConfigError, RegistryError
from mmvl.registry import ENCODERS, HEADS, TRANSFORMS, Registry, build


def test_register_build_and_aliases():
    registry = Registry("widget")

    @registry.register("square", "sq")
    class Square:
        def __init__(self, side: int):
            self.side = side

    assert registry.get("sq") is Square
    assert build(dict(type="square", side=3), registry).side == 3
    assert registry.build(dict(type="sq"), side=4).side == 4
    assert registry.names() == ["sq", "square"]


def test_unknown_type_lists_registered_names():
    with pytest.raises(RegistryError) as err:
        ENCODERS.get("vit2")
    message = str(err.value)
    assert "unknown encoder type 'vit2'" in message and "Did you mean 'vit2d'" in message
    assert "bert" in message and "swin2d" in message


def test_bad_arguments_and_missing_type():
    # build() refuses a misspelt key before constructing anything, with the config check's message
    with pytest.raises(ConfigError, match=r"unknown key 'meen' in transform 'Normalize'\. Did you mean 'mean'"):
        TRANSFORMS.build(dict(type="Normalize", meen=0.5))
    with pytest.raises(ConfigError, match=r"unknown key 'model\.image_encoder\.dpeth' in encoder 'vit2d'"):
        ENCODERS.build(dict(type="vit2d", dpeth=2), where="model.image_encoder")
    with pytest.raises(RegistryError, match="'type' key"):
        build(dict(mean=0.5), TRANSFORMS)


def test_duplicate_name_refused():
    registry = Registry("widget")
    registry.register("a")(int)
    with pytest.raises(RegistryError, match="already registered"):
        registry.register("a")(float)


def test_shipped_registries_are_populated_lazily():
    assert {"vit2d", "swin2d", "bert"} <= set(ENCODERS.names())
    assert "clip" in HEADS.names()
    assert {"LoadImage", "ResizePad", "RandomAugment2D", "Normalize"} <= set(TRANSFORMS.names())
