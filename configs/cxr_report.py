# Report generation on MIMIC-CXR (Johnson et al. 2019): ViT-B/16 at 224 px encodes the radiograph, a 3-layer
# transformer decoder (width 512) writes the findings + impression sections, cross-attending to the ViT's
# tokens. No text encoder: the decoder's WordPiece vocabulary is learned on the training reports.
# Data: data/mimic_cxr/manifest.jsonl prepared with datasets/mimic_cxr.py (see datasets/mimic_cxr.md).
# Run:  python tools/train.py configs/cxr_report.py
#       python tools/generate_reports.py work_dirs/cxr_report --manifest data/mimic_cxr/test.jsonl --out reports.jsonl
# Starting the ViT from pretrained weights helps a lot: image_encoder.pretrained_path=<local timm checkpoint>.
_base_ = [
    "_base_/datasets/cxr_manifest.py",
    "_base_/schedules/adamw_cosine.py",
]
model = dict(
    image_encoder=dict(type="vit2d", model_name="vit_base_patch16_224", in_chans=1),  # img_size: img_size
    heads=[
        dict(
            type="report_gen",
            tokenizer=dict(type="wordpiece", vocab_size=8000, min_frequency=3),
            decoder_dim=512,
            decoder_depth=3,
            decoder_heads=8,
            # findings + impression of MIMIC-CXR: about 95% fit in 128 WordPiece tokens, long ones need 256; a report
            # longer still keeps its impression whole (data.report_truncation="keep_last")
            max_length=256,
            label_smoothing=0.1,
            dropout=0.1,
        )
    ],
)
optim = dict(lr=1e-4, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8, warmup_steps=2000)
# Model selection by validation loss (label-smoothed cross-entropy): lower is better.
train = dict(max_steps=30000, batch_size=128, val_interval=1000, ckpt_interval=1000, best_metric="val/loss",
             best_mode="min")
