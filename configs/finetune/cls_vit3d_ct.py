# Multi-label fine-tuning on CT-RATE's abnormality labels (Hamamci et al. 2024) from a CLIP-pretrained 3D ViT-B
# (configs/ct_clip.py): its image tower (model.init_from: work dir or zoo entry) with a new linear head, in full
# with layer-wise learning-rate decay 0.75 and DropPath 0.1, bf16; best checkpoint by macro AUROC.
# Other modes and label fractions as configs/finetune/cls_vit_cxr.py.
# Run:  python tools/train.py configs/finetune/cls_vit3d_ct.py --cfg-options model.init_from=work_dirs/ct_clip
_base_ = ["../ct_clip.py"]

model = dict(
    init_from=None,
    mode="full",
    image_encoder=dict(drop_path_rate=0.1),
    text_encoder=None,
    heads=[dict(type="multilabel_cls", name="cls",
                label_names=["Lung nodule", "Pleural effusion", "Emphysema", "Cardiomegaly", "Consolidation"])],
)
data = dict(label_fraction=None, label_fraction_seed=0)
optim = dict(lr=5e-4, weight_decay=0.05, warmup_steps=500, layer_decay=0.75)
train = dict(max_steps=10000, batch_size=16, best_metric="val/cls/macro_auroc", best_mode="max",
             val_interval=500, ckpt_interval=500)
