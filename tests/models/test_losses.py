"""Contrastive losses (mmvl/models/heads/contrastive.py) against slow references written out with Python loops:
CLIP's InfoNCE, SigLIP's sigmoid loss and MedCLIP-style label-aware soft targets."""

from __future__ import annotations

import math

import pytest
import torch

from mmvl.errors import ConfigError
from mmvl.models.encoders.base import EncoderOutput
from mmvl.models.heads.contrastive import label_aware_targets
from mmvl.registry import HEADS

IMAGE_DIM, TEXT_DIM, EMBED_DIM, BATCH = 12, 10, 8, 6


def build_head(kind: str, seed: int = 0, **options):
    torch.manual_seed(seed)
    return HEADS.build(dict(type=kind, embed_dim=EMBED_DIM, **options), image_dim=IMAGE_DIM, text_dim=TEXT_DIM)


def features(batch: int = BATCH, seed: int = 1, requires_grad: bool = False) -> tuple[EncoderOutput, EncoderOutput]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, IMAGE_DIM, generator=generator).requires_grad_(requires_grad)
    text = torch.randn(batch, TEXT_DIM, generator=generator).requires_grad_(requires_grad)
    return EncoderOutput(pooled=image, tokens=image[:, None]), EncoderOutput(pooled=text, tokens=text[:, None])


def similarities(head, image, text) -> tuple[list[list[float]], float]:
    """Python floats: cosine similarity x_i . y_j of the projected embeddings, and the logit scale t."""
    with torch.no_grad():
        x, y = head.project_image(image).double(), head.project_text(text).double()
        return (x @ y.T).tolist(), float(head.scale())


def log_softmax_row(values: list[float], index: int) -> float:
    top = max(values)
    return values[index] - top - math.log(sum(math.exp(v - top) for v in values))


def reference_soft_cross_entropy(sim: list[list[float]], scale: float, targets: list[list[float]]) -> float:
    """1/2 [ -1/B sum_i sum_j T_ij log softmax_j(t s_ij) - 1/B sum_j sum_i T_ji log softmax_i(t s_ij) ]."""
    n = len(sim)
    image_to_text = text_to_image = 0.0
    for i in range(n):
        row = [scale * sim[i][j] for j in range(n)]
        for j in range(n):
            image_to_text -= targets[i][j] * log_softmax_row(row, j)
    for j in range(n):
        column = [scale * sim[i][j] for i in range(n)]
        for i in range(n):
            text_to_image -= targets[j][i] * log_softmax_row(column, i)
    return 0.5 * (image_to_text + text_to_image) / n


def identity(n: int) -> list[list[float]]:
    return [[1.0 if i == j else 0.0 for j in range(n)] for i in range(n)]


def reference_infonce(sim: list[list[float]], scale: float) -> float:
    return reference_soft_cross_entropy(sim, scale, identity(len(sim)))


def reference_siglip(sim: list[list[float]], scale: float, bias: float) -> float:
    """-1/B sum_ij log sigmoid(z_ij (t x_i . y_j + b)), z_ij = +1 on the diagonal, -1 elsewhere."""
    n = len(sim)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total -= math.log(1.0 / (1.0 + math.exp(-z * (scale * sim[i][j] + bias))))
    return total / n


def reference_targets(labels: list[list[int]], weight: float, temperature: float | None) -> list[list[float]]:
    """The docstring's formula, one entry at a time."""
    n = len(labels)

    def vector(row):
        present = [1.0 if value == 1 else 0.0 for value in row]
        return [*present, 0.0 if any(present) else 1.0]

    def labelled(row):
        return any(value in (0, 1) for value in row)

    sim = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if labelled(labels[i]) and labelled(labels[j]):
                a, b = vector(labels[i]), vector(labels[j])
                dot = sum(p * q for p, q in zip(a, b))
                sim[i][j] = dot / math.sqrt(sum(p * p for p in a) * sum(q * q for q in b))
            else:
                sim[i][j] = 1.0 if i == j else 0.0
    targets = []
    for i in range(n):
        if not labelled(labels[i]):
            targets.append([1.0 if j == i else 0.0 for j in range(n)])
            continue
        if temperature is None:
            normalised = [s / sum(sim[i]) for s in sim[i]]
        else:
            exps = [math.exp(s / temperature) for s in sim[i]]
            normalised = [e / sum(exps) for e in exps]
        targets.append([(1.0 - weight) * (1.0 if j == i else 0.0) + weight * normalised[j] for j in range(n)])
    return targets


# Row 0 and 3 identical; 1 and 5 normal (all known 0); 2 shares a finding with 0; 4 unknown throughout.
LABELS = [[1, 0, 1], [0, 0, 0], [1, -1, 0], [1, 0, 1], [-1, -1, -1], [0, 0, -1]]


