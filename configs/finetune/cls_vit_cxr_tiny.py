# configs/finetune/cls_vit_cxr.py shrunk to the synthetic DICOM demo set (datasets/synthetic.py: four findings
# drawn into each image, ground truth in the manifest's labels): the image tower of the tiny CLIP demo
# (configs/demo/cxr_clip_tiny.py; its zoo entry model_zoo/cxr_clip_tiny) fine-tuned with LoRA (rank 8 on the
# attention and MLP projections) and a new multi-label head, a few minutes on 2 CPU cores.
# Random initialisation instead: --cfg-options model.init_from=None model.mode=full model.lora=None
_base_ = ["../demo/cxr_clip_tiny.py"]

model = dict(
    init_from="cxr_clip_tiny",  # the zoo entry (model_zoo/index.json); or a work dir of configs/demo/cxr_clip_tiny.py
    mode="lora",
    lora=dict(rank=8, alpha=16, dropout=0.0),
    text_encoder=None,
    heads=[dict(type="multilabel_cls", name="cls",
                label_names=["cardiomegaly", "nodule", "pleural effusion", "pneumothorax"])],
)
data = dict(label_fraction=None, label_fraction_seed=0)
optim = dict(lr=1e-3, weight_decay=0.05, warmup_steps=20, layer_decay=1.0)
train = dict(max_steps=200, batch_size=32, num_workers=0, best_metric="val/cls/macro_auroc", best_mode="max",
             val_interval=100, ckpt_interval=100)
