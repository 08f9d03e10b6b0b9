# CLIP + local image-text alignment on MIMIC-CXR (Johnson et al. 2019), GLoRIA-style (Huang et al. 2021, ICCV):
# the global InfoNCE of configs/cxr_clip.py (ViT-B/16 at 224 px + BERT-base-size text tower, global batch 256,
# findings + impression sections as captions) plus the local_align head: each report word attends over the 14 x 14
# patch tokens, GLoRIA's temperatures gamma1/gamma2/gamma3 = 4/5/10, loss = 1.0 * clip + 1.0 * local_align
# (GLoRIA weighs its global and local losses equally). The local head scores 16 images at a time with activation
# checkpointing (image_chunk; ~4 GB per chunk against 256 reports of 128 tokens, see
# mmvl/models/heads/local_align.py). Its word-patch similarities are the model's phrase heatmaps.
# Data: data/mimic_cxr/manifest.jsonl prepared with datasets/mimic_cxr.py (see datasets/mimic_cxr.md).
# Run:  python tools/train.py configs/cxr_clip_local.py [--cfg-options train.batch_size=128 ...]
_base_ = ["cxr_clip.py"]

model = dict(
    heads=[
        dict(type="clip", embed_dim=512, loss_weight=1.0),
        dict(type="local_align", embed_dim=512, gamma1=4.0, gamma2=5.0, gamma3=10.0, aggregation="sum",
             image_chunk=16, loss_weight=1.0),
    ],
)
