# configs/ct_mae.py shrunk to train on the synthetic CT set (datasets/synthetic_ct.py, NIfTI copy) in a few
# minutes on 2 CPU cores: volumes resampled to 12 mm and cropped/padded to 32 x 32 x 24, 8^3-voxel patches
# (4 x 4 x 3 = 48, 36 masked), 4-layer 3D ViT (dim 96), decoder 96-d x 2 blocks x 4 heads, norm_pix_loss,
# batch 16, 200 steps. Full size: ViT-B at 224 x 224 x 112 (1.5 x 1.5 x 3 mm) on CT-RATE, 16^3 patches,
# decoder 384-d x 4 x 12, batch 32, 100k steps.
_base_ = ["../ct_mae.py"]

volume_size = (32, 32, 24)  # fills the encoder's img_size and the pipelines' CropOrPad size
spacing = (12.0, 12.0, 12.0)
model = dict(
    image_encoder=dict(patch_size=(8, 8, 8), hidden_size=96, mlp_dim=192, num_layers=4,
                       num_heads=4, grad_checkpointing=False),
    heads=[dict(type="mae", mask_ratio=0.75, decoder_dim=96, decoder_depth=2, decoder_heads=4,
                norm_pix_loss=True)],
)
data = dict(
    manifest="data/synthetic_ct/manifest_nifti.jsonl",
    prepare_hint="Build it with `python datasets/synthetic.py --kind ct --out data/synthetic_ct`.",
    train_pipeline=[
        dict(type="LoadVolume", modalities=("CT",)),
        dict(type="Orient", axcodes="RAS"),
        dict(type="Resample"),
        dict(type="IntensityWindow"),
        dict(type="CropOrPad", pad_value=0.0),
        dict(type="RandomAugment3D", flip_axes=(0,), rotate=10.0, scale=0.1, intensity_shift=0.05),
        dict(type="Normalize", mean=0.5, std=0.25),
    ],
    # eval_pipeline: the base's, at this config's volume_size and spacing
)
optim = dict(lr=1e-3, weight_decay=0.05, warmup_steps=20)
train = dict(max_steps=200, batch_size=16, num_workers=2, amp=None, log_interval=10, val_interval=50,
             ckpt_interval=100, vis_interval=200)
