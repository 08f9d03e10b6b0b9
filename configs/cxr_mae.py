# Masked-autoencoder pretraining (MAE, He et al. 2022) of a ViT-B/16 on MIMIC-CXR (Johnson et al. 2019) images
# alone: 224 px, 1 channel, 75% of the 196 patches masked, decoder 512-d x 8 blocks x 16 heads (MAE's), loss on
# per-patch normalised pixels; AdamW lr 1.5e-4 (MAE's base lr at batch 256), betas (0.9, 0.95), wd 0.05,
# global batch 256, 150k steps (about 100 epochs of MIMIC-CXR's ~370k training images), 7.5k warmup, bf16.
# The reports are not used. The best checkpoint is the one with the lowest held-out reconstruction loss.
# Data: data/mimic_cxr/manifest.jsonl prepared with datasets/mimic_cxr.py (see datasets/mimic_cxr.md).
# Run:  python tools/train.py configs/cxr_mae.py [--cfg-options model.heads.0.mask_ratio=0.9 ...]
_base_ = [
    "_base_/datasets/cxr_manifest.py",
    "_base_/schedules/adamw_cosine.py",
]

model = dict(
    image_encoder=dict(type="vit2d", model_name="vit_base_patch16_224", in_chans=1),  # img_size: img_size
    heads=[dict(type="mae", mask_ratio=0.75, decoder_dim=512, decoder_depth=8, decoder_heads=16,
                norm_pix_loss=True)],
)
optim = dict(lr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95), eps=1e-8, warmup_steps=7500)
train = dict(max_steps=150000, best_metric="val/loss", best_mode="min", val_interval=5000, ckpt_interval=5000,
             vis_interval=5000)
