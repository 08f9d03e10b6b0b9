"""Sampling and batching: a resumable seeded sampler and a collate function that tokenizes reports."""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from mmvl.config.schema import REPORT_TRUNCATIONS


class ResumableSampler(Sampler):
    """Seeded per-epoch permutation that can start mid-epoch; yields ``(index, sample_seed)``.

    The order and the augmentation seed of every sample depend only on (seed, epoch, position), so a
    resumed run sees exactly the samples and augmentations an uninterrupted run would have seen,
    whatever the number of loader workers.

    With ``world_size > 1`` the epoch's order is cut into global batches of ``batch_size * world_size``
    and rank ``r`` takes the ``r``-th ``batch_size`` samples of each (an incomplete last global batch is
    dropped): the ranks together see the samples, in the order and with the seeds, that one process with
    batch ``batch_size * world_size`` would. ``start`` counts samples of the whole epoch, so a run resumed
    with another number of processes continues where it stopped.

    ``groups``: keys of every index (e.g. ``(study, report text)``); two indices sharing a key are never put in
    one global batch while the epoch has another place for them (:func:`spread_groups`): the views of one study,
    or two identical reports, would be false negatives of a contrastive loss.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 batch_size: int = 1, groups: Sequence[Sequence[Hashable]] | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if groups is not None and len(groups) != size:
            raise ValueError(f"groups has {len(groups)} entries for {size} indices")
        self.groups = groups
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        if self.world_size == 1:
            return max(self.size - self.start, 0)
        return (max(self.size - self.start, 0) // (self.batch_size * self.world_size)) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.size) if self.shuffle else np.arange(self.size)
        seeds = rng.integers(0, 2**31 - 1, size=self.size)
        if self.groups is not None:
            order = spread_groups(order, self.groups, self.batch_size * self.world_size)
        if self.world_size == 1:
            positions = range(self.start, self.size)
        else:
            span = self.batch_size * self.world_size
            first = self.start + self.rank * self.batch_size
            positions = (chunk + offset for chunk in range(first, self.size - span + self.rank * self.batch_size + 1,
                                                           span) for offset in range(self.batch_size))
        for position in positions:
            yield int(order[position]), int(seeds[position])


def spread_groups(order: Sequence[int], groups: Sequence[Sequence[Hashable]], span: int) -> np.ndarray:
    """``order`` cut into consecutive batches of ``span`` such that no two indices in one batch share a key of
    ``groups[index]``, staying as close to ``order`` as that allows: an index that would collide waits for the
    next batch with room for it (waiting ones go first). Indices that find no such batch end the epoch (in the
    last, possibly incomplete batch). The same ``order`` always gives the same result, so a resumed epoch is the
    same epoch."""
    if span <= 1:
        return np.asarray(order)
    out: list[int] = []
    waiting: list[int] = []
    source = iter(order)
    exhausted = False
    while not exhausted or waiting:
        batch: list[int] = []
        keys: set[Hashable] = set()
        still_waiting = []
        for index in waiting:
            if len(batch) < span and keys.isdisjoint(groups[index]):
                batch.append(int(index))
                keys.update(groups[index])
            else:
                still_waiting.append(index)
        waiting = still_waiting
        while len(batch) < span and not exhausted:
            index = next(source, None)
            if index is None:
                exhausted = True
            elif keys.isdisjoint(groups[index]):
                batch.append(int(index))
                keys.update(groups[index])
            else:
                waiting.append(index)
        out.extend(batch)
        if exhausted and len(batch) < span:  # the epoch's last, incomplete batch: what still waits follows it
            out.extend(int(i) for i in waiting)
            break
    return np.asarray(out, dtype=np.int64)


class Collate:
    """Stack images and labels, tokenize reports; samples the dataset skipped (``{"skipped": {...}}`` or
    ``None``) are dropped and listed in ``batch["skipped"]`` with ``batch["n_skipped"]`` their count.

    A report longer than ``max_length`` tokens is cut. ``truncation="keep_last"`` (default) keeps the last of its
    sections (``report_parts`` of a sample: the impression after the findings) whole and cuts the sections before
    it from their ends, so a long findings section no longer costs the impression; the last section alone is
    cut at its end only when it does not fit by itself. ``"tail"`` cuts the joined text at its end.
    """

    def __init__(self, tokenizer: Any | None = None, max_length: int = 128, truncation: str = "keep_last"):
        if truncation not in REPORT_TRUNCATIONS:
            raise ValueError(f"truncation must be one of {REPORT_TRUNCATIONS}, got {truncation!r}")
        self.tokenizer, self.max_length, self.truncation = tokenizer, max_length, truncation

    def tokenize(self, reports: list[str], parts: list[list[str]] | None = None) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` of ``reports``, padded to the longest and cut as the class says."""
        tokenizer = self.tokenizer
        tokens = tokenizer(reports, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        if (self.truncation == "tail" or parts is None or ids.shape[1] < self.max_length
                or getattr(tokenizer, "padding_side", "right") != "right"):
            return {"input_ids": ids, "attention_mask": mask}
        # Rows filling every position may have been cut; re-tokenize those of several sections without the cut.
        # WordPiece/BERT tokenizers split on whitespace first, so the sections' tokens are the report's tokens.
        candidates = [i for i in range(len(reports)) if len(parts[i]) > 1 and bool(mask[i].all())]
        if not candidates:
            return {"input_ids": ids, "attention_mask": mask}
        prefix, suffix = self._special_tokens()
        budget = self.max_length - len(prefix) - len(suffix)
        flat = tokenizer([part for i in candidates for part in parts[i]], add_special_tokens=False)["input_ids"]
        start = 0
        for i in candidates:
            pieces, start = flat[start:start + len(parts[i])], start + len(parts[i])
            if sum(len(piece) for piece in pieces) <= budget:
                continue  # exactly max_length long, nothing was cut
            last = pieces[-1][:budget]
            before = [token for piece in pieces[:-1] for token in piece][: budget - len(last)]
            row = prefix + before + last + suffix
            ids[i] = tokenizer.pad_token_id
            ids[i, : len(row)] = torch.tensor(row)
            mask[i] = 0
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after a text ([CLS] and [SEP] for BERT), found by tokenizing one
        word with and without them (transformers 5 tokenizers have no ``build_inputs_with_special_tokens``)."""
        if not hasattr(self, "_specials"):
            bare = self.tokenizer("a", add_special_tokens=False)["input_ids"]
            full = self.tokenizer("a")["input_ids"]
            start = next(k for k in range(len(full) - len(bare) + 1) if full[k:k + len(bare)] == bare)
            self._specials = (full[:start], full[start + len(bare):])
        return self._specials

    def __call__(self, samples: list[dict[str, Any] | None]) -> dict[str, Any]:
        kept = [s for s in samples if s is not None and "skipped" not in s]
        skipped = [s["skipped"] for s in samples if s is not None and "skipped" in s]
        batch: dict[str, Any] = {"n_skipped": len(samples) - len(kept), "skipped": skipped}
        if not kept:
            return batch
        batch["image"] = torch.stack([s["image"] for s in kept])
        batch["meta"] = [s["meta"] for s in kept]
        if "labels" in kept[0]:
            batch["labels"] = torch.stack([s["labels"] for s in kept])
        if "masks" in kept[0]:
            batch["masks"] = torch.stack([s["masks"] for s in kept])
        if "report" in kept[0]:
            batch["report"] = [s["report"] for s in kept]
            if self.tokenizer is not None:
                parts = [s["report_parts"] for s in kept] if "report_parts" in kept[0] else None
                batch.update(self.tokenize(batch["report"], parts))
        return batch
