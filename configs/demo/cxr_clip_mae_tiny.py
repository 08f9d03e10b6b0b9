# configs/cxr_clip_mae.py shrunk to the synthetic DICOM demo set on 2 CPU cores: the model of
# configs/demo/cxr_clip_tiny.py (64 px, 4-layer ViT and 2-layer BERT of dim 128, batch 32, 360 steps) with an
# MAE head (decoder 128-d x 2 x 4) sharing its 50%-masked encoding. Full size: ViT-B/16 + BERT-base on
# MIMIC-CXR, decoder 512-d x 8 x 16, batch 256, 50k steps.
_base_ = ["cxr_clip_tiny.py"]

model = dict(
    heads=[
        dict(type="clip", embed_dim=128, loss_weight=1.0),
        dict(type="mae", mask_ratio=0.5, decoder_dim=128, decoder_depth=2, decoder_heads=4, norm_pix_loss=True,
             loss_weight=1.0),
    ],
)
train = dict(vis_interval=360)
