# configs/cxr_mae_r90.py shrunk like configs/demo/cxr_mae_tiny.py (synthetic DICOM demo set, 64 px, 4-layer
# ViT of dim 128, decoder 128-d x 2 x 4, batch 32, 300 steps on 2 CPU cores) with 90% of the patches masked:
# the encoder sees 6 of the 64 patches. Full size: ViT-B/16 at 224 px on MIMIC-CXR, mask 0.9, 150k steps.
_base_ = ["cxr_mae_tiny.py"]

model = dict(
    heads=[dict(type="mae", mask_ratio=0.9, decoder_dim=128, decoder_depth=2, decoder_heads=4,
                norm_pix_loss=True)],
)
