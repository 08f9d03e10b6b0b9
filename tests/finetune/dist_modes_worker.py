"""Run under ``torchrun --nproc-per-node 2`` by tests/finetune/test_distributed_modes.py: the fine-tuning runs of
``OUT_DIR/jobs.json`` one after another in this process (one launch instead of one per run: each launch spends
seconds importing), each a :class:`~mmvl.engine.trainer.Trainer` on 2 ranks (gloo, CPU).

A job is ``{"config": CONFIG_PY, "work_dir": DIR, "resume_override": [...] or null}``; with ``resume_override``
it resumes ``work_dir`` with those overrides. ``python dist_worker.py OUT_DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from mmvl.config import Config
from mmvl.engine.dist import init_distributed, shutdown_distributed
from mmvl.engine.trainer import Trainer


def main(out: Path) -> None:
    init_distributed("gloo")
    for job in json.loads((out / "jobs.json").read_text()):
        override = job.get("resume_override")
        Trainer(Config.fromfile(job["config"]), Path(job["work_dir"]), resume=override is not None,
                resume_override=override or ()).fit()
    shutdown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
