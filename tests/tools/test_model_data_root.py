"""tools/evaluate.py and tools/generate_reports.py read a manifest inside the data root the model was trained with
(``data.root`` of its config), unless ``--data-root`` / ``--allow-outside-root`` say otherwise."""

from __future__ import annotations

import json
import types

import pytest

from mmvl.errors import ConfigError
from tests.conftest import load_tool


def fake_model(config):
    """What the tools use of a LoadedModel before any image is read."""
    head = types.SimpleNamespace(max_length=16)
    return types.SimpleNamespace(config=config, source="work/checkpoints/best.pt", preprocess=types.SimpleNamespace(
        kind="2d"), model=types.SimpleNamespace(report_head=head))


@pytest.fixture
def layout(tmp_path):
    """A manifest in set/ whose images lie in images/, beside it: inside tmp_path, outside the manifest's folder."""
    manifest = tmp_path / "set" / "test.jsonl"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"image": "../images/a.dcm", "report": "FINDINGS: clear.", "split": "test"}) + "\n")
    return tmp_path, manifest


# tool name, the function it reads the manifest with, the arguments before the root options
TOOLS = [("evaluate", "load_splits", ["--task", "retrieval", "--manifest"]), ("generate_reports", "manifest_items",
                                                                             ["--manifest"])]


@pytest.mark.parametrize("name, reader, argv", TOOLS, ids=[tool[0] for tool in TOOLS])
def test_tools_take_the_trained_data_root(monkeypatch, capsys, layout, name, reader, argv):
    root, manifest = layout
    tool = load_tool(name)
    seen = []
    real = getattr(tool, reader)

    def read_then_stop(*args, **kwargs):  # the manifest was accepted: stop before any model runs
        seen.append({key: kwargs[key] for key in ("root", "allow_outside_root")})
        real(*args, **kwargs)
        raise ConfigError("read")

    monkeypatch.setattr(tool, reader, read_then_stop)

    def run(config, *options):
        monkeypatch.setattr(tool, "load_pretrained", lambda *args, **kwargs: fake_model(config))
        assert tool.main(["work", *argv, str(manifest), *options]) == 2
        return capsys.readouterr().err

    trained = {"data": {"root": str(root), "report_sections": ["findings"]}}
    assert run(trained) == "error: read\n"  # data.root of the model's training config
    assert seen[-1] == {"root": str(root), "allow_outside_root": False}
    err = run({"data": {"root": None}})  # None: the manifest's folder, which does not hold images/
    assert f"outside the data root {root / 'set'}" in err and f"such as {root / 'images'}" in err
    assert run({"data": {}}) != "error: read\n"  # a zoo config.json with no data.root: the same
    assert run({"data": {}}, "--data-root", str(root / "images")) == "error: read\n"
    assert seen[-1] == {"root": str(root / "images"), "allow_outside_root": False}
    assert run(trained, "--data-root", str(root / "set")) != "error: read\n"  # the flag overrides the model
    assert run({"data": {"root": None}}, "--allow-outside-root") == "error: read\n"
    assert seen[-1]["allow_outside_root"] is True
    assert "its recorded data.root / would let a manifest read" in run({"data": {"root": "/"}})
