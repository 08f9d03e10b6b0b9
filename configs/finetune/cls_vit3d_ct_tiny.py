# configs/finetune/cls_vit3d_ct.py shrunk to the synthetic CT set (datasets/synthetic.py --kind ct; five findings
# drawn into each volume): the tiny 3D CLIP demo's image tower (configs/demo/ct_clip_tiny.py; set model.init_from
# to its work dir, None: random initialisation) with LoRA and a new multi-label head, a few minutes on 2 CPU cores.
_base_ = ["../demo/ct_clip_tiny.py"]

model = dict(
    init_from=None,  # e.g. work_dirs/ct_clip_tiny
    mode="lora",
    lora=dict(rank=8, alpha=16, dropout=0.0),
    image_encoder=dict(drop_path_rate=0.0),
    text_encoder=None,
    heads=[dict(type="multilabel_cls", name="cls",
                label_names=["cardiomegaly", "consolidation", "emphysema", "lung nodule", "pleural effusion"])],
)
data = dict(label_fraction=None, label_fraction_seed=0)
optim = dict(lr=1e-3, weight_decay=0.05, warmup_steps=20)
train = dict(max_steps=200, batch_size=16, best_metric="val/cls/macro_auroc", best_mode="max", val_interval=100,
             ckpt_interval=100)
