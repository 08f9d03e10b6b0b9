# CLIP pretraining and report generation together on MIMIC-CXR: the ViT-B/16 feeds both the contrastive head
# and a report decoder (as in CoCa, Yu et al. 2022, with a separate text tower). Both heads share the one
# WordPiece vocabulary the trainer learns on the training reports. Model selection stays on retrieval.
# Run:  python tools/train.py configs/cxr_clip_report.py
_base_ = ["cxr_clip.py"]
model = dict(
    heads=[
        dict(type="clip", embed_dim=512, loss_weight=1.0),
        dict(type="report_gen", tokenizer=dict(type="wordpiece", vocab_size=30000, min_frequency=2),
             decoder_dim=512, decoder_depth=3, decoder_heads=8, max_length=256, label_smoothing=0.1,
             loss_weight=0.5),
    ],
)
