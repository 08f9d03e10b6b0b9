# CLIP + MAE pretraining on MIMIC-CXR, MedFLIP-style (Li et al. 2024, arXiv:2403.04626; FLIP, Li et al.
# 2023): one masked encoding of each radiograph (50% of the patches dropped, FLIP's ratio) feeds both the
# contrastive head (InfoNCE against the report) and the MAE decoder (reconstruction of the dropped patches).
# ViT-B/16 at 224 px + BERT-base-size text tower (configs/cxr_clip.py), MAE decoder 512-d x 8 x 16 with norm_pix_loss,
# loss = 1.0 * clip + 1.0 * mae (mmvl's weights, not taken from the paper), global batch 256, 50k steps, bf16.
# Validation retrieval embeds unmasked images; the best checkpoint is the one with the best i2t Recall@5.
# Data: data/mimic_cxr/manifest.jsonl prepared with datasets/mimic_cxr.py (see datasets/mimic_cxr.md).
# Run:  python tools/train.py configs/cxr_clip_mae.py
_base_ = ["cxr_clip.py"]

model = dict(
    heads=[
        dict(type="clip", embed_dim=512, loss_weight=1.0),
        dict(type="mae", mask_ratio=0.5, decoder_dim=512, decoder_depth=8, decoder_heads=16, norm_pix_loss=True,
             loss_weight=1.0),
    ],
)
train = dict(vis_interval=5000)
