"""The seeded inputs every parity run uses: batch sizes, ragged masks, awkward lengths."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..tasks import Task

BATCHES = (1, 3)
LENGTHS = (17, 64, 200)  # plus max_position_embeddings: block multiples and not


def parity_shapes(config) -> list[tuple[int, int]]:
    limit = config.max_position_embeddings
    lengths = sorted({min(length, limit) for length in LENGTHS} | {limit})
    return [(batch, length) for length in lengths for batch in BATCHES]


def parity_feeds(task: Task, config, seed: int = 0) -> list[OrderedDict]:
    """One feed dict (name -> int64 array) per shape; batches of 3 are ragged."""
    generator = np.random.default_rng(seed)
    feeds = []
    for batch, length in parity_shapes(config):
        shape = (batch, 2, length) if task.has_choices else (batch, length)
        lengths = [length, max(1, length // 2), max(1, length // 5)][:batch]
        mask = (np.arange(length)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
        feed = OrderedDict(
            input_ids=generator.integers(0, config.vocab_size, shape, dtype=np.int64),
            attention_mask=np.broadcast_to(mask[:, None, :] if task.has_choices else mask,
                                           shape).copy())
        if "token_type_ids" in task.input_names(config):
            feed["token_type_ids"] = generator.integers(0, config.type_vocab_size, shape,
                                                        dtype=np.int64)
        feeds.append(feed)
    return feeds


def describe(feed: OrderedDict) -> dict:
    mask = feed["attention_mask"]
    return {"shape": list(feed["input_ids"].shape),
            "real_tokens": mask.reshape(mask.shape[0], -1, mask.shape[-1])[:, 0].sum(-1).tolist()}
