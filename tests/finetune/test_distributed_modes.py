"""Fine-tuning on 2 ranks (gloo, CPU, one torchrun launch for every 2-rank run; issue 19, "exact resume and the
distributed path work in every mode"):

- ``linear`` (frozen encoder, no DDP bucket for it) and ``lora`` (peft-wrapped projections, frozen base weights
  inside FSDP2 units that also hold the adapters): DDP and FSDP runs of 2 ranks x batch 4 end at the weights,
  Adam moments and validation metrics of 1 process x batch 8, with every frozen tensor bitwise equal;
- ``lora+head`` with dropout, gradient accumulation and layer decay: a 2-rank run stopped after 2 steps and
  resumed on 2 ranks ends bitwise where the uninterrupted 2-rank run does, under DDP (with
  ``find_unused_parameters``) and FSDP; and a 1-process LoRA run continues on 2 FSDP ranks (its optimizer state
  keyed by position, FSDP's by name).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mmvl.engine.checkpoint import load_checkpoint
from mmvl.engine.trainer import Trainer
from mmvl.utils import read_jsonl
from tests.conftest import REPO
from tests.engine.test_crash_safety import assert_same_training_state
from tests.engine.test_distributed import torchrun
from tests.finetune.conftest import finetune_config

pytestmark = pytest.mark.slow  # one torchrun launch of 2 processes (~10 s of imports each) and 14 short runs

STEPS = 3
# float32 gradients of 2 x 4 rows averaged against 8 rows summed differ by rounding (~1e-7 relative); Adam turns
# each into an update of about lr (1e-3) per element, so after 3 steps the weights agree to ~1e-9 (measured 8e-9)
ATOL = 1e-6
COMPARED = ["train.val_interval=1000", f"train.ckpt_interval={STEPS}", f"train.max_steps={STEPS}",
            "optim.min_lr_ratio=1.0"]  # a constant rate: a run of 2 steps is the first 2 of a run of 3
MODE_OPTIONS = {"linear": ["model.mode=linear", "model.lora=None"], "lora": ["model.mode=lora"]}
RESUMED = ["model.mode=lora+head", "train.ckpt_interval=2", "train.val_interval=1000", "optim.layer_decay=0.7",
           "optim.encoder_lr_mult=0.5", "optim.warmup_steps=1", "train.accum_steps=2", "model.heads.0.dropout=0.1",
           "model.lora.dropout=0.1"]  # dropout: every rank's random stream must resume too
STRATEGY_OPTIONS = {"ddp": ["train.strategy=ddp", "train.find_unused_parameters=True"],
                    "fsdp": ["train.strategy=fsdp"]}


@pytest.fixture(scope="module")
def runs(synthetic_cxr, tmp_path_factory) -> dict:
    """The 1-process runs (batch 8) in this process, then every 2-rank run (batch 4) in one torchrun launch
    (tests/finetune/dist_modes_worker.py): ``{"out": folder, mode: (initial weights, trainable names)}``."""
    out = tmp_path_factory.mktemp("finetune_2ranks")
    result: dict = {"out": out}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_thread fixture, for this module's runs
    try:
        for mode, options in MODE_OPTIONS.items():
            trainer = Trainer(finetune_config("cls_vit_cxr_tiny", synthetic_cxr, "train.batch_size=8", *options,
                                              *COMPARED), out / f"one_{mode}")
            result[mode] = ({key: value.clone() for key, value in trainer.model.state_dict().items()},
                            {name for name, param in trainer.model.named_parameters() if param.requires_grad})
            trainer.fit()
        # 2 of the 3 LoRA steps in one process: the last one on 2 FSDP ranks (positional optimizer state -> FSDP's)
        Trainer(finetune_config("cls_vit_cxr_tiny", synthetic_cxr, "train.batch_size=8", *MODE_OPTIONS["lora"],
                                *COMPARED, "train.max_steps=2"), out / "one_then_fsdp").fit()
    finally:
        torch.set_num_threads(threads)
    jobs = []

    def job(name: str, *options: str, resume_override: list[str] | None = None) -> None:
        config = out / f"{name}.py"
        if resume_override is None:
            finetune_config("cls_vit_cxr_tiny", synthetic_cxr, "train.batch_size=4", *options).dump(config)
        jobs.append({"config": str(config), "work_dir": str(out / name), "resume_override": resume_override})

    for strategy in ("ddp", "fsdp"):
        for mode, options in MODE_OPTIONS.items():
            job(f"{strategy}_{mode}", *options, *COMPARED, f"train.strategy={strategy}")
        job(f"{strategy}_straight", *RESUMED, *STRATEGY_OPTIONS[strategy], "train.max_steps=4")
        job(f"{strategy}_resumed", *RESUMED, *STRATEGY_OPTIONS[strategy], "train.max_steps=2")
        job(f"{strategy}_resumed", resume_override=["train.max_steps=4"])
    jobs.append({"config": str(out / "one_then_fsdp" / "config.py"), "work_dir": str(out / "one_then_fsdp"),
                 "resume_override": ["train.strategy=fsdp", "train.batch_size=4", f"train.max_steps={STEPS}"]})
    (out / "jobs.json").write_text(json.dumps(jobs))
    torchrun(str(REPO / "tests" / "finetune" / "dist_modes_worker.py"), str(out))
    return result


def _moments(optimizer_state: dict) -> list[dict[str, torch.Tensor]]:
    """Adam's per-parameter state in parameter order (a 1-process state is keyed by index, FSDP's by name)."""
    keys = [key for group in optimizer_state["param_groups"] for key in group["params"]]
    return [optimizer_state["state"][key] for key in keys]


def _validation(work_dir: Path) -> dict[str, float]:
    record = next(record for record in read_jsonl(work_dir / "metrics.jsonl") if "val/loss" in record)
    return {key: value for key, value in record.items() if key.startswith("val/")}


def _assert_equal_runs(one: dict, two: dict, trainable: set[str], what: str) -> None:
    """Trained tensors and Adam moments within rounding; frozen tensors bitwise equal."""
    assert set(two["model"]) == set(one["model"]), what
    for key, value in one["model"].items():
        if key in trainable:
            torch.testing.assert_close(two["model"][key], value, rtol=1e-5, atol=ATOL,
                                       msg=lambda m, k=key: f"{what} {k}: {m}")
        else:
            assert torch.equal(two["model"][key], value), (what, key)
    moments = list(zip(_moments(one["optimizer"]), _moments(two["optimizer"]), strict=True))
    assert len(moments) == len(trainable), what
    for single, sharded in moments:
        for name in ("exp_avg", "exp_avg_sq"):  # rounding is relative to the largest terms summed: the
            scale = single[name].abs().max().item()  # tensor's largest element (measured: below 1e-6 of it)
            torch.testing.assert_close(sharded[name], single[name], rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("mode", ["linear", "lora"])
def test_two_ranks_equal_one_rank_with_the_same_global_batch(runs, mode):
    out, (initial, trainable) = runs["out"], runs[mode]
    one = load_checkpoint(out / f"one_{mode}" / "checkpoints" / "last.pt")
    moved = {key for key, value in one["model"].items() if not torch.equal(value, initial[key])}
    assert moved == trainable  # every trained tensor moved, nothing frozen did (LoRA: the base weights)
    assert all((one["model"][key] - initial[key]).abs().max() > 10 * ATOL for key in moved)  # above the tolerance
    for strategy in ("ddp", "fsdp"):
        two = load_checkpoint(out / f"{strategy}_{mode}" / "checkpoints" / "last.pt")
        assert two["world_size"] == 2 and two["step"] == STEPS
        _assert_equal_runs(one, two, trainable, f"{strategy} {mode}")
        # every rank validates the whole split with the same weights: the 1-process metrics
        val_one, val_two = _validation(out / f"one_{mode}"), _validation(out / f"{strategy}_{mode}")
        assert not math.isnan(val_one["val/cls/macro_auroc"])
        assert val_two == pytest.approx(val_one, rel=1e-4)
    if mode == "lora":  # a 1-process run continued on 2 FSDP ranks ends where the 1-process run does
        continued = load_checkpoint(out / "one_then_fsdp" / "checkpoints" / "last.pt")
        assert continued["world_size"] == 2 and continued["step"] == STEPS
        _assert_equal_runs(one, continued, trainable, "1 process then FSDP")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_rank_run_resumes_exactly_on_two_ranks(runs, strategy):
    two_ranks = runs["out"]
    straight = load_checkpoint(two_ranks / f"{strategy}_straight" / "checkpoints" / "last.pt")
    resumed = load_checkpoint(two_ranks / f"{strategy}_resumed" / "checkpoints" / "last.pt")
    assert straight["step"] == resumed["step"] == 4 and resumed["world_size"] == 2
    assert any("lora_B" in key for key in straight["model"])
    assert_same_training_state(straight, resumed)
    assert [(g["name"], g["lr"]) for g in straight["optimizer"]["param_groups"]] == \
        [(g["name"], g["lr"]) for g in resumed["optimizer"]["param_groups"]]
    assert len({g["lr_scale"] for g in straight["optimizer"]["param_groups"]}) > 2  # the layer-decayed groups
    losses = [[r["loss"] for r in read_jsonl(two_ranks / f"{strategy}_{run}" / "metrics.jsonl") if "loss" in r]
              for run in ("straight", "resumed")]
    assert len(losses[0]) == 4 and losses[0] == losses[1]

