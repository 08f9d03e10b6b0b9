from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmvl.data.tokenizer import train_wordpiece_tokenizer
from mmvl.errors import ConfigError
from mmvl.models import build_model
from mmvl.models.heads.report import ReportGenerationHead, _HeadState, ban_tokens, beam_search, greedy_search

VIT2D = dict(type="vit2d", model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1,
             num_heads=2)
VIT3D = dict(type="vit3d", img_size=16, patch_size=8, hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2)
REPORTS = ["no pleural effusion.", "large right pneumothorax.", "the heart is enlarged.", "there is no effusion.",
           "small left pleural effusion. no pneumothorax."]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report_tok")
    train_wordpiece_tokenizer(REPORTS * 3, out, vocab_size=100, min_frequency=1)
    return out


def report_model(tokenizer_dir, encoder=VIT2D, **head):
    torch.manual_seed(0)
    cfg = dict(type="report_gen", tokenizer=str(tokenizer_dir), decoder_dim=32, decoder_depth=2, decoder_heads=2,
               max_length=24, **head)
    return build_model(dict(image_encoder=encoder, heads=[cfg]))


def tokenized(model, texts):
    tokens = model.tokenizer(texts, padding=True, truncation=True, max_length=model.max_length, return_tensors="pt")
    return dict(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])


@pytest.mark.parametrize("encoder,shape", [(VIT2D, (1, 32, 32)), (VIT3D, (1, 16, 16, 16))], ids=["2d", "3d"])
def test_loss_and_generation_with_2d_and_3d_encoders(tokenizer_dir, encoder, shape):
    model = report_model(tokenizer_dir, encoder)
    head = model.heads["report_gen"]
    assert model.tokenizer is head.tokenizer and model.max_length == 24  # no text encoder: the head's
    batch = {"image": torch.randn(3, *shape), **tokenized(model, REPORTS[:3])}
    out = model(batch)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert 0.0 <= float(out["report_gen/token_acc"]) <= 1.0
    out["loss"].backward()
    assert head.image_proj[0].weight.grad.abs().sum() > 0  # the loss reaches the image side
    assert not any(name.startswith("heads.report_gen._image_encoder") for name in model.state_dict())
    for method in ("greedy", "beam"):
        generated = head.generate(batch["image"], method=method, num_beams=2, max_length=10)
        assert len(generated.texts) == len(generated.token_ids) == len(generated.log_probs) == 3
        assert all(isinstance(text, str) for text in generated.texts)
        assert all(1 <= len(ids) <= 9 for ids in generated.token_ids)  # max_length counts BOS and EOS
        assert all(ids[-1] == head.eos_id or len(ids) == 9 for ids in generated.token_ids)
    assert head.training  # generate() restores the mode it found


def test_cached_decoding_equals_full_forward(tokenizer_dir):
    model = report_model(tokenizer_dir).eval()
    head = model.heads["report_gen"]
    image = model.image_encoder(torch.randn(2, 1, 32, 32))
    ids = tokenized(model, REPORTS[:2])["input_ids"]
    full = head.decode(ids, image).log_softmax(-1)
    state = _HeadState(head, head.memory(image))
    stepped = torch.stack([state.step(ids[:, : t + 1]) for t in range(ids.shape[1])], dim=1)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)


def test_teacher_forcing_ignores_padding(tokenizer_dir):
    model = report_model(tokenizer_dir, dropout=0.0).eval()
    head = model.heads["report_gen"]
    image = model.image_encoder(torch.randn(1, 1, 32, 32))
    alone = tokenized(model, REPORTS[:1])
    padded = {key: F.pad(value, (0, 5)) for key, value in alone.items()}  # five [PAD] (id 0) with mask 0
    garbage = {"input_ids": padded["input_ids"].clone(), "attention_mask": padded["attention_mask"]}
    garbage["input_ids"][:, -5:] = 7  # what sits under a zero mask must not matter either
    losses = [head(image, None, batch) for batch in (alone, padded, garbage)]
    for out in losses[1:]:
        torch.testing.assert_close(out["loss"], losses[0]["loss"])
        torch.testing.assert_close(out["token_acc"], losses[0]["token_acc"])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_label_smoothing_matches_its_definition(tokenizer_dir, smoothing):
    model = report_model(tokenizer_dir, dropout=0.0, label_smoothing=smoothing).eval()
    head = model.heads["report_gen"]
    image = model.image_encoder(torch.randn(2, 1, 32, 32))
    batch = tokenized(model, REPORTS[:2])
    log_probs = head.decode(batch["input_ids"][:, :-1], image).log_softmax(-1)
    targets = batch["input_ids"][:, 1:]
    valid = batch["attention_mask"][:, 1:].bool()
    nll = -log_probs.gather(-1, targets[..., None])[..., 0][valid]
    uniform = -log_probs.mean(-1)[valid]  # cross-entropy against the uniform distribution
    expected = ((1 - smoothing) * nll + smoothing * uniform).mean()
    torch.testing.assert_close(head(image, None, batch)["loss"], expected)


