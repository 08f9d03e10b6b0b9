# Masked-autoencoder pretraining (MAE, He et al. 2022, in 3D) of MONAI's ViT-B on chest CT volumes alone
# (e.g. CT-RATE, Hamamci et al. 2024): 224 x 224 x 112 voxels at 1.5 x 1.5 x 3 mm (the CT base config),
# 16^3-voxel patches (14 x 14 x 7 = 1372), 75% masked, decoder 384-d x 4 blocks x 12 heads (divisible by 6,
# so the 3D sin-cos position embedding uses every channel), norm_pix_loss; AdamW lr 1.5e-4, betas
# (0.9, 0.95), wd 0.05, batch 32 with gradient checkpointing, 100k steps, 5k warmup, bf16.
# Data: data/ct_rate/manifest.jsonl prepared with datasets/ct_rate.py (see datasets/ct_rate.md).
# Run:  python tools/train.py configs/ct_mae.py [--cfg-options train.batch_size=16 ...]
_base_ = [
    "_base_/datasets/ct_manifest.py",
    "_base_/schedules/adamw_cosine.py",
]

model = dict(
    image_encoder=dict(type="vit3d", patch_size=(16, 16, 16), in_chans=1,  # img_size: volume_size
                       hidden_size=768, mlp_dim=3072, num_layers=12, num_heads=12, grad_checkpointing=True),
    heads=[dict(type="mae", mask_ratio=0.75, decoder_dim=384, decoder_depth=4, decoder_heads=12,
                norm_pix_loss=True)],
)
optim = dict(lr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95), eps=1e-8, warmup_steps=5000)
train = dict(max_steps=100000, batch_size=32, best_metric="val/loss", best_mode="min", val_interval=5000,
             ckpt_interval=5000, vis_interval=5000)
