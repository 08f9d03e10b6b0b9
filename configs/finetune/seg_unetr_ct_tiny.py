# configs/finetune/seg_unetr_ct.py shrunk to the synthetic CT set (datasets/synthetic_ct.py: five findings drawn
# into each volume, each with its NIfTI mask): the tiny 3D CLIP demo's image tower (configs/demo/ct_clip_tiny.py,
# 48^3 at 8 mm, 4 blocks of width 128, 8^3-voxel patches; set model.init_from to its work dir, None: random
# initialisation) with a UNETR decoder (feature size 8: three 2x upsamplings of the 6^3 token grid, skips from
# blocks 1 and 3), batch 4, 200 steps.
# Measured (2 December 2026, 400-study synthetic set, 2 shared CPU cores at load 8-17: ~31 min): validation mean
# Dice 0.351 from the CT CLIP demo encoder, 0.356 from random initialisation (cardiomegaly ~0.78, effusion ~0.74,
# consolidation ~0.25, nodule and emphysema 0); README "Segmentation".
# Run:  python datasets/synthetic_ct.py --out data/synthetic_ct --formats nifti
#       python tools/train.py configs/finetune/seg_unetr_ct_tiny.py --cfg-options model.init_from=work_dirs/ct_clip_tiny
_base_ = ["../demo/ct_clip_tiny.py"]

model = dict(
    init_from=None,  # e.g. work_dirs/ct_clip_tiny
    mode="full",
    image_encoder=dict(token_drop=0.0, drop_path_rate=0.0),  # the decoder needs every patch token
    text_encoder=None,
    heads=[dict(type="segmentation", name="seg", feature_size=8,
                label_names=["cardiomegaly", "consolidation", "emphysema", "lung nodule", "pleural effusion"])],
)
data = dict(
    # the base's augmentation (a 10-degree, 10% affine of every other volume, an intensity shift) moves the masks
    # with the volumes; no left-right flip, as in the base
    cache="memory",
)
optim = dict(lr=1e-3, weight_decay=0.05, warmup_steps=20)
train = dict(max_steps=200, batch_size=4, best_metric="val/seg/mean_dice", best_mode="max", val_interval=50,
             ckpt_interval=50)
