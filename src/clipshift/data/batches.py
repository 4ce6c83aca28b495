"""Batches for contrastive pretraining: the global batch of every step as each rank's
micro-batches, from a pool decoded in memory (random access: a step's batch is a pure function
of (seed, step)) or streamed from shards by webdataset workers (pools too big for RAM; resumed
by replaying the deterministic stream)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from clipshift import distributed as D
from clipshift.config import PretrainConfig
from clipshift.data import loaders


class MemoryBatches:
    """Micro-batches of a decoded pool: global batch ``step`` from (seed, step) alone."""

    def __init__(
        self, data: loaders.PoolTensors, cfg: PretrainConfig, dist: D.DistInfo, image_size: int
    ) -> None:
        self.data, self.cfg, self.dist, self.size = data, cfg, dist, image_size

    def seek(self, step: int) -> None:
        pass  # random access: nothing to replay

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cfg, n = self.cfg, len(self.data)
        index = loaders.batch_indices(n, cfg.seed, step, cfg.batch_size)
        theta = loaders.batch_crops(cfg.seed, step, cfg.batch_size)
        micro = cfg.batch_size // cfg.accum_steps
        local = micro // self.dist.world_size
        out = []
        for j in range(cfg.accum_steps):
            lo = j * micro + self.dist.rank * local
            rows = index[lo : lo + local]
            images = loaders.augment(self.data.images[rows], theta[lo : lo + local], self.size)
            out.append((images, self.data.tokens[rows]))
        return out


class StreamBatches:
    """Micro-batches streamed from shards by webdataset workers (pools too big for RAM)."""

    def __init__(
        self,
        pool_dir: Path,
        tokenizer: Any,
        cfg: PretrainConfig,
        dist: D.DistInfo,
        image_size: int,
        micro: int,
    ) -> None:
        self.args = (pool_dir, tokenizer, image_size, micro)
        self.cfg, self.dist = cfg, dist
        self.iterator: Any = None

    def seek(self, step: int) -> None:
        """Restart the deterministic stream and discard what steps < ``step`` consumed."""
        pool_dir, tokenizer, image_size, micro = self.args
        loader = loaders.pool_loader(
            pool_dir,
            tokenizer,
            image_size,
            batch_size=micro,
            seed=self.cfg.seed,
            workers=self.cfg.workers,
            rank=self.dist.rank,
        )
        self.iterator = iter(loader)
        for _ in range(step * self.cfg.accum_steps):
            next(self.iterator)

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [next(self.iterator) for _ in range(self.cfg.accum_steps)]
