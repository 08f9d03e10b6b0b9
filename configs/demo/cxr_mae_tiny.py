# configs/cxr_mae.py shrunk to train on the synthetic DICOM demo set (datasets/synthetic.py) in a few minutes
# on 2 CPU cores: 64 px input, 8 px patches (64 patches, 48 masked), 4-layer ViT (dim 128), decoder 128-d x 2
# blocks x 4 heads, norm_pix_loss, batch 32, 300 steps; reconstructions drawn to <work_dir>/vis/ at the end.
# Full size: ViT-B/16 at 224 px on MIMIC-CXR, decoder 512-d x 8 x 16, batch 256, 150k steps.
_base_ = ["../cxr_mae.py", "_base_/synthetic_cxr_64.py"]

model = dict(
    image_encoder=dict(model_name="vit_tiny_patch16_224", patch_size=8, embed_dim=128,
                       depth=4, num_heads=4),
    heads=[dict(type="mae", mask_ratio=0.75, decoder_dim=128, decoder_depth=2, decoder_heads=4,
                norm_pix_loss=True)],
)
optim = dict(lr=1e-3, weight_decay=0.05, warmup_steps=30)
train = dict(max_steps=300, batch_size=32, num_workers=2, amp=None, log_interval=10, val_interval=100,
             ckpt_interval=100, vis_interval=300)
