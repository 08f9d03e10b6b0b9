# Segmentation of CT findings from a CLIP-pretrained 3D ViT-B (configs/ct_clip.py, CT-RATE): its image tower
# (model.init_from: work dir or zoo entry) under a UNETR decoder (Hatamizadeh et al. 2022) of MONAI's blocks, one
# sigmoid per finding (masks overlap) trained with Dice + BCE (MONAI DiceCELoss), best checkpoint by the validation
# mean Dice. The recipe follows UNETR's fine-tuning: the whole network trains (mode="full"), AdamW at 1e-4 with
# layer-wise decay 0.75 on the pretrained blocks (the decoder is new and trains at the full rate), DropPath 0.1,
# bf16. Training volumes are the pretraining's 224 x 224 x 112 at 1.5 x 1.5 x 3 mm (the encoder's position
# embedding fixes the ROI); tools/predict.py --whole-scan segments whole scans by sliding windows of that size
# (train with random crops for that: a ViT trained on centred crops only is shift-sensitive).
# The encoder's 16 x 16 x 8 patches are decoded on an isotropic 224^3 grid (see UnetrDecoder).
# Masks: manifest rows' "masks" (label -> NIfTI in the volume's grid), e.g. CT-RATE with lesion masks of your own or
# a public lesion set converted to an mmvl manifest (datasets/README.md). Other modes: model.mode=linear (frozen
# encoder, decoder trains), lora / lora+head (adapters plus the decoder).
# Run:  python tools/train.py configs/finetune/seg_unetr_ct.py --cfg-options model.init_from=work_dirs/ct_clip
_base_ = ["../ct_clip.py"]

model = dict(
    init_from=None,
    mode="full",
    image_encoder=dict(drop_path_rate=0.1, token_drop=0.0),
    text_encoder=None,
    heads=[dict(type="segmentation", name="seg", feature_size=16, sw_overlap=0.25,
                label_names=["Lung nodule", "Pleural effusion", "Emphysema", "Cardiomegaly", "Consolidation"])],
)
data = dict(label_fraction=None, label_fraction_seed=0)
optim = dict(lr=1e-4, weight_decay=0.05, warmup_steps=500, layer_decay=0.75)
train = dict(max_steps=20000, batch_size=2, accum_steps=4, best_metric="val/seg/mean_dice", best_mode="max",
             val_interval=500, ckpt_interval=500)
