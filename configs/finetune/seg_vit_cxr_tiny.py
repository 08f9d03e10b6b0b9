# Segmentation on the synthetic DICOM demo set (datasets/synthetic.py: four findings drawn into each image, each
# with its PNG mask in the manifest's "masks"): the image tower of the tiny CLIP demo (configs/demo/cxr_clip_tiny.py,
# 64 px, 8-pixel patches, 4 blocks of width 128; its zoo entry model_zoo/cxr_clip_tiny) with LoRA (rank 8) and a
# 2D UNETR decoder (MONAI's blocks with spatial_dims=2, feature size 16: three 2x upsamplings of the 8 x 8 token grid),
# Dice + BCE, best checkpoint by validation mean Dice; a few minutes on 2 CPU cores. The decoder is new, so LoRA
# trains it whole with the adapters.
# Random initialisation instead: --cfg-options model.init_from=None model.mode=full model.lora=None
# Predicted masks come back at each image's own size (tools/predict.py undoes the resize and pad).
_base_ = ["../demo/cxr_clip_tiny.py"]

model = dict(
    init_from="cxr_clip_tiny",  # the zoo entry (model_zoo/index.json); or a work dir of configs/demo/cxr_clip_tiny.py
    mode="lora",
    lora=dict(rank=8, alpha=16, dropout=0.0),
    text_encoder=None,
    heads=[dict(type="segmentation", name="seg", feature_size=16,
                label_names=["cardiomegaly", "nodule", "pleural effusion", "pneumothorax"])],
)
data = dict(label_fraction=None, label_fraction_seed=0)
optim = dict(lr=1e-3, weight_decay=0.05, warmup_steps=20, layer_decay=1.0)
train = dict(max_steps=200, batch_size=32, num_workers=0, best_metric="val/seg/mean_dice", best_mode="max",
             val_interval=100, ckpt_interval=100)
