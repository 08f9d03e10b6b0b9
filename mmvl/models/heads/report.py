"""Report generation head: a transformer decoder over the image encoder's tokens, greedy and beam search.

Decoder choice: a compact pre-norm decoder written here (causal self-attention, cross-attention to the
projected image tokens, MLP; tied input/output embeddings as in GPT-2) rather than transformers'
``BertLMHeadModel``/GPT-2 with ``add_cross_attention=True``. Its attention goes through ``mmvl.ops.attention``
(xformers on GPU, else SDPA) like every encoder of mmvl, and its key/value cache and search are ~200 lines
that mmvl owns and tests: transformers' generation and cache classes have been reworked across the versions
setup.cfg allows (4.44 to 5.x), and a refactor there must not silently change which report a model writes.
It takes ``EncoderOutput.tokens`` ``(B, N, D)`` from 2D and 3D encoders alike (for a ViT, class token included).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mmvl.data.tokenizer import load_tokenizer
from mmvl.errors import ConfigError
from mmvl.models.encoders.base import EncoderOutput
from mmvl.ops import attention
from mmvl.registry import HEADS

IGNORE_INDEX = -100


class _Attention(nn.Module):
    """Multi-head attention of ``queries`` over ``keys_from`` (itself for self-attention) through mmvl.ops."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.head_dim, self.dropout = num_heads, dim // num_heads, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, H, N, Dh)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(x).chunk(2, dim=-1)
        return self.split_heads(k), self.split_heads(v)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        out = attention(self.split_heads(self.q(x)), k, v, mask=mask,
                        dropout=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).flatten(2))


class DecoderBlock(nn.Module):
    """Pre-norm block: causal self-attention, cross-attention to the image tokens, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.1):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = _Attention(dim, num_heads, dropout)
        self.cross_attn = _Attention(dim, num_heads, dropout)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory_kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``mask``: self-attention mask (None when decoding one new token with ``cache``); ``cache`` holds the
        self-attention keys/values of the earlier positions and is extended in place."""
        h = self.norm1(x)
        k, v = self.self_attn.keys_values(h)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        x = x + self.drop(self.self_attn(h, k, v, mask))
        x = x + self.drop(self.cross_attn(self.norm2(x), *memory_kv))
        return x + self.drop(self.mlp(self.norm3(x)))


@dataclass
class GeneratedReports:
    """``texts``: decoded reports; ``token_ids``: generated ids (no BOS; EOS last unless cut at max_length);
    ``log_probs``: sum of the chosen tokens' log-probabilities; ``decoding``: the search that actually ran
    (``method``: "greedy" also for a beam search of one beam, which is exactly greedy search) and its settings."""

    texts: list[str]
    token_ids: list[list[int]]
    log_probs: list[float]
    decoding: dict[str, Any] = field(default_factory=dict)


class DecoderState(Protocol):
    """What the searches need: next-token log-probabilities for each running sequence, and beam reordering."""

    def step(self, sequences: torch.Tensor) -> torch.Tensor:  # (M, t) -> (M, V) log-probabilities
        ...

    def reorder(self, index: torch.Tensor) -> None:  # row i of every cache becomes row index[i]
        ...


def ban_tokens(log_probs: torch.Tensor, sequences: torch.Tensor, banned_ids: Sequence[int],
               no_repeat_ngram_size: int) -> torch.Tensor:
    """Set to -inf the ``banned_ids`` and every token that would repeat an n-gram of ``sequences`` (Paulus et
    al. 2018; transformers' ``no_repeat_ngram_size``: no n-gram occurs twice in a sequence)."""
    log_probs = log_probs.clone()
    if len(banned_ids):
        log_probs[:, list(banned_ids)] = float("-inf")
    n = no_repeat_ngram_size
    length = sequences.shape[1]
    if n and length >= n:
        if n == 1:
            seen = sequences
        else:  # n-grams whose first n-1 tokens equal the last n-1 tokens: their last token is banned
            prefixes = sequences.unfold(1, n - 1, 1)[:, : length - n + 1]  # (M, length-n+1, n-1)
            match = (prefixes == sequences[:, None, length - n + 1:]).all(dim=-1)
            seen = torch.where(match, sequences[:, n - 1:], -1)
        hits = torch.zeros_like(log_probs).scatter_add_(1, seen.clamp(min=0), (seen >= 0).to(log_probs.dtype))
        log_probs = log_probs.masked_fill(hits > 0, float("-inf"))
    return log_probs


