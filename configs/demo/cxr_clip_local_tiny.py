# configs/cxr_clip_local.py shrunk to the synthetic DICOM demo set on 2 CPU cores: the model of
# configs/demo/cxr_clip_tiny.py (64 px, 4-layer ViT with 8 px patches, so an 8 x 8 patch grid, and a 2-layer BERT
# of width 128, batch 32, 360 steps) with a local_align head (embed_dim 128) beside the CLIP head, weights 1 + 1.
# Trained beside configs/demo/cxr_clip_tiny.py, it gives the global-only and the CLIP + local alignment model
# whose grounding is compared. Full size: ViT-B/16 + BERT-base on MIMIC-CXR, embed_dim 512, batch 256, 50k steps.
_base_ = ["cxr_clip_tiny.py"]

model = dict(
    heads=[
        dict(type="clip", embed_dim=128, loss_weight=1.0),
        dict(type="local_align", embed_dim=128, gamma1=4.0, gamma2=5.0, gamma3=10.0, loss_weight=1.0),
    ],
)