class MarkovState:
    """Toy decoder: next-token probabilities depend on the last token only (0 pad, 1 bos, 2 eos, 3 a, 4 b, 5 c)."""

    def __init__(self, table: dict[int, dict[int, float]], vocab: int = 6):
        self.log_table = torch.full((vocab, vocab), -30.0)
        for last, row in table.items():
            for token, p in row.items():
                self.log_table[last, token] = math.log(p)

    def step(self, sequences):
        return self.log_table[sequences[:, -1]].log_softmax(-1)

    def reorder(self, index):
        pass


# After BOS: stop now (p 0.5) or say "a" (0.45); "a" is followed by "b" (0.9), "a b" by EOS (0.95); "c" loops.
# "EOS" alone: log p = -0.69 over 1 token; "a b EOS": -0.96 over 3 tokens, -0.32 per token.
CHOICE = {1: {2: 0.5, 3: 0.45, 5: 0.05}, 3: {4: 0.9, 2: 0.05, 5: 0.05}, 4: {2: 0.95, 5: 0.05}, 5: {5: 0.9, 2: 0.1}}
SEARCH = dict(bos_id=1, eos_id=2, pad_id=0, max_length=8, banned_ids=(0, 1))


def test_length_penalty_changes_the_preferred_report():
    greedy, _ = greedy_search(MarkovState(CHOICE), 1, **SEARCH)
    short, _ = beam_search(MarkovState(CHOICE), 1, num_beams=2, length_penalty=0.0, **SEARCH)
    long, scores = beam_search(MarkovState(CHOICE), 1, num_beams=2, length_penalty=1.0, **SEARCH)
    assert greedy == short == [[2]]
    assert long == [[3, 4, 2]]
    assert scores[0] == pytest.approx(math.log(0.45) + math.log(0.9) + math.log(0.95), abs=1e-4)
    exhaustive, _ = beam_search(MarkovState(CHOICE), 1, num_beams=2, length_penalty=1.0, early_stopping=False,
                                **SEARCH)
    assert exhaustive == [[3, 4, 2]]


def test_beam_search_with_one_beam_is_greedy(tokenizer_dir):
    model = report_model(tokenizer_dir).eval()
    head = model.heads["report_gen"]
    image = model.image_encoder(torch.randn(4, 1, 32, 32))
    greedy = head.generate(image, method="greedy", no_repeat_ngram_size=0, max_length=12)
    for penalty in (0.0, 1.0, 2.0):  # a single beam stops at its first EOS whatever the penalty
        beam = head.generate(image, method="beam", num_beams=1, length_penalty=penalty, no_repeat_ngram_size=0,
                             max_length=12)
        assert beam.token_ids == greedy.token_ids
        assert beam.log_probs == pytest.approx(greedy.log_probs, abs=1e-4)
    exhaustive = head.generate(image, method="beam", num_beams=1, length_penalty=0.0, no_repeat_ngram_size=0,
                               max_length=12, early_stopping=False)
    assert exhaustive.token_ids == greedy.token_ids


def test_beam_search_finds_a_likelier_report_than_greedy(tokenizer_dir):
    model = report_model(tokenizer_dir).eval()
    head = model.heads["report_gen"]
    image = model.image_encoder(torch.randn(6, 1, 32, 32))
    greedy = head.generate(image, method="greedy", no_repeat_ngram_size=0, max_length=12)
    beam = head.generate(image, method="beam", num_beams=4, length_penalty=0.0, no_repeat_ngram_size=0,
                         max_length=12, early_stopping=False)
    for g, b in zip(greedy.log_probs, beam.log_probs):
        assert b >= g - 1e-4  # with no length penalty, exhaustive beam search never ranks below greedy


def repeats(ids, n):
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) != len(set(grams))


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_no_repeat_ngram_holds(tokenizer_dir, method):
    model = report_model(tokenizer_dir).eval()
    head = model.heads["report_gen"]
    with torch.no_grad():  # an untrained decoder that loves one token: "a a a a ..."
        head.token_embed.weight[head.tokenizer.convert_tokens_to_ids("a")] *= 40
    image = model.image_encoder(torch.randn(3, 1, 32, 32))
    free = head.generate(image, method=method, no_repeat_ngram_size=0, max_length=10)
    assert any(repeats(ids, 2) for ids in free.token_ids)
    for n in (1, 2, 3):
        blocked = head.generate(image, method=method, no_repeat_ngram_size=n, max_length=10)
        assert not any(repeats([head.bos_id, *ids], n) for ids in blocked.token_ids)


