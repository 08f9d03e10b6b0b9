# 3D chest CT studies from an mmvl manifest whose rows point at NIfTI files or DICOM series folders (see
# datasets/README.md), e.g. CT-RATE converted with datasets/ct_rate.py. Volumes are reoriented to RAS,
# resampled to 1.5 x 1.5 x 3 mm, windowed to -1000...1000 HU and scaled to [0, 1], then centre-cropped or
# padded (with air) to a fixed size. Full size here; demo configs override `volume_size` and `spacing`.
# The three knobs fill the pipelines' CropOrPad size, Resample spacing and IntensityWindow low/high, and
# volume_size the image encoder's img_size (mmvl/config/validate.py): set them here or with --cfg-options, never
# in the steps themselves.
volume_size = (224, 224, 112)
spacing = (1.5, 1.5, 3.0)
hu_window = (-1000.0, 1000.0)
data = dict(
    type="manifest",
    manifest="data/ct_rate/manifest.jsonl",
    prepare_hint=(
        "Prepare CT-RATE with `python datasets/ct_rate.py ...` (see datasets/ct_rate.md), point data.manifest "
        "at your own manifest with --cfg-options data.manifest=PATH, or build the synthetic CT set with "
        "`python datasets/synthetic.py --kind ct --out data/synthetic_ct`."
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
    on_error="skip",  # unreadable volumes are skipped and listed in <work_dir>/skipped.jsonl ("raise" to stop)
    max_skip_fraction=0.01,  # stop when more than this fraction of training samples could not be read
    cache="disk",  # reading and resampling a CT dominates step time; cache the deterministic steps
    cache_dir=None,  # default <work_dir>/cache; point several runs at one folder to share it
    cache_workers=0,
    train_pipeline=[
        dict(type="LoadVolume", modalities=("CT",)),
        dict(type="Orient", axcodes="RAS"),
        dict(type="Resample"),  # spacing: spacing
        dict(type="IntensityWindow"),  # low, high: hu_window
        dict(type="CropOrPad", pad_value=0.0),  # size: volume_size
        # No left-right flip (axis 0 in RAS): reports name the side of effusions, nodules and consolidations.
        dict(type="RandomAugment3D", flip_axes=(), rotate=10.0, scale=0.1, intensity_shift=0.05),
        dict(type="Normalize", mean=0.5, std=0.25),
    ],
    eval_pipeline=[
        dict(type="LoadVolume", modalities=("CT",)),
        dict(type="Orient", axcodes="RAS"),
        dict(type="Resample"),  # spacing: spacing
        dict(type="IntensityWindow"),  # low, high: hu_window
        dict(type="CropOrPad", pad_value=0.0),  # size: volume_size
        dict(type="Normalize", mean=0.5, std=0.25),
    ],
)
