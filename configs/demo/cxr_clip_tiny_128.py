# configs/demo/cxr_clip_tiny.py at the synthetic set's own 128 px (same 4-layer ViT with 8 px patches, so a
# 16 x 16 patch grid, same text tower, batch 32, 360 steps): the global-only baseline that
# configs/demo/cxr_clip_local_tiny.py adds local alignment to. At the 64 px of cxr_clip_tiny.py a nodule (drawn
# 7-10% of the image height across, datasets/synthetic.py) is 4.5-6.4 px, smaller than one 8 px patch, so a map on
# its 8 x 8 grid peaks at a patch centre that the nodule usually misses even when the right patch is picked; at
# 128 px it is 9-13 px, one to two patches across, and the pointing game can tell whether a model finds it.
_base_ = ["cxr_clip_tiny.py"]

img_size = 128
