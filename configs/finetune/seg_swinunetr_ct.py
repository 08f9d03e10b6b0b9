# Segmentation of CT findings with SwinUNETR (Hatamizadeh et al. 2022): mmvl's 3D Swin (MONAI's SwinUNETR Swin,
# embed_dim 48, depths 2-2-2-2) pretrained by CLIP on CT-RATE (configs/ct_clip.py with the Swin tower, its header
# shows how; model.init_from: that work dir or zoo entry) under SwinUNETR's decoder of MONAI's blocks (feature size =
# the Swin's embed_dim, as SwinUNETR ties them). SwinUNETR's recipe: 96^3 ROIs at 1.5 mm, AdamW 1e-4, Dice + CE
# (here Dice + BCE: one sigmoid per finding, masks overlap), sliding-window inference with overlap 0.5 over whole
# scans (tools/predict.py --whole-scan); best checkpoint by validation mean Dice. Windowed attention takes any
# side that is a multiple of 32, so the ROI (volume_size) is free of the pretraining's crop size. Other modes:
# linear, lora, lora+head.
# Run:  python tools/train.py configs/finetune/seg_swinunetr_ct.py --cfg-options model.init_from=work_dirs/ct_clip_swin
_base_ = ["../ct_clip.py"]

volume_size = (96, 96, 96)
spacing = (1.5, 1.5, 1.5)
model = dict(
    init_from=None,
    mode="full",
    image_encoder=dict(_delete_=True, type="swin3d", embed_dim=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24),
                       window_size=7, patch_size=2, drop_path_rate=0.1, grad_checkpointing=True),
    text_encoder=None,
    heads=[dict(type="segmentation", name="seg", decoder="swinunetr", sw_overlap=0.5,
                label_names=["Lung nodule", "Pleural effusion", "Emphysema", "Cardiomegaly", "Consolidation"])],
)
data = dict(label_fraction=None, label_fraction_seed=0)
optim = dict(lr=1e-4, weight_decay=1e-5, warmup_steps=500)
train = dict(max_steps=30000, batch_size=2, accum_steps=2, best_metric="val/seg/mean_dice", best_mode="max",
             val_interval=500, ckpt_interval=500)
