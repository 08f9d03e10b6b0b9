"""The local alignment head (mmvl/models/heads/local_align.py): GLoRIA's word-to-patch loss against a slow reference
written out with Python loops, its gradients, 2D and 3D ViT token grids, the heatmap interface, the combination with
the CLIP head, two gloo ranks against one process, and a few training steps of the tiny demo config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mmvl.errors import ConfigError
from mmvl.evaluation.grounding import build_texts, similarity_maps
from mmvl.models import build_model
from mmvl.models.encoders.base import EncoderOutput
from mmvl.models.heads.local_align import word_mask
from mmvl.registry import ENCODERS, HEADS
from mmvl.utils import read_jsonl
from tests.conftest import TINY_CLIP, load_tool
from tests.models import test_models
from tests.models.test_losses import log_softmax_row
from tests.models.test_models import VIT as VIT2D  # 4 x 4 patches after a class token
from tests.models.test_models import text_cfg

REPO = Path(__file__).resolve().parents[2]
IMAGE_DIM, TEXT_DIM, EMBED_DIM = 6, 5, 4
VIT3D = dict(type="vit3d", img_size=16, patch_size=(8, 8, 4), hidden_size=32, mlp_dim=64, num_layers=1,
             num_heads=2)  # a 2 x 2 x 4 grid, no prefix token
# Attention masks of 6 reports, BERT layout [CLS] words [SEP] [PAD]: 7, 5, 2 (no words), 9, 4 and 6 tokens.
LENGTHS = [7, 5, 2, 9, 4, 6]


class PatchGrid:
    """What the head reads from a ViT image encoder: its patch grid and its number of prefix tokens."""

    def __init__(self, grid: tuple[int, ...], num_prefix_tokens: int):
        self.grid, self.num_prefix_tokens = grid, num_prefix_tokens


def build_head(grid=(2, 3), prefix=1, seed=0, image_dim=IMAGE_DIM, text_dim=TEXT_DIM, **options):
    torch.manual_seed(seed)
    return HEADS.build(dict(type="local_align", embed_dim=EMBED_DIM, **options), image_dim=image_dim,
                       text_dim=text_dim, image_encoder=PatchGrid(grid, prefix))


def toy_batch(lengths=LENGTHS, patches=6, prefix=1, seed=1, requires_grad=False):
    """Image tokens ``(B, prefix + patches, IMAGE_DIM)``, text tokens ``(B, T, TEXT_DIM)`` and attention masks."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(len(lengths), prefix + patches, IMAGE_DIM, generator=generator)
    text = torch.randn(len(lengths), max(lengths), TEXT_DIM, generator=generator)
    mask = torch.tensor([[1] * n + [0] * (max(lengths) - n) for n in lengths])
    return image.requires_grad_(requires_grad), text.requires_grad_(requires_grad), mask


def run(head, image, text, mask) -> dict:
    return head(EncoderOutput(pooled=image.mean(1), tokens=image),
                EncoderOutput(pooled=text.mean(1), tokens=text, attention_mask=mask), {})


# -- the slow reference: Python floats and loops, nothing shared with the head but its weights -------------------
def project(weight: list[list[float]], vector: list[float]) -> list[float]:
    return [sum(w * x for w, x in zip(row, vector)) for row in weight]