def test_ban_tokens_blocks_exactly_the_repeating_completions():
    sequences = torch.tensor([[1, 3, 4, 3, 5, 4, 3]])  # bigrams 3-4 and 3-5 seen; ends in 3 (and in 4 3)
    banned = ban_tokens(torch.zeros(1, 7), sequences, banned_ids=[0], no_repeat_ngram_size=2)
    assert torch.isinf(banned[0]).tolist() == [True, False, False, False, True, True, False]
    trigram = ban_tokens(torch.zeros(1, 7), sequences, banned_ids=[], no_repeat_ngram_size=3)
    assert torch.isinf(trigram[0]).tolist() == [False, False, False, False, False, True, False]  # 4 3 5 seen


def test_configuration_and_input_errors(tokenizer_dir):
    with pytest.raises(ConfigError, match="trainer"):
        ReportGenerationHead(image_dim=32, tokenizer=dict(type="wordpiece", vocab_size=100))
    with pytest.raises(ConfigError, match="divisible"):
        ReportGenerationHead(image_dim=32, tokenizer=str(tokenizer_dir), decoder_dim=30, decoder_heads=4)
    with pytest.raises(ConfigError, match="label_smoothing"):
        ReportGenerationHead(image_dim=32, tokenizer=str(tokenizer_dir), label_smoothing=1.0)
    with pytest.raises(ConfigError, match="max_length"):
        ReportGenerationHead(image_dim=32, tokenizer=str(tokenizer_dir), max_length=1)
    model = report_model(tokenizer_dir)
    head = model.heads["report_gen"]
    images = torch.randn(1, 1, 32, 32)
    with pytest.raises(ValueError, match="tokenized reports"):
        model({"image": images})
    with pytest.raises(ValueError, match="method"):
        head.generate(images, method="sample")
    with pytest.raises(ValueError, match="num_beams"):
        head.generate(images, num_beams=0)
    with pytest.raises(ValueError, match="max_length"):
        head.generate(images, max_length=25)
    alone = ReportGenerationHead(image_dim=32, tokenizer=str(tokenizer_dir), decoder_dim=32, decoder_heads=2)
    with pytest.raises(ValueError, match="no image encoder"):
        alone.generate(images)
    assert len(alone.generate(torch.randn(2, 5, 32), max_length=4).texts) == 2  # tokens (B, N, D) work


def test_default_decoding_can_repeat_the_phrases_reports_repeat(tokenizer_dir, monkeypatch):
    """Reports say "there is no ..." twice on purpose; the default search must be able to write that (it used to ban
    every repeated trigram). A decoder that insists on the sentence shows what each setting lets through."""
    from mmvl.models.heads import report

    model = report_model(tokenizer_dir).eval()
    head = model.heads["report_gen"]
    wanted = "there is no effusion. there is no pneumothorax."
    target = head.tokenizer(wanted, add_special_tokens=False)["input_ids"] + [head.eos_id]

    class Insisting:  # the next token of ``wanted`` by position, whatever the image
        def __init__(self, head, memory):
            pass

        def step(self, sequences):
            log_probs = torch.full((sequences.shape[0], len(head.tokenizer)), -20.0)
            log_probs[:, target[min(sequences.shape[1] - 1, len(target) - 1)]] = 0.0
            return log_probs.log_softmax(-1)

        def reorder(self, index):
            pass

    monkeypatch.setattr(report, "_HeadState", Insisting)
    image = model.image_encoder(torch.randn(1, 1, 32, 32))
    for method in ("greedy", "beam"):
        generated = head.generate(image, method=method)
        assert generated.texts == [wanted] and generated.decoding["no_repeat_ngram_size"] == 0
    banned = head.generate(image, method="greedy", no_repeat_ngram_size=3)
    assert banned.texts != [wanted] and banned.texts[0].startswith("there is no effusion.")


def test_report_heads_hold_256_positions_by_default(tokenizer_dir):
    model = build_model(dict(image_encoder=VIT2D, heads=[dict(type="report_gen", tokenizer=str(tokenizer_dir),
                                                               decoder_dim=32, decoder_depth=1, decoder_heads=2)]))
    assert model.heads["report_gen"].max_length == 256 and model.max_length == 256
