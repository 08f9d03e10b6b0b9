# configs/cxr_clip_local.py shrunk to the synthetic DICOM demo set on 2 CPU cores: the model of
# configs/demo/cxr_clip_tiny_128.py (128 px, 4-layer ViT with 8 px patches, so a 16 x 16 patch grid, and a 2-layer
# BERT of width 128, batch 32, 360 steps) with a local_align head (embed_dim 128) beside the CLIP head, weights 1 + 1.
# 128 px, not the 64 px of cxr_clip_tiny.py: there a nodule is smaller than one patch (see cxr_clip_tiny_128.py).
# Trained beside configs/demo/cxr_clip_tiny_128.py, it gives the global-only and the CLIP + local alignment model
# whose grounding is compared, side by side on the test split:
#   python tools/evaluate.py clip=work_dirs/cxr_clip_tiny_128 local=work_dirs/cxr_clip_local_tiny \
#       --manifest data/synthetic_cxr/manifest.jsonl --task grounding --out grounding_comparison.json
# (pointing game and CNR per finding with study bootstrap CIs, each model and the centre prior, the paired
# difference of local minus clip, and both models' zero-shot AUROC; README "Evaluate"). Measured there: no nodule
# found by either (pointing 0.00 and 0.00, nodule AUROC 0.57 and 0.59), effusion CNR +0.40 and heart +0.11 with
# local alignment, pneumothorax pointing 0.79 -> 0.00, no AUROC moved by more than its CI.
# Full size: ViT-B/16 + BERT-base on MIMIC-CXR, embed_dim 512, batch 256, 50k steps.
_base_ = ["cxr_clip_tiny_128.py"]

model = dict(
    heads=[
        dict(type="clip", embed_dim=128, loss_weight=1.0),
        # image_chunk=None: all 32 images against 32 reports at once (~0.25 GB of pair tensors at 64 tokens x 256
        # patches), so the head's forward is not run twice as chunks with activation checkpointing are
        dict(type="local_align", embed_dim=128, gamma1=4.0, gamma2=5.0, gamma3=10.0, image_chunk=None,
             loss_weight=1.0),
    ],
)
