# AdamW with cosine decay after linear warmup (CLIP's recipe); bf16 autocast where the device supports it.
optim = dict(type="adamw", lr=5e-4, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6, warmup_steps=2000,
             min_lr_ratio=0.0,
             fused=None)  # None: the fused CUDA AdamW kernel when every parameter is on a GPU
train = dict(
    max_steps=50000, batch_size=256, num_workers=8, accum_steps=1, grad_clip=1.0, amp="bf16", seed=0,
    log_interval=50, val_interval=2000, ckpt_interval=1000, best_metric="val/i2t_R@5", best_mode="max",
    vis_interval=0,  # heads that draw (MAE reconstructions) write <work_dir>/vis/*.png this often (0: never)
    keep_checkpoints=3,  # step_<N>.pt files kept (each with a .sha256); --resume takes the newest that verifies
    max_bad_steps=10,  # consecutive non-finite steps tolerated (each is skipped and logged) before stopping
    deterministic=False,  # torch.use_deterministic_algorithms, for bitwise-repeatable GPU runs
    device=None,  # None: cuda if available, else cpu (cuda:LOCAL_RANK under torchrun)
    # torchrun: batch_size is per process; "ddp" (DistributedDataParallel) or "fsdp" (FSDP2: parameters,
    # gradients and optimizer state sharded over the ranks, for encoders too large to replicate)
    strategy="ddp",
    dist_backend=None,  # None: nccl on GPUs, gloo on CPUs
    find_unused_parameters=False,  # True if some parameters get no gradient (DDP then checks every step)
    compile=None,  # torch.compile the training model: True (inductor) or a backend name; None: off
    channels_last=False,  # channels-last images and conv weights (faster convolutions on recent GPUs)
    # gradient caching for contrastive models: encoders run in this many chunks per batch, the loss over the
    # whole batch (a large contrastive batch in the memory of one chunk, ~2x the encoder compute); 0: off
    grad_cache_chunks=0,
    keep_freed_memory=False,  # CPU: True makes glibc keep freed step buffers for reuse (fewer page faults per
    # step; process-wide, so opt-in)
    plots=True,  # WORK_DIR/plots/*.png (loss, lr, validation metrics, samples/s) at the end of the run
)
