"""Text tokenizers: load a Hugging Face tokenizer directory, or train a WordPiece one on training reports.

No weights can be downloaded in many hospital networks, so a from-scratch BERT needs its own vocabulary;
it is trained here with the ``tokenizers`` library and saved as a standard ``BertTokenizerFast`` directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmvl.errors import ConfigError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 8000,
    min_frequency: int = 2,
    lowercase: bool = True,
) -> Any:
    """Train a BERT WordPiece vocabulary on ``texts`` and save a loadable tokenizer to ``out_dir``."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wordpiece = BertWordPieceTokenizer(lowercase=lowercase, strip_accents=lowercase, clean_text=True)
    wordpiece.train_from_iterator(
        list(texts), vocab_size=vocab_size, min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS, show_progress=False,
    )
    wordpiece.save_model(str(out_dir))
    tokenizer = BertTokenizerFast(vocab_file=str(out_dir / "vocab.txt"), do_lower_case=lowercase)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def load_tokenizer(path: str | os.PathLike) -> Any:
    """Load a tokenizer directory (``tokenizer.json``/``vocab.txt``) without touching the network."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(
            f"tokenizer directory not found: {path}. Point text_encoder.tokenizer at a Hugging Face tokenizer "
            "directory, or leave it unset to train a WordPiece tokenizer on the training reports."
        )
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
