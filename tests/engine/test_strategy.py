"""Strategy: which blocks FSDP shards (timm's ``Sequential`` as well as ``ModuleList``s), gradients averaged in a few
bucketed all-reduces (gradient caching under DDP), and a global batch larger than an epoch refused at start."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import mmvl.models  # noqa: F401  (registers the encoders)
from mmvl.engine.data import build_train_loader
from mmvl.engine.strategy import gradient_buckets, transformer_blocks
from mmvl.errors import ConfigError
from mmvl.registry import ENCODERS
from tests.conftest import REPO, tiny_clip_config
from tests.engine.test_distributed import torchrun


def _count(model: nn.Module) -> tuple[int, set[str]]:
    blocks = transformer_blocks(model)
    return len(blocks), {type(block).__name__ for block in blocks}


def test_blocks_of_every_tower_whatever_their_container():
    vit = ENCODERS.build(dict(type="vit2d", model_name="vit_tiny_patch16_224", img_size=32, patch_size=8,
                              embed_dim=32, depth=3, num_heads=2))
    assert isinstance(vit.model.blocks, nn.Sequential)  # what the old ModuleList-only rule missed
    assert _count(vit) == (3, {"Block"})
    vit3d = ENCODERS.build(dict(type="vit3d", img_size=16, patch_size=8, hidden_size=32, mlp_dim=64, num_layers=2,
                                num_heads=2))
    assert _count(vit3d) == (2, {"TransformerBlock"})

    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                intermediate_size=64), add_pooling_layer=False)
    assert _count(bert) == (4, {"BertLayer"})

    from open_clip.transformer import VisionTransformer

    tower = VisionTransformer(image_size=32, patch_size=8, width=32, layers=5, heads=2, mlp_ratio=2.0, output_dim=16)
    assert _count(tower) == (5, {"ResidualAttentionBlock"})


def test_innermost_blocks_only_and_no_leaf_layers():
    swin = ENCODERS.build(dict(type="swin2d", model_name="swin_tiny_patch4_window7_224", img_size=32, patch_size=4,
                               window_size=2, embed_dim=16, depths=(1, 2), num_heads=(1, 2)))
    assert _count(swin) == (3, {"SwinTransformerBlock"})  # the blocks of each stage, not the stages
    mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    frozen = nn.ModuleList(nn.Sequential(nn.Linear(4, 4)) for _ in range(2)).requires_grad_(False)
    assert transformer_blocks(nn.ModuleDict({"mlp": mlp, "frozen": frozen})) == []


def test_gradient_buckets_cut_by_size_and_dtype():
    grads = [torch.zeros(10), torch.zeros(10), torch.zeros(30), torch.zeros(4, dtype=torch.float64), torch.zeros(1)]
    buckets = gradient_buckets(grads, bucket_bytes=80)
    assert [[len(g) for g in bucket] for bucket in buckets] == [[10, 10], [30], [4], [1]]
    assert len(gradient_buckets(grads[:3], bucket_bytes=25 * 2**20)) == 1


@pytest.mark.slow
def test_fsdp_units_and_bucketed_grad_cache_reduction_on_two_ranks(synthetic_cxr, tmp_path, one_thread):
    """2 processes (gloo): a timm ViT of depth 3 is 3 + 1 FSDP units; a gradient-caching DDP step all-reduces its
    gradients in one flat bucket (before: one all-reduce per parameter)."""
    cfg = tiny_clip_config(synthetic_cxr, "train.batch_size=4", "train.max_steps=2", "train.grad_cache_chunks=2",
                           "train.val_interval=100", "train.ckpt_interval=100")
    cfg.dump(tmp_path / "config.py")
    torchrun(str(REPO / "tests" / "engine" / "strategy_worker.py"), str(tmp_path), str(tmp_path / "config.py"),
             str(tmp_path / "work"))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in ranks:
        assert result["world_size"] == 2
        fsdp = result["fsdp_units"]
        assert len(fsdp["units"]) == fsdp["depth"] + 1 == 4, fsdp["units"]
        assert set(fsdp["units"]) == {"", "model.blocks.0", "model.blocks.1", "model.blocks.2"}

        buckets = result["buckets"]  # 10+10 | 10 | 30 | 5 floats with 20 per bucket; averages of 1 and 2
        assert buckets["all_reduces"] == 4
        assert buckets["grads"] == [[1.5] * 10] * 3 + [[1.5] * 30, [0.0] * 5]

        cached = result["grad_cache"]
        assert len(cached["steps"]) == 2 and cached["parameters"] > 30
        for sizes in cached["steps"]:
            # the contrastive head's embedding gather, the gradients in one flat bucket (the tiny model is under
            # 25 MiB) and the rank agreement: 3 all-reduces, where one per parameter made 70 more
            assert sizes.count(cached["numel"]) == 1, sizes
            assert len(sizes) == 3, sizes


def _strategy(world_size: int, rank: int = 0) -> SimpleNamespace:
    return SimpleNamespace(dist=SimpleNamespace(world_size=world_size, rank=rank), device=torch.device("cpu"))


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows: int):
        self.rows = rows

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index):
        return {"image": torch.zeros(1)}


def test_global_batch_larger_than_an_epoch_is_refused_with_the_numbers():
    train_cfg = {"batch_size": 4, "num_workers": 0, "seed": 0}
    with pytest.raises(ConfigError, match=r"train.batch_size 4 x 2 processes .* 7 training rows"):
        build_train_loader(_Rows(7), None, train_cfg, _strategy(2))
    loader, sampler = build_train_loader(_Rows(8), None, train_cfg, _strategy(2, rank=1))
    assert len(sampler) == 4


class _Stream(torch.utils.data.IterableDataset):
    """8 rows in all, of which this rank's share is 3 (as a shard split gives each rank and worker its part)."""

    def __init__(self):
        self.epochs = 0

    def __len__(self) -> int:
        return 8

    def set_epoch(self, epoch: int, start: int = 0, batch_size: int = 1) -> None:
        self.epochs += 1
        if self.epochs > 3:
            raise RuntimeError("train_batches went on to a fourth empty epoch")

    def __iter__(self):
        return iter([{"image": torch.zeros(1)}] * 3)