def test_infonce_matches_loop_reference():
    head = build_head("clip")
    image, text = features()
    out = head(image, text, {})
    sim, scale = similarities(head, image, text)
    assert scale == pytest.approx(1 / 0.07, rel=1e-6)
    assert out["loss"].item() == pytest.approx(reference_infonce(sim, scale), rel=1e-5)
    aligned = reference_infonce([[1.0 if i == j else 0.0 for j in range(BATCH)] for i in range(BATCH)], scale)
    assert aligned < 1e-5  # the reference itself: orthogonal negatives at t = 14.3 give almost no loss


def test_siglip_matches_loop_reference():
    head = build_head("siglip")
    assert head.is_contrastive and head.scale().item() == pytest.approx(10.0) and head.logit_bias.item() == -10.0
    image, text = features()
    with torch.no_grad():
        head.logit_bias.fill_(-2.5)  # away from the init, so a sign slip in the bias would show
    out = head(image, text, {})
    sim, scale = similarities(head, image, text)
    assert out["loss"].item() == pytest.approx(reference_siglip(sim, scale, -2.5), rel=1e-5)
    assert out["logit_bias"].item() == -2.5 and out["logit_scale"].item() == pytest.approx(10.0)


@pytest.mark.parametrize(("weight", "temperature"), [(0.5, None), (1.0, None), (0.3, 0.5), (1.0, 1.0)])
def test_label_aware_matches_loop_reference(weight, temperature):
    labels = torch.tensor(LABELS, dtype=torch.float32)
    expected = reference_targets(LABELS, weight, temperature)
    targets = label_aware_targets(labels, weight, temperature)
    assert torch.allclose(targets.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(targets.sum(dim=1), torch.ones(len(LABELS)))

    head = build_head("label_aware", soft_target_weight=weight, label_temperature=temperature)
    image, text = features()
    out = head(image, text, {"labels": labels})
    sim, scale = similarities(head, image, text)
    assert out["loss"].item() == pytest.approx(reference_soft_cross_entropy(sim, scale, expected), rel=1e-5)


def test_label_aware_target_structure():
    targets = label_aware_targets(torch.tensor(LABELS, dtype=torch.float32), soft_target_weight=1.0)
    assert torch.allclose(targets[0], targets[3])  # identical label vectors: identical targets...
    assert targets[0, 0] == targets[0, 3] > targets[0, 2] > 0  # ...a shared finding counts, less
    assert targets[1, 5] == targets[1, 1] == 0.5  # two normal studies match each other
    assert targets[0, 1] == targets[1, 0] == 0  # a normal study is a negative for an abnormal one
    assert torch.equal(targets[4], torch.eye(6)[4]) and targets[0, 4] == 0  # unknown row: plain InfoNCE
    # the unknown label of row 2 is not read as a disagreement: 0 and 2 share "finding 0" and nothing else
    assert targets[0, 2].item() == pytest.approx((1 / math.sqrt(2)) / (2 + 1 / math.sqrt(2)), rel=1e-6)


@pytest.mark.parametrize("labels", [
    None,
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0], [-1, -1, -1], [-1, -1, -1]],  # pairwise disjoint or unknown
    [[-1, -1, -1]] * BATCH,  # nothing known
])
def test_label_aware_equals_infonce_without_shared_labels(labels):
    clip, soft = build_head("clip"), build_head("label_aware", soft_target_weight=1.0)
    image, text = features()
    batch = {} if labels is None else {"labels": torch.tensor(labels, dtype=torch.float32)}
    assert soft(image, text, batch)["loss"].item() == pytest.approx(clip(image, text, {})["loss"].item(), rel=1e-6)
    # and soft_target_weight = 0 is InfoNCE whatever the labels
    no_mixing = build_head("label_aware", soft_target_weight=0.0)
    loss = no_mixing(image, text, {"labels": torch.tensor(LABELS, dtype=torch.float32)})["loss"]
    assert loss.item() == pytest.approx(clip(image, text, {})["loss"].item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["clip", "siglip", "label_aware"])
def test_gradients_reach_projections_scale_and_features(kind):
    head = build_head(kind)
    image, text = features(requires_grad=True)
    head(image, text, {"labels": torch.tensor(LABELS, dtype=torch.float32)})["loss"].backward()
    parameters = dict(head.named_parameters())
    expected = {"image_proj.weight", "text_proj.weight", "logit_scale"}
    expected |= {"logit_bias"} if kind == "siglip" else set()
    assert set(parameters) == expected
    for name, param in parameters.items():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    assert image.pooled.grad.abs().sum() > 0 and text.pooled.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["clip", "siglip", "label_aware"])
