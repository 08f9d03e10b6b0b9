# The synthetic DICOM chest X-ray demo set (datasets/synthetic.py; `make demo` builds it) at 64 px, as the 2D
# demo configs train on it: aspect-kept resize and pad, light augmentation (random resized crop 0.7-1.0 of the
# area, 5 degree rotation, brightness/contrast 0.1). img_size sizes the pipelines and the encoder alike.
img_size = 64
data = dict(
    manifest="data/synthetic_cxr/manifest.jsonl",
    prepare_hint="Build it with `python datasets/synthetic.py --out data/synthetic_cxr` (or `make demo`).",
    train_pipeline=[
        dict(type="LoadImage", frame=0, voi="auto"),
        dict(type="ResizePad"),  # size: img_size
        dict(type="RandomAugment2D", crop_scale=(0.7, 1.0), rotate=5.0, brightness=0.1, contrast=0.1),
        dict(type="Normalize", mean=0.5, std=0.25),
    ],
    eval_pipeline=[
        dict(type="LoadImage", frame=0, voi="auto"),
        dict(type="ResizePad"),  # size: img_size
        dict(type="Normalize", mean=0.5, std=0.25),
    ],
)
