# Multi-class fine-tuning on the synthetic DICOM demo set: each study is "cardiomegaly", "pleural effusion" or
# "no finding" (all four findings absent); studies with other or several findings have no class and are left out
# of the loss. The tiny CLIP demo's image tower (model_zoo/cxr_clip_tiny) fine-tuned in full with layer-wise
# learning-rate decay; best checkpoint by macro one-vs-rest AUROC.
_base_ = ["cls_vit_cxr_tiny.py"]

model = dict(
    mode="full",
    lora=None,
    heads=[dict(type="multiclass_cls", name="cls", label_names=["cardiomegaly", "pleural effusion"],
                background="no finding")],
)
optim = dict(lr=5e-4, layer_decay=0.75)
