"""Sampling and batching: a resumable seeded sampler and a collate function that tokenizes reports."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler):
    """Seeded per-epoch permutation that can start mid-epoch; yields ``(index, sample_seed)``.

    The order and the augmentation seed of every sample depend only on (seed, epoch, position), so a
    resumed run sees exactly the samples and augmentations an uninterrupted run would have seen,
    whatever the number of loader workers.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.size - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.size) if self.shuffle else np.arange(self.size)
        seeds = rng.integers(0, 2**31 - 1, size=self.size)
        for position in range(self.start, self.size):
            yield int(order[position]), int(seeds[position])


class Collate:
    """Stack images and labels, tokenize reports; samples the dataset skipped (``{"skipped": {...}}`` or
    ``None``) are dropped and listed in ``batch["skipped"]`` with ``batch["n_skipped"]`` their count."""

    def __init__(self, tokenizer: Any | None = None, max_length: int = 128):
        self.tokenizer, self.max_length = tokenizer, max_length

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
        if "report" in kept[0]:
            batch["report"] = [s["report"] for s in kept]
            if self.tokenizer is not None:
                tokens = self.tokenizer(batch["report"], padding=True, truncation=True,
                                        max_length=self.max_length, return_tensors="pt")
                batch["input_ids"] = tokens["input_ids"]
                batch["attention_mask"] = tokens["attention_mask"]
        return batch
