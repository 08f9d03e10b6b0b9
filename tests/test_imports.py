"""The package's import structure: every module imports on its own (in a fork of an interpreter that has imported
only third-party packages), ``mmvl.inference`` and ``mmvl.zoo`` never import each other (both load models through
``mmvl.loading``), no import cycles, and every encoder and head ``type=`` name is registered by ``mmvl.models``
alone."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mmvl"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def imported_modules(name: str, toplevel_only: bool = False) -> set[str]:
    """The mmvl modules ``name`` imports, read with ``ast``: every import statement, inside functions too
    (``toplevel_only``: those that run when the module is imported). ``from package import sub`` counts as
    importing ``package.sub`` when that is a module."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    if toplevel_only:  # module body, and the bodies of top-level if/try blocks
        nodes = [node for statement in tree.body
                 for node in (ast.walk(statement) if isinstance(statement, (ast.If, ast.Try)) else [statement])]
    else:
        nodes = list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {module for module in found if module in MODULES and module != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# Third-party packages the zygote below imports before any mmvl module: a fork then imports one mmvl module on its
# own in ~0.1-1 s instead of a fresh interpreter's 3-5 s of torch/transformers imports (81 s for the package on 2
# cores). What the test checks is mmvl's own import order (a module that needs another imported first, a cycle, a
# name used at module level and never imported); preloading a third-party package changes none of that, and a
# missing one still fails in the child.
PRELOAD = ("numpy", "torch", "torchvision", "scipy", "sklearn", "PIL", "pydicom", "nibabel", "monai", "timm",
           "transformers", "tokenizers", "safetensors", "albumentations", "peft", "tqdm", "webdataset")
ZYGOTE = r"""
import importlib, json, os, sys, traceback
for package in sys.argv[2:]:
    try:
        importlib.import_module(package)
    except ImportError:
        pass  # a child that needs it fails, and says so
assert not [m for m in sys.modules if m == "mmvl" or m.startswith("mmvl.")], "the zygote imported mmvl"
failed = {}
for name in json.loads(sys.argv[1]):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: import one module, report, exit without running the parent's exit handlers
        os.close(read)
        try:
            importlib.import_module(name)
            code = 0
        except BaseException:
            os.write(write, traceback.format_exc()[-3000:].encode())
            code = 1
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        message = pipe.read()
    if os.waitpid(pid, 0)[1]:
        failed[name] = message.strip().splitlines()[-3:] or ["the child died without a traceback"]
print(json.dumps(failed))
"""


@pytest.mark.slow  # two zygote interpreters (torch, transformers... imported once each), one fork per module
def test_every_module_imports_alone():
    names = list(MODULES)
    halves = [json.dumps(names[0::2]), json.dumps(names[1::2])]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda chunk: run_python(ZYGOTE, chunk, *PRELOAD), halves))
    failed = {}
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
        failed.update(json.loads(result.stdout.strip().splitlines()[-1]))
    assert not failed, "modules that do not import on their own:\n" + json.dumps(failed, indent=2)


def test_a_module_that_needs_another_imported_first_fails_in_the_zygote(tmp_path):
    # the check above can fail: a module that uses a name it never imported (numpy, which the zygote preloaded), and
    # a package whose __init__ imports a module that imports the package's not-yet-defined name back (a cycle)
    for package, files in {"probe_plain": {"__init__.py": "", "c.py": "value = numpy.zeros(1)\n",
                                           "d.py": "import numpy\nvalue = numpy.zeros(1)\n"},
                           "probe_cycle": {"__init__.py": "from probe_cycle.b import B\nA = 1\n",
                                           "b.py": "from probe_cycle import A\nB = A\n"}}.items():
        (tmp_path / package).mkdir()
        for name, text in files.items():
            (tmp_path / package / name).write_text(text)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)}
    names = ["probe_plain.c", "probe_plain.d", "probe_cycle.b"]
    result = subprocess.run([sys.executable, "-c", ZYGOTE, json.dumps(names), "numpy"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    failed = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(failed) == ["probe_cycle.b", "probe_plain.c"], failed
    assert "NameError: name 'numpy' is not defined" in failed["probe_plain.c"][-1]
    assert "circular import" in failed["probe_cycle.b"][-1]


def test_inference_and_zoo_do_not_import_each_other():
    """At any level (function-local imports included): both load models through mmvl.loading instead."""
    inference = [module for module in MODULES if in_package(module, "mmvl.inference")]
    zoo = [module for module in MODULES if in_package(module, "mmvl.zoo")]
    assert inference and len(zoo) > 3
    for name in zoo:
        assert not [m for m in imported_modules(name) if in_package(m, "mmvl.inference")], name
    for name in inference:
        assert not [m for m in imported_modules(name) if in_package(m, "mmvl.zoo")], name
    for name in ("mmvl.loading", "mmvl.models", "mmvl.evaluation.zero_shot", "mmvl.data.inputs"):
        assert not [m for m in imported_modules(name) if in_package(m, "mmvl.zoo") or in_package(m, "mmvl.inference")]


def test_inference_and_zoo_do_not_load_each_other_at_run_time():
    code = ("import importlib, json, sys; importlib.import_module(sys.argv[1]); "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('mmvl'))))")
    for name, other in (("mmvl.inference", "mmvl.zoo"), ("mmvl.zoo", "mmvl.inference")):
        result = run_python(code, name)
        assert result.returncode == 0, result.stderr
        loaded = json.loads(result.stdout.strip().splitlines()[-1])
        assert "mmvl.loading" in loaded and not [m for m in loaded if in_package(m, other)], (name, loaded)


