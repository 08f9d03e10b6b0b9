"""The library configures no logging at import; the tools' one helper, ``setup_logging``, is idempotent."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import pytest

from mmvl.utils import CONSOLE_HANDLER_NAME, setup_logging
from tests.conftest import REPO

IMPORT_EVERYTHING = textwrap.dedent("""
    import json, logging
    import mmvl, mmvl.models, mmvl.data, mmvl.engine.trainer, mmvl.zoo, mmvl.inference
    import mmvl.engine.plots
    package, root = logging.getLogger("mmvl"), logging.getLogger()
    print(json.dumps({"package": [type(h).__name__ for h in package.handlers], "package_level": package.level,
                      "propagate": package.propagate, "root": [type(h).__name__ for h in root.handlers]}))
""")


def test_import_adds_only_a_null_handler():
    """A fresh interpreter: pytest's own root handlers would hide a library that adds one."""
    done = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=True)
    state = json.loads(done.stdout.strip().splitlines()[-1])
    assert state == {"package": ["NullHandler"], "package_level": logging.NOTSET, "propagate": True, "root": []}
    assert done.stderr == ""  # nothing printed at import either


@pytest.fixture
def clean_logging():
    """No console handler yet (a tool run in-process earlier adds one); afterwards the root and ``mmvl`` loggers
    are put back as they were, pytest's capture handlers included."""
    root, package = logging.getLogger(), logging.getLogger("mmvl")
    saved = root.handlers[:], root.level, package.level
    root.handlers[:] = [h for h in root.handlers if h.get_name() != CONSOLE_HANDLER_NAME]
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    package.setLevel(saved[2])


def test_setup_logging_is_idempotent(clean_logging, capsys):
    root = logging.getLogger()
    before = len(root.handlers)
    first = setup_logging(level=logging.INFO)
    second = setup_logging(level=logging.DEBUG)
    assert second is first
    assert len(root.handlers) == before + 1
    assert [h.get_name() for h in root.handlers].count(CONSOLE_HANDLER_NAME) == 1
    assert logging.getLogger("mmvl").level == logging.DEBUG  # the second call changes the level only

    logging.getLogger("mmvl.engine.trainer").info("step %d done", 7)
    logging.getLogger("some.library").info("chatter")  # other libraries keep the root's WARNING
    err = capsys.readouterr().err  # the handler writes to the sys.stderr of the moment, here capsys's
    lines = [line for line in err.splitlines() if line]
    assert len(lines) == 1
    assert lines[0].endswith(" INFO mmvl.engine.trainer: step 7 done")
    assert lines[0][:4].isdigit()  # "%(asctime)s ..." first
