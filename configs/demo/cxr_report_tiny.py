# configs/cxr_report.py shrunk to train on the synthetic DICOM demo set (datasets/synthetic.py) in a few
# minutes on 2 CPU cores: 64 px input, 4-layer ViT (dim 128), 2-layer decoder (dim 128), batch 32.
# Then: python tools/generate_reports.py work_dirs/cxr_report_tiny --manifest data/synthetic_cxr/test.jsonl \
#           --out work_dirs/cxr_report_tiny/reports_test.jsonl
_base_ = ["../cxr_report.py"]

img_size = 64  # fills the encoder's img_size and ResizePad's size
model = dict(
    image_encoder=dict(model_name="vit_tiny_patch16_224", patch_size=8, embed_dim=128,
                       depth=4, num_heads=4),
    heads=[
        dict(type="report_gen", tokenizer=dict(type="wordpiece", vocab_size=1000, min_frequency=2),
             decoder_dim=128, decoder_depth=2, decoder_heads=4, max_length=256, label_smoothing=0.1, dropout=0.1)
    ],
)
data = dict(
    manifest="data/synthetic_cxr/manifest.jsonl",
    prepare_hint="Build it with `python datasets/synthetic.py --out data/synthetic_cxr` (or `make demo`).",
    train_pipeline=[
        dict(type="LoadImage", frame=0, voi="auto"),
        dict(type="ResizePad"),
        dict(type="RandomAugment2D", crop_scale=(0.8, 1.0), rotate=5.0, brightness=0.1, contrast=0.1),
        dict(type="Normalize", mean=0.5, std=0.25),
    ],
    eval_pipeline=[
        dict(type="LoadImage", frame=0, voi="auto"),
        dict(type="ResizePad"),
        dict(type="Normalize", mean=0.5, std=0.25),
    ],
)
optim = dict(lr=1e-3, weight_decay=0.05, betas=(0.9, 0.98), warmup_steps=50)
train = dict(max_steps=600, batch_size=32, num_workers=2, amp=None, log_interval=10, val_interval=200,
             ckpt_interval=200)