def test_no_import_cycles_between_modules():
    """Module-level imports form no cycle anywhere; with function-local imports counted too, none either (a
    function-local import is for a heavy optional third-party library, never to dodge a cycle)."""
    assert cycles({name: imported_modules(name, toplevel_only=True) for name in MODULES}) == []
    # mmvl.config imports its own validate module lazily and validate imports the config: theirs to untangle
    known = [["mmvl.config", "mmvl.config.validate"]]
    assert [c for c in cycles({name: imported_modules(name) for name in MODULES}) if c not in known] == []


REGISTRATION = re.compile(r"\b(ENCODERS|HEADS)\.register\(([^)]*)\)")
IMPORTERS = ("mmvl.zoo.open_clip_format", "mmvl.zoo.hf_text")  # they write mmvl model configs from others' models


def registered_names() -> dict[str, dict[str, str]]:
    """``{"ENCODERS": {name: file}, "HEADS": {...}}`` of every ``@ENCODERS.register(...)`` in the package."""
    names: dict[str, dict[str, str]] = {"ENCODERS": {}, "HEADS": {}}
    for name, path in MODULES.items():
        for registry, arguments in REGISTRATION.findall(path.read_text(encoding="utf-8")):
            for value in re.findall(r"""["'](\w+)["']""", arguments):
                names[registry][value] = name
    return names


def config_types(name: str) -> set[str]:
    """The ``type`` values of dict literals (``{"type": "bert"}``) and ``type=`` keywords in a module."""
    values = []
    for node in ast.walk(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Dict):
            values += [v for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant) and k.value == "type"]
        elif isinstance(node, ast.keyword) and node.arg == "type":
            values.append(node.value)
    return {n.value for value in values for n in ast.walk(value) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)}


def test_every_encoder_and_head_type_is_registered_by_mmvl_models():
    names = registered_names()
    assert {"vit2d", "bert", "open_clip", "open_clip_hf_text", "monai_vit"} <= set(names["ENCODERS"])
    assert {"clip", "siglip", "label_aware", "mae", "report_gen"} <= set(names["HEADS"])
    outside = {n: m for table in names.values() for n, m in table.items() if not in_package(m, "mmvl.models")}
    assert not outside, f"encoders/heads registered outside mmvl.models: {outside}"
    # the type= names the importers write into model configs (encoders, heads and pipeline steps)
    used = set().union(*(config_types(name) for name in IMPORTERS))
    assert {"vit2d", "bert", "open_clip_hf_text", "siglip", "clip", "LoadImage"} <= used
    code = ("import json, sys; import mmvl.models, mmvl.data.transforms; "
            "from mmvl.registry import ENCODERS, HEADS, TRANSFORMS; names = json.loads(sys.argv[1]); "
            "print(json.dumps({'missing_encoders': [n for n in names['ENCODERS'] if n not in ENCODERS], "
            "'missing_heads': [n for n in names['HEADS'] if n not in HEADS], "
            "'unknown_types': [n for n in names['used'] if not (n in ENCODERS or n in HEADS or n in TRANSFORMS)], "
            "'zoo_imported': [m for m in sys.modules if m.startswith('mmvl.zoo')]}))")
    result = run_python(code, json.dumps({**{k: sorted(v) for k, v in names.items()}, "used": sorted(used)}))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "missing_encoders": [], "missing_heads": [], "unknown_types": [], "zoo_imported": []}
