# Label-aware CLIP on MIMIC-CXR (Johnson et al. 2019): configs/cxr_clip.py with MedCLIP-style soft targets
# (Wang et al. 2022), so reports of studies that share findings are not treated as negatives. Needs manifest
# `labels` (the CheXpert labels written by `datasets/mimic_cxr.py --chexpert ...`). Targets mix the identity
# and the row-normalised label similarity half and half; rows without known labels fall back to plain InfoNCE.
# ViT-B/16 at 224 px + BERT-base-size text tower, global batch 256.
# Data: data/mimic_cxr/manifest.jsonl prepared with datasets/mimic_cxr.py (see datasets/mimic_cxr.md).
# Run:  python tools/train.py configs/cxr_clip_labels.py [--cfg-options model.heads.0.soft_target_weight=1.0 ...]
_base_ = ["cxr_clip.py"]

model = dict(heads=[dict(type="clip_soft", embed_dim=512, soft_target_weight=0.5, label_temperature=None)])
