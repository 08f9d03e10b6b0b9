# configs/cxr_siglip.py shrunk to train on the synthetic DICOM demo set (datasets/synthetic.py) in a few
# minutes on 2 CPU cores: the tiny CLIP demo (64 px, 4-layer ViT and 2-layer BERT of width 128, batch 32) with
# the SigLIP head in place of InfoNCE. Full size: configs/cxr_siglip.py (ViT-B/16 at 224 px, batch 256).
_base_ = ["cxr_clip_tiny.py"]

model = dict(heads=[dict(type="siglip", embed_dim=128, init_logit_scale=10.0, init_logit_bias=-10.0)])