def greedy_search(state: DecoderState, batch_size: int, bos_id: int, eos_id: int, pad_id: int, max_length: int,
                  banned_ids: Sequence[int] = (), no_repeat_ngram_size: int = 0,
                  device: torch.device | str = "cpu") -> tuple[list[list[int]], list[float]]:
    """Most probable next token at each step, up to ``max_length`` tokens including BOS and EOS."""
    sequences = torch.full((batch_size, 1), bos_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    scores = torch.zeros(batch_size, device=device)
    for _ in range(max_length - 1):
        log_probs = ban_tokens(state.step(sequences), sequences, banned_ids, no_repeat_ngram_size)
        best, token = log_probs.max(dim=-1)
        scores += torch.where(finished, 0.0, best)
        token = torch.where(finished, pad_id, token)
        sequences = torch.cat([sequences, token[:, None]], dim=1)
        finished |= token == eos_id
        if finished.all():
            break
    out = []
    for row in sequences[:, 1:].tolist():
        out.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return out, scores.tolist()


def beam_search(state: DecoderState, batch_size: int, bos_id: int, eos_id: int, pad_id: int, max_length: int,
                num_beams: int = 4, length_penalty: float = 1.0, banned_ids: Sequence[int] = (),
                no_repeat_ngram_size: int = 0, early_stopping: bool = True,
                device: torch.device | str = "cpu") -> tuple[list[list[int]], list[float]]:
    """Beam search over ``state`` (rows ``b * num_beams + k``), up to ``max_length`` tokens including BOS/EOS.

    A finished hypothesis is ranked by ``sum log p / n ** length_penalty`` with ``n`` its generated tokens (EOS
    included), as in transformers' ``BeamSearchScorer``: ``length_penalty > 0`` favours longer reports, ``< 0``
    shorter ones. As there, an EOS counts only among the ``num_beams`` best candidates of a step. A sample is
    done once ``num_beams`` hypotheses finished (``early_stopping=True``), or else once no running beam can beat
    the worst of them (bounded exactly: a running sum can only fall). With ``num_beams=1`` this is greedy search.
    Returns the best hypothesis per sample and its summed log-probability.
    """
    beams, max_new = num_beams, max_length - 1
    sequences = torch.full((batch_size * beams, 1), bos_id, dtype=torch.long, device=device)
    running = torch.zeros(batch_size, beams, device=device)
    running[:, 1:] = float("-inf")  # all beams start equal: expand only the first at step one
    running = running.flatten()
    finished: list[list[tuple[float, float, list[int]]]] = [[] for _ in range(batch_size)]  # (rank score, sum, ids)
    done = [False] * batch_size
    for length in range(1, max_new + 1):  # ``length`` tokens generated after this step
        log_probs = ban_tokens(state.step(sequences), sequences, banned_ids, no_repeat_ngram_size)
        vocab = log_probs.shape[1]
        candidates = (running[:, None] + log_probs).view(batch_size, beams * vocab)
        top_scores, top_index = candidates.topk(min(2 * beams, beams * vocab), dim=1)
        top_scores, top_index = top_scores.tolist(), top_index.tolist()
        history = sequences[:, 1:].tolist()
        next_scores, next_tokens, next_rows = [], [], []
        for b in range(batch_size):
            rows = [b * beams + k for k in range(beams)]
            if done[b]:
                next_scores += [float("-inf")] * beams
                next_tokens += [pad_id] * beams
                next_rows += rows
                continue
            chosen: list[tuple[float, int, int]] = []
            for rank, (score, index) in enumerate(zip(top_scores[b], top_index[b])):
                row, token = b * beams + index // vocab, index % vocab
                if token == eos_id:
                    if rank < beams and score > float("-inf"):
                        finished[b].append((score / length**length_penalty, score, [*history[row], eos_id]))
                else:
                    chosen.append((score, token, row))
                if len(chosen) == beams:
                    break
            chosen += [(float("-inf"), pad_id, rows[0])] * (beams - len(chosen))
            next_scores += [c[0] for c in chosen]
            next_tokens += [c[1] for c in chosen]
            next_rows += [c[2] for c in chosen]
            if len(finished[b]) >= beams:
                finished[b].sort(key=lambda hyp: -hyp[0])
                del finished[b][beams:]
                best_running = chosen[0][0]
                # The best rank score the best running beam can still reach at any final length.
                longest = max_new if length_penalty > 0 else length + 1
                done[b] = early_stopping or best_running / longest**length_penalty <= finished[b][-1][0]
        if all(done):
            break
        index = torch.tensor(next_rows, device=device)
        state.reorder(index)
        sequences = torch.cat([sequences[index], torch.tensor(next_tokens, device=device)[:, None]], dim=1)
        running = torch.tensor(next_scores, device=device)
    else:  # max_length reached: unfinished beams compete as they are
        history = sequences[:, 1:].tolist()
        scores = running.tolist()
        for b in range(batch_size):
            if not done[b]:
                for k in range(beams):
                    score = scores[b * beams + k]
                    if score > float("-inf"):
                        finished[b].append((score / max_new**length_penalty, score, history[b * beams + k]))
    best = [max(hyps, key=lambda hyp: hyp[0]) for hyps in finished]
    return [hyp[2] for hyp in best], [hyp[1] for hyp in best]


class _HeadState:
    """Incremental decoding of a :class:`ReportGenerationHead`: cross-attention keys/values computed once,
    self-attention keys/values cached, one new token per step."""

    def __init__(self, head: ReportGenerationHead, memory: torch.Tensor):
        self.head = head
        self.memory_kv = [block.cross_attn.keys_values(memory) for block in head.blocks]
        self.caches: list[dict[str, torch.Tensor]] = [{} for _ in head.blocks]

    def step(self, sequences: torch.Tensor) -> torch.Tensor:
        position = sequences.shape[1] - 1
        x = self.head.embed(sequences[:, -1:], offset=position)
        for block, memory_kv, cache in zip(self.head.blocks, self.memory_kv, self.caches):
            x = block(x, memory_kv, None, cache)
        return self.head.logits(x)[:, -1].float().log_softmax(dim=-1)

    def reorder(self, index: torch.Tensor) -> None:
        for cache in self.caches:
            for key in cache:
                cache[key] = cache[key].index_select(0, index)


_DECIMAL = re.compile(r"(\d)\. (\d)")
_SPACE_BEFORE_PUNCT = re.compile(r" ([.,;:)])")


def tidy_decoded(text: str) -> str:
    """Undo the spaces BERT pre-tokenization puts around punctuation ("2. 5 cm ;" -> "2.5 cm;")."""
    return _SPACE_BEFORE_PUNCT.sub(r"\1", _DECIMAL.sub(r"\1.\2", text)).strip()


@HEADS.register("report_gen", "report")
class ReportGenerationHead(nn.Module):
    """Image-conditioned report decoder trained by teacher forcing with label-smoothed cross-entropy.

    ``tokenizer``: a tokenizer directory, or ``dict(type="wordpiece", vocab_size=...)``, which the trainer
    trains on the training reports (shared with a text encoder that asks for one) and replaces with the
    directory. It must wrap a text as BOS/[CLS] ... EOS/[SEP], as BERT tokenizers do. Without a text encoder,
    ``model.tokenizer`` and ``model.max_length`` are this head's, so batches are tokenized for it; beside a
    text encoder, give both the same tokenizer. Batches longer than ``max_length`` (the decoder's positions)
    are cut to it. ``mlp_ratio`` and ``dropout`` shape the blocks.
    """

    needs_image_encoder = True
    generates_reports = True

    def __init__(
        self,
        image_dim: int,
        text_dim: int | None = None,
        image_encoder: nn.Module | None = None,
        tokenizer: str | os.PathLike | Mapping[str, Any] | None = None,
        decoder_dim: int = 512,
        decoder_depth: int = 3,
        decoder_heads: int = 8,
        max_length: int = 256,
        label_smoothing: float = 0.1,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
    ):
        super().__init__()
        if tokenizer is None or isinstance(tokenizer, Mapping):
            raise ConfigError(
                "report head: tokenizer must be a tokenizer directory; dict(type='wordpiece', ...) is trained "
                "on the training reports by the trainer (tools/train.py), which then sets the directory"
                + ("" if tokenizer is None else f" (got {dict(tokenizer)})")
            )
        if decoder_dim % decoder_heads:
            raise ConfigError(f"report head: decoder_dim {decoder_dim} must be divisible by decoder_heads "
                              f"{decoder_heads}")
        if max_length < 2:
            raise ConfigError(f"report head: max_length must be >= 2 (BOS and EOS), got {max_length}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"report head: label_smoothing must be in [0, 1), got {label_smoothing}")
        self.tokenizer = load_tokenizer(tokenizer) if os.path.isdir(str(tokenizer)) else _hub_tokenizer(tokenizer)
        self.bos_id, self.eos_id, self.pad_id = _special_ids(self.tokenizer, tokenizer)
        # Generating these would only waste a step: [PAD], [CLS], [UNK], [MASK]...
        self.banned_ids = sorted({*self.tokenizer.all_special_ids} - {self.eos_id})
        self._image_encoder = (image_encoder,)  # a reference, not a submodule: its weights are the model's
        self.max_length, self.label_smoothing = int(max_length), float(label_smoothing)
        vocab_size = len(self.tokenizer)
        self.image_proj = nn.Sequential(nn.Linear(image_dim, decoder_dim), nn.LayerNorm(decoder_dim))
        self.token_embed = nn.Embedding(vocab_size, decoder_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_length, decoder_dim))
        self.blocks = nn.ModuleList(DecoderBlock(decoder_dim, decoder_heads, mlp_ratio, dropout)
                                    for _ in range(decoder_depth))
        self.norm = nn.LayerNorm(decoder_dim)
        self.embed_drop = nn.Dropout(dropout)
        self.apply(_init_weights)
        nn.init.normal_(self.pos_embed, std=0.02)

    # -- model ----------------------------------------------------------------------------------------
    def memory(self, image: EncoderOutput | torch.Tensor) -> torch.Tensor:
        """Image tokens projected to the decoder width, ``(B, N, decoder_dim)``."""
        tokens = image.tokens if isinstance(image, EncoderOutput) else image
        if tokens.ndim != 3:
            raise ValueError(f"report head: image tokens must be (B, N, D), got shape {tuple(tokens.shape)}")
        return self.image_proj(tokens)

    def embed(self, input_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        positions = self.pos_embed[:, offset:offset + input_ids.shape[1]]
        return self.embed_drop(self.token_embed(input_ids) + positions)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden) @ self.token_embed.weight.T  # tied with the input embedding

    def decode(self, input_ids: torch.Tensor, image: EncoderOutput | torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits ``(B, T, V)`` for every position of ``input_ids`` (teacher forcing)."""
        length = input_ids.shape[1]
        if length > self.max_length:
            raise ValueError(f"report head: {length} tokens exceed max_length {self.max_length}")
        memory = self.memory(image)
        mask = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()[None, None]
        if attention_mask is not None:  # causal already hides right padding; this also covers left padding
            mask = mask & attention_mask[:, None, None, :].bool()
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, block.cross_attn.keys_values(memory), mask)
        return self.logits(x)

    def forward(self, image: EncoderOutput, text: EncoderOutput | None, batch: Mapping[str, Any]) -> dict[str, Any]:
        if "input_ids" not in batch or "attention_mask" not in batch:
            raise ValueError("the report head needs tokenized reports (batch['input_ids'], batch['attention_mask']);"
                             " the trainer tokenizes them with model.tokenizer")
        input_ids = batch["input_ids"][:, : self.max_length]
        attention_mask = batch["attention_mask"][:, : self.max_length]
        if input_ids.shape[1] < 2:
            raise ValueError("report head: reports must have at least two tokens (BOS, EOS)")
        logits = self.decode(input_ids[:, :-1], image, attention_mask[:, :-1]).float()
        targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                               label_smoothing=self.label_smoothing)
        with torch.no_grad():
            valid = targets != IGNORE_INDEX
            token_acc = (logits.argmax(-1).eq(targets) & valid).sum() / valid.sum().clamp(min=1)
        return {"loss": loss, "token_acc": token_acc}

    # -- generation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        image: EncoderOutput | torch.Tensor,
        method: str = "beam",
        num_beams: int = 4,
        length_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        max_length: int | None = None,
        early_stopping: bool = True,
    ) -> GeneratedReports:
        """Reports for ``image``: the image encoder's output, or images ``(B, C, H, W)``/``(B, C, D, H, W)``
        (encoded with the image encoder the head was built with). ``max_length`` counts BOS and EOS (default:
        the head's). Runs in eval mode (no dropout) and restores the mode it found.

        ``no_repeat_ngram_size`` is off (0) by default: radiology reports repeat their phrasing on purpose ("There
        is no pneumothorax. There is no effusion."), which a ban on repeated trigrams makes impossible."""
        if method not in ("greedy", "beam"):
            raise ValueError(f"generate: method must be 'greedy' or 'beam', got {method!r}")
        if num_beams < 1:
            raise ValueError(f"generate: num_beams must be >= 1, got {num_beams}")
        if no_repeat_ngram_size < 0:
            raise ValueError(f"generate: no_repeat_ngram_size must be >= 0 (0: off), got {no_repeat_ngram_size}")
        max_length = self.max_length if max_length is None else int(max_length)
        if not 2 <= max_length <= self.max_length:
            raise ValueError(f"generate: max_length must be in [2, {self.max_length}] (the decoder's positions), "
                             f"got {max_length}")
        was_training = self.training
        self.eval()
        try:
            if torch.is_tensor(image) and image.ndim in (4, 5):
                encoder = self._image_encoder[0]
                if encoder is None:
                    raise ValueError("generate: this head has no image encoder; pass the encoder's output instead")
                image = encoder(image)
            memory = self.memory(image)
            batch_size = memory.shape[0]
            common = dict(bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id, max_length=max_length,
                          banned_ids=self.banned_ids, no_repeat_ngram_size=no_repeat_ngram_size, device=memory.device)
            if method == "greedy":
                ids, scores = greedy_search(_HeadState(self, memory), batch_size, **common)
            else:
                state = _HeadState(self, memory.repeat_interleave(num_beams, dim=0))
                ids, scores = beam_search(state, batch_size, num_beams=num_beams, length_penalty=length_penalty,
                                          early_stopping=early_stopping, **common)
        finally:
            self.train(was_training)
        texts = [tidy_decoded(self.tokenizer.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=True))
                 for row in ids]
        beam = method == "beam" and num_beams > 1
        decoding = {"method": "beam" if beam else "greedy", "max_length": max_length,
                    "no_repeat_ngram_size": no_repeat_ngram_size,
                    **({"num_beams": num_beams, "length_penalty": length_penalty, "early_stopping": early_stopping}
                       if beam else {})}
        return GeneratedReports(texts=texts, token_ids=ids, log_probs=scores, decoding=decoding)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


def _hub_tokenizer(name: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(name))
    except (OSError, ValueError) as err:
        raise ConfigError(f"report head: tokenizer '{name}' is neither a directory nor a loadable tokenizer "
                          f"name ({err})") from err


def _special_ids(tokenizer: Any, source: Any) -> tuple[int, int, int]:
    """BOS, EOS and PAD ids; the tokenizer must add BOS/EOS itself, as the batches are tokenized by it."""
    bos = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    eos = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    sample = tokenizer("no pleural effusion")["input_ids"]
    if bos is None or eos is None or sample[0] != bos or sample[-1] != eos:
        raise ConfigError(f"report head: tokenizer {source} does not wrap texts in BOS ... EOS ([CLS] ... [SEP]); "
                          "use a BERT-style tokenizer such as the WordPiece one the trainer builds")
    return int(bos), int(eos), int(pad)

