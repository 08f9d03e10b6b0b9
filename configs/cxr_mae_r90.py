# configs/cxr_mae.py with 90% of the patches masked: ViT-B/16 MAE on MIMIC-CXR images, 224 px, decoder
# 512-d x 8 x 16, norm_pix_loss, batch 256, 150k steps. Xiao et al. 2023 ("Delving into masked autoencoders
# for multi-label thorax disease classification", WACV; arXiv:2210.12843) pretrained on 266,340 chest X-rays and
# found reconstruction from 10% of the image (mask ratio 0.9) better than MAE's 25%, with a moderate
# random-resized-crop range of 0.5-1.0 (the CXR base config's crop_scale already).
# Data: data/mimic_cxr/manifest.jsonl prepared with datasets/mimic_cxr.py (see datasets/mimic_cxr.md).
# Run:  python tools/train.py configs/cxr_mae_r90.py
_base_ = ["cxr_mae.py"]

model = dict(
    heads=[dict(type="mae", mask_ratio=0.9, decoder_dim=512, decoder_depth=8, decoder_heads=16,
                norm_pix_loss=True)],
)