def unit(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector]


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def reference_loss(head, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> float:
    """GLoRIA's local loss as the head's docstring defines it, one image-report pair and one word at a time."""
    patch_weight = head.patch_proj.weight.double().tolist()
    word_weight = head.word_proj.weight.double().tolist()
    g1, g2, g3 = head.gamma1, head.gamma2, head.gamma3
    images = [[unit(project(patch_weight, token)) for token in tokens[head.num_prefix_tokens:]]
              for tokens in image.double().tolist()]
    reports = []
    for tokens, row in zip(text.double().tolist(), mask.tolist()):
        attended = [t for t, m in enumerate(row) if m == 1]
        reports.append([unit(project(word_weight, tokens[t])) for t in attended[1:-1]])  # no [CLS], [SEP]
    scores = [[0.0] * len(reports) for _ in images]
    for i, patches in enumerate(images):
        for j, words in enumerate(reports):
            if not words:
                continue  # a report without words scores 0
            total = 0.0
            for word in words:
                logits = [g1 * dot(word, patch) for patch in patches]
                top = max(logits)
                weights = [math.exp(v - top) for v in logits]
                attention = [w / sum(weights) for w in weights]
                region = [sum(a * patch[d] for a, patch in zip(attention, patches)) for d in range(len(word))]
                total += math.exp(g2 * dot(region, word) / math.sqrt(dot(region, region)))
            scores[i][j] = math.log(total) - (math.log(len(words)) if head.aggregation == "mean" else 0.0)
    logits = [[g3 * s for s in row] for row in scores]
    columns = [list(column) for column in zip(*logits)]
    n = len(logits)
    image_to_text = -sum(log_softmax_row(logits[i], i) for i in range(n)) / n
    text_to_image = -sum(log_softmax_row(columns[j], j) for j in range(n)) / n
    return (image_to_text + text_to_image) / 2


# float32 against float64: the head's products have at most a few dozen terms (unit roundoff 6e-8 each) and gamma2 *
# gamma3 = 50 scales a similarity's error into the logits, so ~1e-5 absolute on a loss of a few units.
LOSS_TOL = dict(rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("aggregation", ["sum", "mean"])
def test_loss_matches_loop_reference(aggregation):
    head = build_head(aggregation=aggregation)
    image, text, mask = toy_batch()
    loss = run(head, image, text, mask)["loss"].item()
    assert loss == pytest.approx(reference_loss(head, image, text, mask), **LOSS_TOL)


def test_reference_sees_what_the_head_is_given():
    """The comparison can fail: other temperatures, another word mask or another report give other losses."""
    head = build_head()
    image, text, mask = toy_batch()
    loss = run(head, image, text, mask)["loss"].item()
    head.gamma1 = 2.0
    assert loss != pytest.approx(reference_loss(head, image, text, mask), **LOSS_TOL)
    head.gamma1 = 4.0
    longer = mask.clone()
    longer[1, 5] = 1  # one more token: the old [SEP] becomes a word
    assert loss != pytest.approx(reference_loss(head, image, text, longer), **LOSS_TOL)
    other = text.clone()
    other[0, 3] += 1.0
    assert loss != pytest.approx(reference_loss(head, image, other, mask), **LOSS_TOL)


def test_word_mask_drops_cls_sep_and_padding_on_either_side():
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    assert word_mask(right).int().tolist() == [[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 0]]
    left = torch.tensor([[0, 0, 1, 1, 1, 1]])
    assert word_mask(left).int().tolist() == [[0, 0, 0, 1, 1, 0]]


def test_gradients_reach_image_and_text_tokens_and_the_projections():
    head = build_head()
    image, text, mask = toy_batch(requires_grad=True)
    run(head, image, text, mask)["loss"].backward()
    patch_grad = image.grad[:, 1:].abs().sum(-1)
    assert (patch_grad > 0).all()  # every patch of every image
    assert image.grad[:, 0].abs().sum() == 0  # the class token takes no part
    words = word_mask(mask)
    word_grad = text.grad.abs().sum(-1)
    assert (word_grad[words] > 0).all()
    assert word_grad[~words].sum() == 0  # [CLS], [SEP], padding, and the report without words
    assert head.patch_proj.weight.grad.abs().sum() > 0 and head.word_proj.weight.grad.abs().sum() > 0


def test_image_chunks_give_the_loss_and_gradients_of_one_pass():
    image, text, mask = toy_batch(requires_grad=True)
    results = []
    for chunk in (None, 4, 1):
        head = build_head(image_chunk=chunk)
        image.grad = text.grad = None
        loss = run(head, image, text, mask)["loss"]
        loss.backward()
        results.append((loss.detach(), image.grad.clone(), text.grad.clone(), head.patch_proj.weight.grad))
    for chunked in results[1:]:
        for mine, whole in zip(chunked, results[0]):
            # the same float32 operations on fewer rows, in another summation order: gradients sum terms scaled by
            # gamma2 * gamma3 = 50 that cancel, so near-zero entries differ by ~1e-6 of the largest one
            torch.testing.assert_close(mine, whole, rtol=1e-5, atol=1e-5 * float(whole.abs().max()))


def test_bf16_autocast_leaves_the_pair_scores_in_float32():
    """Under autocast the projections run in bf16, the attention and scores in float32 with autocast off: the
    scores equal a float32 computation from the same embeddings bitwise, and the loss stays near the float32 one."""
    head = build_head()
    image, text, mask = toy_batch()
    full = run(head, image, text, mask)["loss"].item()
    calls = []
    pair_scores = head.pair_scores

    def spy(*args):
        calls.append((args, pair_scores(*args)))
        return calls[-1][1]

    head.pair_scores = spy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = run(head, image, text, mask)["loss"]
    (args, scores), = calls
    assert scores.dtype == torch.float32 and torch.equal(scores, pair_scores(*args))
    # bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3) in the projected embeddings
    assert loss.item() == pytest.approx(full, rel=1e-2)


def test_a_matching_batch_scores_lower_than_a_shuffled_one():
    """Reports made of the images' own patch tokens align locally: the loss falls when the pairs match."""
    torch.manual_seed(0)
    head = HEADS.build(dict(type="local_align", embed_dim=8), image_dim=8, text_dim=8,
                       image_encoder=PatchGrid((2, 2), 0))
    with torch.no_grad():  # the same projection on both sides: a word equal to a patch has similarity 1
        head.word_proj.weight.copy_(head.patch_proj.weight)
    image = torch.randn(5, 4, 8)
    text = torch.cat([torch.zeros(5, 1, 8), image[:, :3], torch.zeros(5, 1, 8)], dim=1)  # [CLS] 3 patches [SEP]
    mask = torch.ones(5, 5, dtype=torch.long)
    matched = run(head, image, text, mask)
    shuffled = run(head, image, text[[1, 2, 3, 4, 0]], mask)
    assert matched["i2t_acc"].item() == 1.0
    assert matched["loss"].item() < shuffled["loss"].item()


def test_config_errors():
    with pytest.raises(ConfigError, match="needs a text encoder"):
        HEADS.build(dict(type="local_align"), image_dim=4, text_dim=None, image_encoder=PatchGrid((2, 2), 0))
    swin = ENCODERS.build(dict(type="swin2d", img_size=32, patch_size=4, window_size=4, embed_dim=16,
                               depths=(1, 1), num_heads=(1, 2)))
    with pytest.raises(ConfigError, match="needs a ViT image encoder.*vit2d"):
        HEADS.build(dict(type="local_align"), image_dim=32, text_dim=4, image_encoder=swin)
    with pytest.raises(ConfigError, match="aggregation must be one of"):
        build_head(aggregation="max")
    with pytest.raises(ConfigError, match="gamma2 must be positive"):
        build_head(gamma2=0.0)
    with pytest.raises(ConfigError, match="image_chunk must be a positive integer"):
        build_head(image_chunk=0)
    with pytest.raises(ConfigError, match=r"unknown key 'gama1'.*Did you mean 'gamma1'"):
        build_head(gama1=4.0)


# -- 2D and 3D encoders, heatmaps and the model ------------------------------------------------------------------
tokenizer_dir = test_models.tokenizer_dir  # the fixture: a WordPiece vocabulary of three radiology phrases
REPORTS = ["no pleural effusion", "large right pneumothorax", "the heart is enlarged", "right pleural effusion"]


@pytest.mark.parametrize("encoder, shape, grid, prefix", [
    (VIT2D, (4, 1, 32, 32), (4, 4), 1),
    (VIT3D, (4, 1, 16, 16, 16), (2, 2, 4), 0),
])
def test_2d_and_3d_token_grids_in_a_model_with_the_clip_head(tokenizer_dir, encoder, shape, grid, prefix):
    """CLIP + local alignment in one model: the loss is the weighted sum, the local head reads the encoder's grid
    and prefix tokens and its loss on the encoders' real tokens equals the reference."""
    torch.manual_seed(0)
    model = build_model(dict(image_encoder=encoder, text_encoder=text_cfg(tokenizer_dir, "mean"), heads=[
        dict(type="clip", embed_dim=16, loss_weight=1.0),
        dict(type="local_align", embed_dim=8, loss_weight=0.5)])).eval()  # no dropout: encodings repeat
    head = model.heads["local_align"]
    assert head.grid == grid and head.num_prefix_tokens == prefix
    batch = {"image": torch.randn(shape), **model.text_encoder.tokenize(REPORTS)}
    tokenizer = model.text_encoder.tokenizer  # the word mask keeps every token but [CLS], [SEP] and [PAD]
    special = torch.tensor([tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id])
    assert torch.equal(word_mask(batch["attention_mask"]), ~torch.isin(batch["input_ids"], special))
    out = model(batch)
    expected = out["clip/loss"].item() + 0.5 * out["local_align/loss"].item()
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)  # float32 sum of two terms
    out["loss"].backward()
    for module in (head.patch_proj, head.word_proj, model.image_encoder, model.text_encoder):
        assert sum(p.grad.abs().sum() for p in module.parameters() if p.grad is not None) > 0
    with torch.no_grad():
        image = model.image_encoder(batch["image"])
        text = model.text_encoder(batch["input_ids"], batch["attention_mask"])
        local = head(image, text, batch)["loss"].item()
        assert local == pytest.approx(out["local_align/loss"].item(), rel=1e-6)
        assert local == pytest.approx(reference_loss(head, image.tokens, text.tokens, batch["attention_mask"]),
                                      **LOSS_TOL)
        # mmvl.grounding's similarity maps take this head's patch_similarity (mmvl/evaluation/grounding.py)
        phrases = {"effusion": ["pleural effusion", "right pleural effusion"], "heart": "the heart is enlarged"}
        maps, _, source = similarity_maps(model, batch["image"], build_texts(model, phrases))
        prompts = model.text_encoder.tokenize(phrases["effusion"])
        effusion = head.patch_similarity(image, model.text_encoder(**prompts))
    assert source == "heads.local_align.patch_similarity" and maps.shape == (4, 2, *grid)
    assert effusion.shape == (4, 2, math.prod(grid))
    torch.testing.assert_close(maps[:, 0], effusion.mean(dim=1).reshape(4, *grid), rtol=0, atol=0)


def test_patch_similarity_peaks_at_the_planted_patch_of_a_3d_grid():
    """The heatmap interface: a word equal to one patch's token gives similarity 1 there, and reshaping the
    patch axis to ``grid`` (row-major, the encoder's order) puts the peak at that patch's grid position."""
    grid, dim = (2, 3, 4), 8
    torch.manual_seed(0)
    head = HEADS.build(dict(type="local_align", embed_dim=dim), image_dim=dim, text_dim=dim,
                       image_encoder=PatchGrid(grid, 1))
    with torch.no_grad():
        head.patch_proj.weight.copy_(torch.eye(dim))
        head.word_proj.weight.copy_(torch.eye(dim))
    image = 0.1 * torch.randn(2, 1 + 24, dim)
    signal = torch.zeros(dim)
    signal[3] = 1.0
    planted = [(1, 2, 3), (0, 1, 0)]  # (depth, row, column) in each image
    for b, (d, r, c) in enumerate(planted):
        image[b, 1 + (d * 3 + r) * 4 + c] = signal  # + 1: the prefix token comes first
    text = torch.randn(2, 5, dim)  # text 0: [CLS] signal [SEP] [PAD] [PAD]; text 1: [CLS] 3 other words [SEP]
    text[0, 1] = signal
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    words = head.word_patch_similarity(image, text[:1], mask[:1])  # one text against both images
    assert words.shape == (2, 5, 24)
    assert words[:, [0, 2, 3, 4]].abs().sum() == 0  # [CLS], [SEP], padding
    similarity = head.patch_similarity(EncoderOutput(pooled=image[:, 0], tokens=image),
                                       EncoderOutput(pooled=text[:, 0], tokens=text, attention_mask=mask))
    assert similarity.shape == (2, 2, 24)
    torch.testing.assert_close(similarity[:, 0], words[:, 1])  # one word: its own map
    for b in range(2):  # three words: their mean
        torch.testing.assert_close(similarity[b, 1], head.word_patch_similarity(image[b:b + 1], text[1:], mask[1:])
                                   [0, 1:4].mean(dim=0))
    maps = similarity[:, 0].reshape(2, *grid)
    for b, position in enumerate(planted):
        peak = divmod(int(maps[b].argmax()), 12)
        assert (peak[0], *divmod(peak[1], 4)) == position
        assert maps[b][position].item() == pytest.approx(1.0, abs=1e-6)  # a unit vector with itself, float32


# -- two ranks -----------------------------------------------------------------------------------------------------
RANK_ROWS = [slice(0, 4), slice(4, 6)]  # unequal shares of the global batch of 6


def _local_align_on_rank(rank: int, world_size: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        image, text, mask = toy_batch()
        rows = RANK_ROWS[rank]
        longest = max(LENGTHS[rows])  # each rank pads its reports to its own longest (9 and 6 tokens)
        image = image[rows].clone().requires_grad_()
        text = text[rows, :longest].clone().requires_grad_()
        head = build_head(image_chunk=3, rank=rank, world_size=world_size)  # rank 0 scores 3 + 1 images
        out = run(head, image, text, mask[rows, :longest])
        out["loss"].backward()
        results[rank] = {"loss": out["loss"].item(), "i2t_acc": out["i2t_acc"].item(),
                         "image_grad": image.grad.numpy(), "text_grad": text.grad.numpy(),
                         "patch_proj": head.patch_proj.weight.grad.numpy(),
                         "word_proj": head.word_proj.weight.grad.numpy()}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import torch afresh (fork deadlocks on torch's thread pool)
def test_two_ranks_equal_one_process(tmp_path):
    """Ranks of 4 and 2 images, reports padded to different lengths: every rank has the loss of the global batch,
    and its gradients, once DDP averages them (each rank's feature gradients are world_size times its rows'
    share, as with the CLIP head's gather; the projections' gradients summed over ranks / world_size)."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_local_align_on_rank, args=(2, str(tmp_path / "init"), results), nprocs=2)
    head = build_head()
    image, text, mask = toy_batch(requires_grad=True)
    out = run(head, image, text, mask)
    out["loss"].backward()
    # float32 with other batch shapes (other summation order in batched kernels): a few ulps of the loss
    tol = dict(rtol=1e-5, atol=1e-6)
    for rank in (0, 1):
        assert results[rank]["loss"] == pytest.approx(out["loss"].item(), rel=1e-5)
        rows = RANK_ROWS[rank]
        torch.testing.assert_close(torch.from_numpy(results[rank]["image_grad"]) / 2, image.grad[rows], **tol)
        longest = max(LENGTHS[rows])
        torch.testing.assert_close(torch.from_numpy(results[rank]["text_grad"]) / 2, text.grad[rows, :longest],
                                   **tol)
        assert text.grad[rows, longest:].abs().sum() == 0  # padding the rank never had
    for name in ("patch_proj", "word_proj"):
        averaged = (torch.from_numpy(results[0][name]) + torch.from_numpy(results[1][name])) / 2
        torch.testing.assert_close(averaged, getattr(head, name).weight.grad, **tol)
    assert results[0]["image_grad"].shape[0] == 4 and results[1]["image_grad"].shape[0] == 2


# -- training through tools/train.py ---------------------------------------------------------------------------------
def test_tiny_demo_trains_a_few_steps_through_the_cli(synthetic_cxr, tmp_path, one_thread):
    work = tmp_path / "run"
    code = load_tool("train").main([
        str(REPO / "configs" / "demo" / "cxr_clip_local_tiny.py"), "--work-dir", str(work), "--cfg-options",
        f"data.manifest={synthetic_cxr}", *TINY_CLIP, "model.heads.1.embed_dim=64", "train.max_steps=4",
        "train.batch_size=8", "train.val_interval=4", "train.ckpt_interval=4", "train.plots=False",
    ])
    assert code == 0
    rows = [r for r in read_jsonl(work / "metrics.jsonl") if "local_align/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert math.isfinite(row["local_align/loss"]) and row["local_align/loss"] > 0
        assert row["loss"] == pytest.approx(row["clip/loss"] + row["local_align/loss"], rel=1e-5)
    validation = [r for r in read_jsonl(work / "metrics.jsonl") if "val/local_align/loss" in r]
    assert validation and math.isfinite(validation[-1]["val/local_align/loss"])
    assert (work / "checkpoints" / "last.pt").exists()
