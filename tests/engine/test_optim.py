"""AdamW parameter groups (issue 22, part 4): weight matrices decay, gains and biases do not (unless asked), the
contrastive heads' learned logit scale and bias train at ``optim.scalar_lr`` without decay; a resume restores
the groups exactly."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from mmvl.config import Config
from mmvl.config.validate import validate_config
from mmvl.engine.checkpoint import checksum_path, load_checkpoint
from mmvl.engine.optim import build_optimizer, parameter_groups
from mmvl.engine.trainer import Trainer
from mmvl.errors import ConfigError
from mmvl.models.encoders.base import EncoderOutput
from mmvl.models.heads import ContrastiveHead, SigLipHead
from tests.engine.test_contrastive_variants import REPO, TINIER
from tests.engine.test_crash_safety import assert_same_training_state


class ToyModel(nn.Module):
    """An encoder (linear with bias, layer norm, a position table), a frozen layer and a SigLIP head."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8))
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 8))
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.heads = nn.ModuleDict({"siglip": SigLipHead(image_dim=8, text_dim=8, embed_dim=4)})


def group_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, list[str]]:
    names = {id(param): name for name, param in model.named_parameters()}
    return {group["name"]: [names[id(param)] for param in group["params"]] for group in optimizer.param_groups}


def test_groups_hold_exactly_the_expected_parameters():
    model = ToyModel()
    optimizer = build_optimizer(model, {"lr": 1e-3, "weight_decay": 0.1, "scalar_lr": 0.05})
    assert group_names(model, optimizer) == {
        "decay": ["pos_embed", "encoder.0.weight", "heads.siglip.image_proj.weight", "heads.siglip.text_proj.weight"],
        "gains_biases": ["encoder.0.bias", "encoder.1.weight", "encoder.1.bias"],
        "scalars": ["heads.siglip.logit_scale", "heads.siglip.logit_bias"],
    }  # the frozen layer is in none
    settings = {group["name"]: (group["lr"], group["weight_decay"]) for group in optimizer.param_groups}
    assert settings == {"decay": (1e-3, 0.1), "gains_biases": (1e-3, 0.0), "scalars": (0.05, 0.0)}


def test_scalar_lr_defaults_to_lr_and_gains_biases_may_decay():
    model = ToyModel()
    optimizer = build_optimizer(model, {"lr": 2e-3, "weight_decay": 0.1, "decay_gains_biases": True})
    settings = {group["name"]: (group["lr"], group["weight_decay"]) for group in optimizer.param_groups}
    assert settings == {"decay": (2e-3, 0.1), "gains_biases": (2e-3, 0.1), "scalars": (2e-3, 0.0)}


def test_a_model_without_learned_scalars_has_no_scalar_group():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    assert [group["name"] for group in parameter_groups(model, 0.05, scalar_lr=0.1)] == ["decay", "gains_biases"]


@pytest.mark.parametrize("value", [0, -1e-3, "0.01", True])
def test_a_bad_scalar_lr_is_refused(value):
    with pytest.raises(ConfigError, match="optim.scalar_lr"):
        build_optimizer(ToyModel(), {"lr": 1e-3, "scalar_lr": value})


def test_a_misspelt_optim_key_is_refused_by_name():
    cfg = Config.fromfile(REPO / "configs" / "demo" / "cxr_siglip_tiny.py")
    with pytest.raises(ConfigError, match="Did you mean 'scalar_lr'"):
        cfg.merge_options(["optim.scalar_lrate=0.01"])
    cfg.optim["decay_gain_biases"] = True  # in the config file itself
    with pytest.raises(ConfigError, match="decay_gains_biases"):
        validate_config(cfg)


