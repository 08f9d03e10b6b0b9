# 2D chest X-ray studies from an mmvl manifest (see datasets/README.md). DICOM is read with its rescale,
# VOI LUT / window and MONOCHROME1 inversion; images are resized keeping aspect, padded, and normalised.
# img_size sizes the whole run: ResizePad's size in both pipelines and the image encoder's img_size are filled
# from it (mmvl/config/validate.py), so `--cfg-options img_size=448` changes all three; do not set them here.
img_size = 224
data = dict(
    type="manifest",
    manifest="data/mimic_cxr/manifest.jsonl",
    prepare_hint=(
        "Prepare MIMIC-CXR with `python datasets/mimic_cxr.py ... --out data/mimic_cxr/manifest.jsonl` "
        "(see datasets/mimic_cxr.md), point data.manifest at your own manifest with "
        "--cfg-options data.manifest=PATH, or run `make demo` to train on the synthetic demo set."
    ),
    # Manifest images must lie inside root (None: the manifest's folder); a path escaping it is refused unless
    # allow_outside_root=True, so a manifest from elsewhere cannot make a run read arbitrary files. The
    # converters print the root to set when the images live outside the manifest's folder.
    root=None,
    allow_outside_root=False,
    # type="shards" streams the webdataset shards tools/make_shards.py wrote into `shards` instead of reading the
    # manifest: split over ranks and loader workers, shuffled through a buffer, or drawn with replacement
    shards=None,
    shuffle_buffer=1000,
    resampled=False,
    train_split="train",
    val_split="val",
    report_sections=("findings", "impression"),
    on_error="skip",  # unreadable files are skipped and listed in <work_dir>/skipped.jsonl ("raise" to stop)
    max_skip_fraction=0.01,  # stop when more than this fraction of training samples could not be read
    cache=None,  # None, "memory" (MONAI CacheDataset) or "disk" (.npy + .json per image under cache_dir)
    cache_dir=None,  # default <work_dir>/cache; point several runs at one folder to share it
    cache_workers=0,  # threads filling the memory cache at start-up
    train_pipeline=[
        dict(type="LoadImage", frame=0, voi="auto"),
        dict(type="ResizePad"),  # size: img_size
        dict(type="RandomAugment2D", crop_scale=(0.5, 1.0), rotate=10.0, brightness=0.1, contrast=0.1),
        dict(type="Normalize", mean=0.5, std=0.25),
    ],
    eval_pipeline=[
        dict(type="LoadImage", frame=0, voi="auto"),
        dict(type="ResizePad"),  # size: img_size
        dict(type="Normalize", mean=0.5, std=0.25),
    ],
)
