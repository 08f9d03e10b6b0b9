"""What a run's checkpoint holds and how a run continues from one: the counters of a run (:class:`RunState`),
the work directory's rules (a fresh run never writes into another run's checkpoints), the comparison of the
config being resumed with the one the checkpoint was trained with, and the trimming of logs written after it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mmvl.config import Config
from mmvl.engine.checkpoint import load_checkpoint, load_newest_checkpoint
from mmvl.errors import CheckpointError, ConfigError
from mmvl.utils import atomic_write_text, get_logger, read_jsonl

logger = get_logger(__name__)

JSONL_LOGS = ("metrics.jsonl", "skipped.jsonl", "bad_steps.jsonl")
# What a fresh run writes into its work dir; leftovers of an earlier run that never reached a checkpoint are
# removed before a new one starts, so the two never mix. (data caches are content-keyed and kept.)
RUN_OUTPUTS = (*JSONL_LOGS, "train.log", "config.py", "preprocess.json", "tokenizer", "tensorboard", "plots", "vis")


@dataclass
class RunState:
    """The counters of a run, saved in every checkpoint and restored by ``--resume``."""

    step: int = 0
    epoch: int = 0
    epoch_samples: int = 0  # samples of this epoch consumed, all ranks together
    best_value: float | None = None
    bad_steps: int = 0  # consecutive non-finite steps
    skipped_steps: int = 0  # in the whole run: non-finite loss or gradient
    overflow_steps: int = 0  # fp16 steps skipped by the loss scaler, which then lowered the scale
    skipped_samples: int = 0
    skipped_indices: set[int] = field(default_factory=set)

    def to_dict(self) -> dict[str, Any]:
        state = asdict(self)
        state["skipped_indices"] = sorted(self.skipped_indices)
        return state

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> RunState:
        known = {f.name for f in fields(cls)}
        run = cls(**{key: value for key, value in state.items() if key in known})
        run.skipped_indices = set(run.skipped_indices)
        return run


# -- work directories ------------------------------------------------------------------------------------
def prepare_work_dir(work_dir: Path, resume: bool) -> bool:
    """Check ``work_dir`` for a fresh run or a resume; returns whether this call created it (so a failed start
    can remove it again). A fresh run into a work dir holding checkpoints is refused with the two ways out."""
    ckpt_dir = work_dir / "checkpoints"
    has_checkpoints = ckpt_dir.is_dir() and any(ckpt_dir.glob("*.pt"))
    if resume:
        if not has_checkpoints:
            raise CheckpointError(f"--resume: no checkpoint in {ckpt_dir}; start without --resume")
        return False
    if has_checkpoints:
        raise ConfigError(
            f"{work_dir} already holds the checkpoints of a run ({ckpt_dir}). Continue that run with "
            f"`python tools/train.py {work_dir / 'config.py'} --work-dir {work_dir} --resume`, or start a new "
            "run in another --work-dir (or delete this one)."
        )
    created = not work_dir.exists()
    leftovers = [work_dir / name for name in RUN_OUTPUTS if (work_dir / name).exists()]
    for path in leftovers:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if leftovers:
        logger.warning("removed the outputs of an earlier run in %s that wrote no checkpoint: %s", work_dir,
                       ", ".join(p.name for p in leftovers))
    work_dir.mkdir(parents=True, exist_ok=True)
    return created


def trim_logs(work_dir: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from, so none is counted twice (and a line torn by
    a crash)."""
    for name in JSONL_LOGS:
        path = work_dir / name
        if path.is_file():
            records = [record for record in read_jsonl(path) if record["step"] <= step]
            atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in records))


# -- config comparison on resume -------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def config_diff(saved: Any, current: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, saved value, current value)`` for every leaf that differs (a missing key is ``<unset>``)."""
    saved, current = _plain(saved), _plain(current)
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in list(saved) + [k for k in current if k not in saved]:
            path = f"{prefix}.{key}" if prefix else key
            out += config_diff(saved.get(key, _UNSET), current.get(key, _UNSET), path)
        return out
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        return [d for i, (a, b) in enumerate(zip(saved, current)) for d in config_diff(a, b, f"{prefix}.{i}")]
    return [] if saved == current else [(prefix, saved, current)]


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET = _Unset()


def override_keys(options: Iterable[str]) -> list[str]:
    keys = []
    for option in options:
        if "=" not in option:
            raise ConfigError(f"--resume-override expects key=value, got '{option}'")
        keys.append(option.split("=", 1)[0].strip())
    return keys


def check_resume_config(saved: Mapping[str, Any], current: Config, allowed: Iterable[str], checkpoint: Path) -> \
        list[tuple[str, Any, Any]]:
    """Refuse to resume with a config that differs from the checkpoint's, except in the keys ``allowed``
    (``--resume-override``) and below them; returns the allowed differences."""
    allowed = tuple(allowed)
    diff = config_diff(saved, current.to_dict())
    refused = [d for d in diff if not any(d[0] == key or d[0].startswith(key + ".") for key in allowed)]
    if refused:
        lines = "\n".join(f"  {key}: {old!r} (checkpoint) -> {new!r} (now)" for key, old, new in refused)
        example = " ".join(f"{key}={new!r}".replace("'", "") for key, _, new in refused[:2])
        raise ConfigError(
            f"--resume: the config differs from the one {checkpoint} was trained with:\n{lines}\n"
            f"Resume with the run's own config (WORK_DIR/config.py), or allow the change explicitly with "
            f"--resume-override {example}"
        )
    return diff


def load_resume_point(ckpt_dir: Path, strategy: Any) -> tuple[Path, dict[str, Any]]:
    """Rank 0 picks the newest good checkpoint (setting damaged ones aside); every rank loads what it picked."""
    picked = strategy.on_main(lambda: load_newest_checkpoint(ckpt_dir)[0])
    return picked, load_checkpoint(picked)


__all__ = ["RunState", "JSONL_LOGS", "prepare_work_dir", "trim_logs", "config_diff", "check_resume_config",
           "override_keys", "load_resume_point"]