def train_toy_head(head: nn.Module, steps: int, **optim) -> None:
    """``steps`` AdamW steps of ``head`` alone on one batch of 16 matching image and text features."""
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(16, 16, generator=generator)
    text = image + 0.3 * torch.randn(16, 16, generator=generator)
    optimizer = build_optimizer(head, {"lr": 1e-3, "weight_decay": 0.05, **optim})
    for _ in range(steps):
        loss = head(EncoderOutput(image, image[:, None]), EncoderOutput(text, text[:, None]), {})["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_siglip_scale_and_bias_move_at_their_own_learning_rate():
    # one learning rate for all (1e-3): 20 steps move the scale 10 -> 10.12 and the bias -10 -> -9.98; with
    # scalar_lr 0.03: 11.17 and -9.41 (measured; Adam's steps are about lr-sized whatever the gradient's size)
    moved = {}
    for scalar_lr in (None, 0.03):
        torch.manual_seed(0)
        head = SigLipHead(image_dim=16, text_dim=16, embed_dim=8)
        train_toy_head(head, 20, scalar_lr=scalar_lr)
        moved[scalar_lr] = (float(head.scale().detach()) - 10.0, float(head.logit_bias.detach()) + 10.0)
    assert abs(moved[None][0]) < 0.2 and 0 < moved[None][1] < 0.05
    assert moved[0.03][0] > 0.8 and moved[0.03][1] > 0.5


def test_clip_temperature_is_never_decayed():
    torch.manual_seed(0)
    head = ContrastiveHead(image_dim=16, text_dim=16, embed_dim=8)
    head.logit_scale.requires_grad_(True)
    optimizer = build_optimizer(head, {"lr": 1e-3, "weight_decay": 1e3})  # decay that would crush the scale
    head.logit_scale.grad = torch.zeros(())
    before = head.logit_scale.detach().clone()
    optimizer.step()  # a zero gradient: only decay could move it
    assert torch.equal(head.logit_scale.detach(), before)


def test_resume_restores_the_groups_exactly(synthetic_cxr, tmp_path, one_thread):
    cfg = Config.fromfile(REPO / "configs" / "demo" / "cxr_siglip_tiny.py")
    cfg.merge_options([f"data.manifest={synthetic_cxr}", *TINIER, "train.max_steps=4", "train.ckpt_interval=2",
                       "train.val_interval=1000", "optim.scalar_lr=0.05", "optim.weight_decay=0.1"])
    straight = Trainer(cfg, tmp_path / "straight")
    straight.fit()
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed", symlinks=True)
    ckpt_dir = tmp_path / "resumed" / "checkpoints"
    for path in (ckpt_dir / "last.pt", checksum_path(ckpt_dir / "step_0000004.pt"), ckpt_dir / "step_0000004.pt"):
        path.unlink()  # as if the run had been killed between steps 2 and 4
    resumed = Trainer(cfg, tmp_path / "resumed", resume=True)
    assert resumed.step == 2
    assert [group["name"] for group in resumed.optimizer.param_groups] == ["decay", "gains_biases", "scalars"]
    for restored, built in zip(resumed.optimizer.param_groups, straight.optimizer.param_groups, strict=True):
        assert {k: v for k, v in restored.items() if k not in ("params", "lr")} == \
               {k: v for k, v in built.items() if k not in ("params", "lr")}
        assert [tuple(p.shape) for p in restored["params"]] == [tuple(p.shape) for p in built["params"]]
    assert resumed.scheduler.base_lrs == [1e-3, 1e-3, 0.05]  # the scalars' own peak rate, scheduled like the rest
    resumed.fit()
    assert_same_training_state(load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt"),
                               load_checkpoint(ckpt_dir / "last.pt"))
    assert float(resumed.model.heads["siglip"].logit_bias.detach()) > -10.0 + 0.05  # moved at scalar_lr


def test_a_checkpoint_with_other_parameter_groups_is_refused_naming_them(synthetic_cxr, tmp_path, one_thread):
    """A checkpoint from before the named groups (two unnamed ones: decayed, not decayed) cannot resume into the
    three named groups; the refusal lists both layouts instead of torch's bare "different number of parameter
    groups"."""
    from mmvl.engine.checkpoint import save_checkpoint
    from mmvl.errors import CheckpointError

    cfg = Config.fromfile(REPO / "configs" / "demo" / "cxr_siglip_tiny.py")
    cfg.merge_options([f"data.manifest={synthetic_cxr}", *TINIER, "train.max_steps=2", "train.ckpt_interval=2",
                       "train.val_interval=1000"])
    Trainer(cfg, tmp_path / "run").fit()
    path = tmp_path / "run" / "checkpoints" / "step_0000002.pt"
    state = load_checkpoint(path)
    decay, *rest = state["optimizer"]["param_groups"]
    merged = dict(rest[0], params=[index for group in rest for index in group["params"]])
    state["optimizer"]["param_groups"] = [{k: v for k, v in group.items() if k != "name"} for group in (decay, merged)]
    state["scheduler"]["base_lrs"] = state["scheduler"]["base_lrs"][:2]
    save_checkpoint(path, state)  # with a valid checksum: only the layout is wrong
    with pytest.raises(CheckpointError) as caught:
        Trainer(cfg, tmp_path / "run", resume=True)
    message = str(caught.value)
    assert "unnamed group 0" in message and "unnamed group 1" in message, message
    assert "decay (" in message and "gains_biases (" in message and "scalars (" in message, message
