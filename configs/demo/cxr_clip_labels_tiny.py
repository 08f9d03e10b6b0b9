# configs/cxr_clip_labels.py shrunk to train on the synthetic DICOM demo set (datasets/synthetic.py, whose
# manifest carries the drawn findings as `labels`) in a few minutes on 2 CPU cores: the tiny CLIP demo (64 px,
# 4-layer ViT and 2-layer BERT of width 128, batch 32) with label-aware soft targets in place of InfoNCE's.
# Full size: configs/cxr_clip_labels.py (ViT-B/16 at 224 px, batch 256).
_base_ = ["cxr_clip_tiny.py"]

model = dict(heads=[dict(type="clip_soft", embed_dim=128, soft_target_weight=0.5, label_temperature=None)])
