"""What a training config may hold: the sections ``tools/train.py`` reads and every key each section accepts,
with its default. The config check (:mod:`mmvl.config.validate`) refuses anything else by name."""

from __future__ import annotations

from typing import Any

TRAIN_DEFAULTS: dict[str, Any] = dict(
    max_steps=1000, batch_size=32, num_workers=2, accum_steps=1, grad_clip=1.0, amp=None, seed=0,
    log_interval=10, val_interval=200, ckpt_interval=200, best_metric="val/i2t_R@5", best_mode="max",
    max_bad_steps=10, keep_checkpoints=3, deterministic=False, device=None, vis_interval=0,
    # torchrun: "ddp" (DistributedDataParallel) or "fsdp" (FSDP2 fully_shard of every block, for large encoders)
    strategy="ddp", dist_backend=None, find_unused_parameters=False,
    # speed: torch.compile (True, or a backend name such as "aot_eager"), channels-last images and conv weights
    compile=None, channels_last=False,
    # gradient caching (Gao et al. 2021): encoders run over the batch in this many chunks, the contrastive loss
    # over the whole batch; activation memory of one chunk, the gradients of the whole batch (0: off)
    grad_cache_chunks=0,
    # CPU, opt-in: glibc keeps freed step buffers for reuse instead of returning them to the OS and faulting
    # them back in (mallopt; process-wide, so never a side effect of the defaults)
    keep_freed_memory=False,
    # draw WORK_DIR/plots/*.png from metrics.jsonl at the end of the run
    plots=True,
)

DATA_DEFAULTS: dict[str, Any] = dict(
    type="manifest", manifest=None, shards=None, prepare_hint=None, root=None, allow_outside_root=False,
    shuffle_buffer=1000, resampled=False, train_split="train", val_split=None,
    report_sections=("findings", "impression"), on_error="skip", max_skip_fraction=0.01,
    cache=None, cache_dir=None, cache_workers=0, train_pipeline=None, eval_pipeline=None,
    # a study's views (manifest rows listing several images): "random" (one per study, drawn anew each epoch),
    # "frontal" (drawn among its frontal views), "all" (one item per view; a batch never holds two of one study)
    view_policy="random",
    # a report longer than the model's max_length: "keep_last" keeps its last section (report_sections' order: the
    # impression after the findings) whole and cuts the ones before; "tail" cuts the joined text at its end
    report_truncation="keep_last",
    # training reports only (mmvl.data.reports.augment_report): dict(shuffle=True, drop=0.0) puts each section's
    # sentences in a random order and leaves each out with probability drop, drawn from the sample's seed
    report_augment=None,
    # fine-tuning on a seeded, nested, study-level subset of the training split (mmvl.data.fractions); its seed is
    # its own, so every mode and training seed sees the same studies
    label_fraction=None, label_fraction_seed=0,
)

OPTIM_DEFAULTS: dict[str, Any] = dict(
    type="adamw", lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, warmup_steps=0, min_lr_ratio=0.0,
    fused=None,
    # the contrastive heads' learned logit scale and bias: their own peak learning rate (None: lr), never decayed;
    # gains and biases (1-D parameters: norms, biases) decay only if decay_gains_biases (mmvl.engine.optim)
    scalar_lr=None, decay_gains_biases=False,
    # fine-tuning (mmvl.engine.finetune.layer_scaled_groups): the encoder's layer i of depth d at
    # lr x encoder_lr_mult x layer_decay ** (d + 1 - i); 1.0 and 1.0: off
    layer_decay=1.0, encoder_lr_mult=1.0,
)

# Top-level names a config file may define besides the sections: the size knobs that flow into the model
# and the pipelines (``img_size`` for 2D, ``volume_size``/``spacing``/``hu_window`` for 3D). Names with a
# leading underscore are private helpers of the file and never reach the merged config.
SECTIONS = ("model", "data", "train", "optim")
KNOBS = ("img_size", "volume_size", "spacing", "hu_window")

# The values ``data.type`` and ``optim.type`` may take: the dataset kinds the trainer builds from ``data`` and the
# optimizers mmvl.engine.optim builds.
DATA_TYPES = ("manifest", "shards")
# The values data.view_policy, data.on_error and data.cache may take (the datasets check them too).
VIEW_POLICIES = ("random", "frontal", "all")
ON_ERROR = ("skip", "raise")
CACHE_KINDS = (None, "memory", "disk")
REPORT_TRUNCATIONS = ("keep_last", "tail")
REPORT_AUGMENT_DEFAULTS: dict[str, Any] = dict(shuffle=True, drop=0.0)
OPTIM_TYPES = ("adamw",)