def test_a_stream_that_never_fills_a_batch_is_refused_not_looped():
    from mmvl.data.loader import Collate
    from mmvl.engine.data import train_batches
    from mmvl.engine.state import RunState

    stream = _Stream()
    train_cfg = {"batch_size": 4, "num_workers": 0, "seed": 0}
    loader, sampler = build_train_loader(stream, Collate(), train_cfg, _strategy(1))
    trainer = SimpleNamespace(state=RunState(), loader=loader, sampler=sampler, train_cfg=train_cfg,
                              strategy=_strategy(1), train_set=stream)
    with pytest.raises(ConfigError, match=r"8 training rows gave no batch of train.batch_size 4 \(x 1 processes"):
        next(train_batches(trainer))
    assert stream.epochs == 1


def test_positional_optimizer_state_is_keyed_by_name_for_fsdp():
    """A 1-process/DDP optimizer state (parameters by position) gets this optimizer's parameter names, as FSDP's
    ``set_state_dict`` reads it; a name-keyed state passes unchanged; other group sizes are refused."""
    from mmvl.engine.strategy import optimizer_state_by_name
    from mmvl.errors import CheckpointError

    model = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3))
    model[1].requires_grad_(False)
    optimizer = torch.optim.AdamW([{"params": [model[0].weight]}, {"params": [model[0].bias]}])
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    named = optimizer_state_by_name(model, optimizer, state)
    assert [group["params"] for group in named["param_groups"]] == [["0.weight"], ["0.bias"]]
    assert torch.equal(named["state"]["0.bias"]["exp_avg"], state["state"][1]["exp_avg"])
    assert optimizer_state_by_name(model, optimizer, named) == named
    one_group = {"state": state["state"], "param_groups": [{**state["param_groups"][0], "params": [0, 1]}]}
    with pytest.raises(CheckpointError, match=r"groups of \[2\] parameters"):
        optimizer_state_by_name(model, optimizer, one_group)
