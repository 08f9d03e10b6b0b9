# CLIP pretraining on CT-RATE chest CT (Hamamci et al. 2024), in the spirit of CT-CLIP: a 3D ViT-B (MONAI ViT,
# 16 x 16 x 8-voxel patches, 14 x 14 x 14 tokens, gradient checkpointing) on 224 x 224 x 112 volumes (RAS,
# 1.5 x 1.5 x 3 mm, HU window -1000...1000, i.e. a 336 mm field of view) + a BERT-base-size text tower on the
# findings + impression sections (512 tokens), global batch 32 in bf16, 30k steps (~20 epochs of one
# reconstruction per scan).
# Data: data/ct_rate/manifest.jsonl prepared with datasets/ct_rate.py (see datasets/ct_rate.md).
# Run:  python tools/train.py configs/ct_clip.py [--cfg-options train.batch_size=16 train.accum_steps=2 ...]
# Swin instead of ViT: model.image_encoder=dict(_delete_=True, type="swin3d", ...) (sides multiples of 32).
_base_ = [
    "_base_/models/clip_vit_b16_bert.py",
    "_base_/datasets/ct_manifest.py",
    "_base_/schedules/adamw_cosine.py",
]

model = dict(
    # img_size: volume_size of _base_/datasets/ct_manifest.py, which also sets the pipelines' CropOrPad size
    image_encoder=dict(
        _delete_=True, type="vit3d", patch_size=(16, 16, 8), in_chans=1, hidden_size=768,
        mlp_dim=3072, num_layers=12, num_heads=12, grad_checkpointing=True,
    ),
    text_encoder=dict(max_length=512),  # CT-RATE findings run to a few hundred words
    heads=[dict(type="clip", embed_dim=512)],
)
optim = dict(lr=1e-4, weight_decay=0.2, warmup_steps=1000)
train = dict(max_steps=30000, batch_size=32, num_workers=8, amp="bf16", log_interval=50, val_interval=1000,
             ckpt_interval=1000)
