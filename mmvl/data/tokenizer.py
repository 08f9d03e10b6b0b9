"""Text tokenizers: load a Hugging Face tokenizer directory, or train a WordPiece one on training reports.

No weights can be downloaded in many hospital networks, so a from-scratch BERT needs its own vocabulary;
it is built here on the training reports and saved as a standard Hugging Face tokenizer directory.
"""

from __future__ import annotations

import os
from collections import Counter
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
    """Build a BERT WordPiece tokenizer for ``texts`` and save it (``tokenizer.json``, ``vocab.txt``) to ``out_dir``.

    The vocabulary is the special tokens, every character (plain and ``##``-continuation), then whole
    words by frequency (ties alphabetical) down to ``min_frequency``, up to ``vocab_size``; words outside
    it are split greedily by the WordPiece model. Chosen over ``tokenizers.trainers.WordPieceTrainer``
    because that trainer's vocabulary changes from run to run on the same text (huggingface/tokenizers
    #1794), which would make a rerun of the same config a different model. Report vocabularies are small,
    so whole words cover nearly all tokens.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(clean_text=True, lowercase=lowercase, strip_accents=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({char for word in counts for char in word})
    vocab = [*SPECIAL_TOKENS, *chars, *(f"##{char}" for char in chars)]
    known = set(vocab)
    words = [w for w, n in counts.items() if n >= min_frequency and w not in known]
    words.sort(key=lambda w: (-counts[w], w))
    vocab += words[: max(0, vocab_size - len(vocab))]

    wordpiece = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    wordpiece.normalizer = normalizer
    wordpiece.pre_tokenizer = pre_tokenizer
    wordpiece.decoder = decoders.WordPiece()
    wordpiece.post_processor = processors.BertProcessing(
        ("[SEP]", wordpiece.token_to_id("[SEP]")), ("[CLS]", wordpiece.token_to_id("[CLS]"))
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=wordpiece, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=512,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / "vocab.txt").write_text("".join(token + "\n" for token in vocab))  # for BERT-style tools
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
