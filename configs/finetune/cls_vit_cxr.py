# Multi-label fine-tuning on MIMIC-CXR's CheXpert labels (the five of the CheXpert competition, Irvin et al. 2019)
# from a CLIP-pretrained ViT-B/16 (configs/cxr_clip.py): the image tower of model.init_from (a work dir or a
# model-zoo entry, by folder or name; None: random initialisation) with a new linear head, fine-tuned in full with
# layer-wise learning-rate decay 0.65 and DropPath 0.1 as MAE fine-tunes ViT-B on chest X-rays (Xiao et al. 2023),
# binary cross-entropy, best checkpoint by macro AUROC on the validation split.
# Other modes: --cfg-options model.mode=linear (frozen encoder), lora or lora+head (model.lora: rank, alpha,
# dropout, targets); label-efficiency: data.label_fraction=0.01 (seeded by data.label_fraction_seed).
# Data: data/mimic_cxr/manifest.jsonl with labels (datasets/mimic_cxr.py --chexpert ...).
# Run:  python tools/train.py configs/finetune/cls_vit_cxr.py --cfg-options model.init_from=work_dirs/cxr_clip
_base_ = ["../cxr_clip.py"]

model = dict(
    init_from=None,  # a work dir of configs/cxr_clip.py, or a zoo entry with the same image encoder
    mode="full",
    image_encoder=dict(drop_path_rate=0.1),
    text_encoder=None,
    heads=[dict(type="multilabel_cls", name="cls", dropout=0.0,
                label_names=["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"])],
)
data = dict(label_fraction=None, label_fraction_seed=0)
optim = dict(lr=5e-4, weight_decay=0.05, warmup_steps=500, layer_decay=0.65, encoder_lr_mult=1.0)
train = dict(max_steps=10000, batch_size=128, best_metric="val/cls/macro_auroc", best_mode="max",
             val_interval=500, ckpt_interval=500)