def test_logit_scale_is_clamped(kind):
    head = build_head(kind, max_logit_scale=50.0)
    with torch.no_grad():
        head.logit_scale.fill_(math.log(1000.0))
    assert head.scale().item() == pytest.approx(50.0)
    image, text = features()
    out = head(image, text, {})
    assert out["logit_scale"].item() == pytest.approx(50.0)
    out["loss"].backward()
    assert head.logit_scale.grad.item() == 0.0  # beyond the clamp the scale stops moving
    with torch.no_grad():
        head.logit_scale.fill_(math.log(20.0))
    assert head.scale().item() == pytest.approx(20.0)  # below it, untouched


def test_head_config_errors():
    with pytest.raises(ConfigError, match="soft_target_weight must lie in"):
        build_head("label_aware", soft_target_weight=1.5)
    with pytest.raises(ConfigError, match="label_temperature must be positive"):
        build_head("label_aware", label_temperature=0.0)
    with pytest.raises(ConfigError, match="needs a text encoder"):
        HEADS.build(dict(type="siglip"), image_dim=IMAGE_DIM, text_dim=None)
    with pytest.raises(ConfigError, match="init_logit_scale"):
        build_head("siglip", init_logit_scale=200.0)


def test_one_process_losses_equal_open_clips_bitwise():
    """mmvl.models.losses in one process is open_clip's ClipLoss / SigLipLoss to the last bit (the heads used
    those before the single- and multi-process paths became one), gradients included."""
    from open_clip.loss import ClipLoss as OpenClipLoss
    from open_clip.loss import SigLipLoss as OpenSigLipLoss

    from mmvl.models.losses import ClipLoss, SigLipLoss

    generator = torch.Generator().manual_seed(3)
    image = torch.nn.functional.normalize(torch.randn(BATCH, EMBED_DIM, generator=generator), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(BATCH, EMBED_DIM, generator=generator), dim=-1)
    scale, bias = torch.tensor(1 / 0.07), torch.tensor(-2.5)
    pairs = [(lambda x, y: ClipLoss()(x, y, scale), lambda x, y: OpenClipLoss()(x, y, scale)),
             (lambda x, y: ClipLoss(local_loss=True)(x, y, scale), lambda x, y: OpenClipLoss()(x, y, scale)),
             (lambda x, y: SigLipLoss()(x, y, scale, bias), lambda x, y: OpenSigLipLoss()(x, y, scale, bias))]
    for ours, theirs in pairs:
        results = []
        for loss_fn in (ours, theirs):
            x, y = image.clone().requires_grad_(), text.clone().requires_grad_()
            loss = loss_fn(x, y)
            loss.backward()
            results.append((loss.detach(), x.grad, y.grad))
        for mine, reference in zip(*results):
            assert torch.equal(mine, reference)
    # soft targets that are the identity are the hard targets
    hard = ClipLoss()(image, text, scale)
    torch.testing.assert_close(ClipLoss()(image, text, scale, torch.eye(BATCH)), hard, rtol=1e-6, atol=0.0)


def _label_aware_on_rank(rank: int, world_size: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        image, text = features()  # the global batch; this rank takes its share
        rows = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
        local = [EncoderOutput(pooled=out.pooled[rows], tokens=out.tokens[rows]) for out in (image, text)]
        labels = torch.tensor(LABELS, dtype=torch.float32)[rows]
        for local_loss in (False, True):
            head = build_head("label_aware", soft_target_weight=0.7, local_loss=local_loss, rank=rank,
                              world_size=world_size)
            results[(rank, local_loss)] = head(*local, {"labels": labels})["loss"].item()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import torch afresh (fork deadlocks on torch's thread pool)
def test_label_aware_across_two_ranks_equals_the_global_batch(tmp_path):
    """Labels are gathered like the features: two ranks of 3 give the loss of one batch of 6 (each rank's
    own rows with ``local_loss``, averaged over the ranks)."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_label_aware_on_rank, args=(2, str(tmp_path / "init"), results), nprocs=2)
    image, text = features()
    expected = build_head("label_aware", soft_target_weight=0.7)(
        image, text, {"labels": torch.tensor(LABELS, dtype=torch.float32)})["loss"].item()
    assert results[(0, False)] == pytest.approx(expected, rel=1e-5)
    assert results[(1, False)] == pytest.approx(expected, rel=1e-5)
    assert 0.5 * (results[(0, True)] + results[(1, True)]) == pytest.approx(expected, rel=1e-5)
    assert results[(0, True)] != pytest.approx(results[(1, True)])  # the ranks did hold different rows
