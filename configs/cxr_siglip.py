# SigLIP pretraining on MIMIC-CXR (Johnson et al. 2019): CLIP's ViT-B/16 at 224 px + BERT-base-size text
# tower, with the pairwise sigmoid loss of Zhai et al. 2023 (learnable scale from 10 and bias from -10)
# instead of InfoNCE; global batch 256, findings + impression sections as captions.
# Data: data/mimic_cxr/manifest.jsonl prepared with datasets/mimic_cxr.py (see datasets/mimic_cxr.md).
# Run:  python tools/train.py configs/cxr_siglip.py [--cfg-options train.batch_size=128 ...]
_base_ = ["cxr_clip.py"]

model = dict(heads=[dict(type="siglip", embed_dim=512, init_logit_scale=10.0, init_logit_bias=-10.0)])
