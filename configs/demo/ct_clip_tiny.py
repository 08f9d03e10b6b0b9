# configs/ct_clip.py shrunk to train on the synthetic CT set in a few minutes on 2 CPU cores: volumes resampled
# to 8 mm and cropped or padded to 48^3 (a 384 mm field of view), a 4-layer 3D ViT (width 128, 8^3-voxel
# patches: 216 tokens), a 2-layer BERT (width 128) on the impression section, batch 32, preprocessed volumes
# cached in memory.
# Full size: configs/ct_clip.py (CT-RATE, 224 x 224 x 112 at 1.5 x 1.5 x 3 mm, 3D ViT-B + BERT-base, batch 32).
# Run it, then zero-shot on the CT test split with prompts worded as CT-RATE's (and the synthetic) reports are
# (README, "The CT demo"):
#   python datasets/synthetic.py --kind ct --out data/synthetic_ct
#   python tools/train.py configs/demo/ct_clip_tiny.py
#   python tools/evaluate.py work_dirs/ct_clip_tiny --manifest data/synthetic_ct/manifest_nifti.jsonl \
#       --task zero_shot --split test --preset ctrate
_base_ = ["../ct_clip.py"]

spacing = (8.0, 8.0, 8.0)
volume_size = (48, 48, 48)  # fills the encoder's img_size and the pipelines' CropOrPad size
model = dict(
    image_encoder=dict(patch_size=(8, 8, 8), hidden_size=128, mlp_dim=256, num_layers=4,
                       num_heads=4, grad_checkpointing=False),
    text_encoder=dict(
        config=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                    max_position_embeddings=128),
        tokenizer=dict(type="wordpiece", vocab_size=1000, min_frequency=2),
        pooling="mean",  # from scratch, mean pooling separates reports far earlier than [CLS] (see cxr_clip_tiny)
        max_length=64,
    ),
    heads=[dict(type="clip", embed_dim=128)],
)
data = dict(
    manifest="data/synthetic_ct/manifest_nifti.jsonl",
    prepare_hint="Build it with `python datasets/synthetic.py --kind ct --out data/synthetic_ct`.",
    # The impression names every finding in a sentence or two; the synthetic findings sections add details an 8 mm
    # volume cannot show (nodule sizes and lobes, varied wording of normal anatomy), which a from-scratch text
    # tower memorises: with findings + impression held-out retrieval stayed near chance (R@5 0.12-0.15 of 80 at
    # 5/80 chance, held-out loss rising from step 100), with the impression alone 0.19-0.30 and a flat loss.
    report_sections=("impression",),
    cache="memory",  # reading and resampling the NIfTI volumes dominates; 200 small volumes fit in memory
    train_pipeline=[
        dict(type="LoadVolume", modalities=("CT",)),
        dict(type="Orient", axcodes="RAS"),
        dict(type="Resample"),
        dict(type="IntensityWindow"),
        dict(type="CropOrPad", pad_value=0.0),
        # No left-right flip: the reports name the side of effusions, nodules and consolidations.
        dict(type="RandomAugment3D", flip_axes=(), rotate=5.0, scale=0.05, intensity_shift=0.05),
        dict(type="Normalize", mean=0.5, std=0.25),
    ],
    # eval_pipeline: the base's, at this config's volume_size and spacing
)
optim = dict(lr=1e-3, weight_decay=0.05, warmup_steps=30)
# The augmentation (a 3D affine per volume) runs in 2 loader workers, on the memory cache they share with the main
# process (filled before they fork): with num_workers=0 waiting for data took 30-34% of each step, with 2 workers
# 6-7% (14-step runs of this config on 64 studies, 2 cores at load 6.5-9). In the main process the affine took
# 87-117 ms per volume with torch's 2 intra-op threads on a loaded machine against 8-11 ms with 1, and a worker runs
# with 1. The per-sample seeds make the batches the same either way. Pinned memory is on whenever training runs on
# CUDA.
train = dict(max_steps=300, batch_size=32, num_workers=2, amp=None, log_interval=10, val_interval=100,
             ckpt_interval=100)
