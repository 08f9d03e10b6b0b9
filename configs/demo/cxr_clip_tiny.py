# configs/cxr_clip.py shrunk to train on the synthetic DICOM demo set (datasets/synthetic.py) in a few
# minutes on 2 CPU cores: 64 px input, 4-layer ViT (dim 128), 2-layer BERT (dim 128), batch 32.
_base_ = ["../cxr_clip.py", "_base_/synthetic_cxr_64.py"]

model = dict(
    # Trained from scratch, average-pooled tokens separate images (and reports) far earlier than a
    # [CLS] token does; with [CLS] the contrastive loss sits at log(batch) for ~100 steps first.
    image_encoder=dict(model_name="vit_tiny_patch16_224", patch_size=8, embed_dim=128,
                       depth=4, num_heads=4, global_pool="avg"),
    text_encoder=dict(
        config=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                    max_position_embeddings=128),
        tokenizer=dict(type="wordpiece", vocab_size=1000, min_frequency=2),
        pooling="mean",
        max_length=64,
    ),
    heads=[dict(type="clip", embed_dim=128)],
)
optim = dict(lr=1e-3, weight_decay=0.05, warmup_steps=30)
train = dict(max_steps=360, batch_size=32, num_workers=2, amp=None, log_interval=10, val_interval=120,
             ckpt_interval=120)
