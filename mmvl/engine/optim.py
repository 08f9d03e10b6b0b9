"""AdamW in named parameter groups (weight matrices decay; gains and biases do not; the contrastive heads' learned
scale and bias at their own learning rate), and a linear-warmup cosine learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mmvl.config.schema import OPTIM_DEFAULTS
from mmvl.engine.finetune import layer_scaled_groups
from mmvl.errors import ConfigError

# The learned temperature and bias of the contrastive heads (CLIP's logit scale, SigLIP's scale and bias): scalars
# whose useful range spans several units (SigLIP starts at log 10 and -10), so at a weight matrix's learning rate
# Adam's ~lr-sized steps barely move them in a short run; they get ``optim.scalar_lr`` and never decay (a decayed
# bias would be pulled towards 0 and the temperature towards 1).
LEARNED_SCALARS = ("logit_scale", "logit_bias")


def parameter_groups(model: nn.Module, weight_decay: float, scalar_lr: float | None = None,
                     decay_gains_biases: bool = False) -> list[dict[str, Any]]:
    """AdamW parameter groups, each named (the name is saved with the optimizer state):

    - ``"decay"``: weight matrices, embeddings, convolution kernels, position tables; ``weight_decay``.
    - ``"gains_biases"``: 1-D and 0-D parameters (norm gains and shifts, biases); no decay unless
      ``decay_gains_biases`` (open_clip's training script excludes ``p.ndim < 2``, norms and biases likewise).
    - ``"scalars"``: the :data:`LEARNED_SCALARS`; learning rate ``scalar_lr`` (None: the optimizer's) and no decay.

    Frozen parameters are left out, and so are empty groups; a given model and config always give the same groups
    in the same order, which a resume relies on."""
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "gains_biases": [], "scalars": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.rsplit(".", 1)[-1] in LEARNED_SCALARS:
            groups["scalars"].append(param)
        elif param.ndim < 2 or name.endswith(".bias"):
            groups["gains_biases"].append(param)
        else:
            groups["decay"].append(param)
    settings = {"decay": {"weight_decay": weight_decay},
                "gains_biases": {"weight_decay": weight_decay if decay_gains_biases else 0.0},
                "scalars": {"weight_decay": 0.0, **({} if scalar_lr is None else {"lr": scalar_lr})}}
    return [{"name": name, "params": params, **settings[name]} for name, params in groups.items() if params]


def build_optimizer(model: nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """``cfg``: lr, weight_decay, betas, eps, fused, scalar_lr, decay_gains_biases (groups:
    :func:`parameter_groups`). ``fused`` (default: when every parameter is a plain CUDA tensor) runs AdamW as one
    fused CUDA kernel per step instead of torch's per-tensor (foreach) loop."""
    cfg = dict(cfg)
    kind = cfg.pop("type", "adamw").lower()
    if kind != "adamw":
        raise ConfigError(f"optim.type '{kind}' is not supported; use 'adamw'")
    for key in ("warmup_steps", "min_lr_ratio"):
        cfg.pop(key, None)
    scalar_lr = cfg.pop("scalar_lr", None)
    if scalar_lr is not None and (isinstance(scalar_lr, bool) or not isinstance(scalar_lr, (int, float))
                                  or not scalar_lr > 0):
        raise ConfigError(f"optim.scalar_lr must be a learning rate > 0 or None (use optim.lr), got {scalar_lr!r}")
    groups = parameter_groups(model, cfg.pop("weight_decay", 0.0), scalar_lr,
                              bool(cfg.pop("decay_gains_biases", False)))
    groups = layer_scaled_groups(model, groups, float(cfg.get("lr", OPTIM_DEFAULTS["lr"])),
                                 cfg.pop("layer_decay", 1.0), cfg.pop("encoder_lr_mult", 1.0))
    if cfg.get("fused") is None:
        params = [param for group in groups for param in group["params"]]
        cfg["fused"] = bool(params) and all(p.is_cuda and type(p) is nn.Parameter for p in params) or None
    try:
        return torch.optim.AdamW(groups, **cfg)
    except TypeError as err:
        raise ConfigError(f"optim: {err}") from err


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """LR multiplier: linear from 1/warmup to 1 over ``warmup_steps``, then cosine down to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class CosineWarmup:
    """Schedule object for ``LambdaLR``; its fields are saved in the scheduler state dict."""

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        return cosine_with_warmup(step, self.warmup_steps, self.total_steps, self.min_lr_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: dict[str, Any], total_steps: int):
    schedule = CosineWarmup(int(cfg.get("warmup_steps", 0)), total_steps, float(cfg.get("min_lr_ratio", 0.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def group_mismatch(saved_optimizer: Any, optimizer: torch.optim.Optimizer) -> str | None:
    """Why a checkpoint's optimizer state cannot load into ``optimizer`` when its parameter groups differ (names
    and sizes), else None. Checkpoints written before mmvl named its groups (two unnamed groups) and runs whose
    config changes the grouping (``optim.layer_decay``, ``model.mode``) end here, and torch's own message
    ("different number of parameter groups") does not say which."""
    try:
        saved = [(group.get("name", f"unnamed group {index}"), len(group["params"]))
                 for index, group in enumerate(saved_optimizer["param_groups"])]
    except (KeyError, TypeError, AttributeError):
        return None
    now = [(group.get("name", f"group {index}"), len(group["params"]))
           for index, group in enumerate(optimizer.param_groups)]
    if saved == now:
        return None

    def describe(groups: list[tuple[str, int]]) -> str:
        return ", ".join(f"{name} ({size} tensors)" for name, size in groups)

    return (f"its optimizer has parameter groups {describe(saved)}, this model and config make {describe(now)}. "
            "A checkpoint from before mmvl named its groups, or one written under another optim.layer_decay / "
            "model.mode, cannot resume here: start a new run (model.init_from can take its "
            "weights) or resume with the mmvl and config that wrote it")


def config_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: Any) -> list[dict[str, Any]]:
    """What the config set in each parameter group (before a checkpoint's states are loaded over it)."""
    return [{"weight_decay": group["weight_decay"], "betas": group["betas"], "eps": group["eps"], "initial_lr": base}
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs)]


def apply_config_after_resume(optimizer: torch.optim.Optimizer, scheduler: Any, fresh: list[dict[str, Any]],
                              cfg: dict[str, Any], total_steps: int) -> tuple[float, float]:
    """After loading a checkpoint's optimizer and scheduler states, make the current config's values take effect
    (a resume may change them through ``--resume-override``): the optimizer's hyperparameters from ``fresh``
    (:func:`config_hyperparameters` before the load), and the schedule rebuilt for ``total_steps`` with the current peak
    learning rate, warmup and floor, evaluated at the resumed step (as if the run had been planned that way
    from the start, so no step after it runs at the old schedule's end value). Returns the learning rate at the
    resumed step before and after. Unchanged settings reproduce exactly the saved values."""
    for group, current in zip(optimizer.param_groups, fresh):
        group.update(current)
    schedule = scheduler.lr_lambdas[0]
    schedule.warmup_steps = int(cfg.get("warmup_steps", 0))
    schedule.min_lr_ratio = float(cfg.get("min_lr_ratio", 0.0))
    schedule.total_steps = total_steps
    before = optimizer.param_groups[0]["lr"]
    scheduler.base_lrs = [group["initial_lr"] for group in fresh]
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * schedule(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return before, optimizer.param_groups[0]["lr"]
