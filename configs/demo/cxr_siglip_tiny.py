# configs/cxr_siglip.py shrunk to train on the synthetic DICOM demo set (datasets/synthetic.py) in a few
# minutes on 2 CPU cores: the tiny CLIP demo (64 px, 4-layer ViT and 2-layer BERT of width 128, batch 32) with
# the SigLIP head in place of InfoNCE. Full size: configs/cxr_siglip.py (ViT-B/16 at 224 px, batch 256).
# Scale and bias (issue 22): with the default optim.scalar_lr (None: the optimizer's lr, 1e-3, no decay) they end the
# 360 steps at 9.99 / -10.00 from 10 / -10; with scalar_lr 0.01 at 9.90 / -9.97, with 0.03 at 9.55 / -9.91. Thirty
# times the step size moves them by less than half a unit (Adam at 0.03 could have moved the log scale by ~5), which
# suggests they sit near where this loss wants them, not stuck for want of a learning rate; nor did the larger
# rates retrieve better: val R@5 (i2t / t2i, 80 studies, step 360) 0.300 / 0.325 at the default, 0.237 / 0.275 at
# 0.01, 0.200 / 0.262 at 0.03; test R@5 (80 studies, best.pt by val i2t R@5) 0.225 / 0.250, 0.338 / 0.188,
# 0.250 / 0.225; the CLIP demo (cxr_clip_tiny.py, same code and load) 0.325 / 0.412 val, 0.262 / 0.363 test;
# chance 0.0625. So the default stays. Measured 2 December 2026 on data/synthetic_cxr (--n 800 --size 128 --seed 0),
# one thread per run, two runs at a time, 2 CPU cores at load 6-8 (~4-5 min a run).
_base_ = ["cxr_clip_tiny.py"]

model = dict(heads=[dict(type="siglip", embed_dim=128, init_logit_scale=10.0, init_logit_bias=-10.0)])
