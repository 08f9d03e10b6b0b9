# CLIP pretraining on MIMIC-CXR (Johnson et al. 2019): ViT-B/16 at 224 px + BERT-base-size text tower,
# global batch 256, findings + impression sections as captions.
# Data: data/mimic_cxr/manifest.jsonl prepared with datasets/mimic_cxr.py (see datasets/mimic_cxr.md).
# Run:  python tools/train.py configs/cxr_clip.py [--cfg-options train.batch_size=128 ...]
_base_ = [
    "_base_/models/clip_vit_b16_bert.py",
    "_base_/datasets/cxr_manifest.py",
    "_base_/schedules/adamw_cosine.py",
]
