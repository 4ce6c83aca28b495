"""Contrastive pretraining of an open_clip model on one image-caption pool.

Outputs, in ``<out_dir>/<pool>/``:

* ``resume/step-XXXXXX.pt`` — resumable states (model, optimizer, schedule position, scaler,
  samples consumed, RNG states, guard state, history, config), written every
  ``checkpoint_every`` steps; re-running resumes from the newest valid one.
* ``training_spec.json`` — every resolved setting that can change the weights. A re-run
  resumes, or reuses a finished run, only when its spec is identical; otherwise the folder's
  contents move to ``superseded/<time>-<fingerprint>/`` and training starts from step 0
  (:mod:`clipshift.training_spec`).
* ``checkpoint.pt`` (+ ``.sha256``) and ``<architecture name>.json`` — loadable by stock
  open_clip: ``open_clip.add_model_config(<folder>)``, then
  ``open_clip.create_model_and_transforms(name, pretrained=<folder>/checkpoint.pt)``.
* ``metrics.json`` (the run's results) and ``history.json`` (per-log-step records, DVC plots).

The run starts from scratch (seeded), from ``init_checkpoint`` or from published weights,
``pretrained`` (an open_clip tag or ``hf-hub:org/name``, :mod:`clipshift.published`), whose
value, architecture and file sha256 go into the checkpoint, ``metrics.json`` and MLflow. With
``samples: 0`` nothing is trained and the pool is not read: the starting model is written as
the run's checkpoint, so finetune, interpolate and evaluate take it like a trained one.

The folder is a DVC output, so nothing in it is a timing: a finished run's files are a pure
function of its training spec. Training time, wall time and throughput (overall and per
logged step) are returned by :func:`run_pretrain` (:data:`TIMING_KEYS`), logged to MLflow and
written by the flow to ``metrics/pretrain/<pool>.json``; resume states carry them only until
the run finishes, so a resumed run still counts the time of the run it continues.

Reproducibility: the data order is a pure function of (seed, step) — each epoch is a seeded
permutation of the pool and each step's crops come from a (seed, step) generator — so a run
killed at any point and resumed reaches bitwise the same weights on CPU as an uninterrupted
run (with the same number of CPU threads: a resumed run keeps the interrupted run's count).
That holds for the in-memory loader (the default for pools that fit in RAM). The streaming
loader (large pools) resumes by replaying and discarding the consumed micro-batches
of a deterministic stream: identical when the number of ranks and data workers is unchanged.

The global batch is ``batch_size`` whatever the number of ranks and accumulation steps: each
rank takes its slice of every micro-batch, and with ``accum_steps > 1`` features of all
micro-batches are cached without gradients and each micro-batch is recomputed with gradients
against the cached rest (as open_clip_train does), so the contrastive loss always sees the
whole global batch and the gradient is that of the full-batch loss.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from open_clip.loss import ClipLoss
from tqdm.auto import tqdm

from clipshift import distributed as D
from clipshift import published as P
from clipshift import train_utils as T
from clipshift.checkpoints import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    local_checkpoint,
    save_checkpoint,
    save_open_clip_checkpoint,
    sidecar_path,
    unwrap_model,
)
from clipshift.config import PretrainConfig
from clipshift.data import loaders
from clipshift.data.batches import MemoryBatches, StreamBatches
from clipshift.data.shards import dataset_fingerprint, load_info, sha256_file
from clipshift.errors import CheckpointError, ConfigError
from clipshift.flops import flops_metrics
from clipshift.io_utils import output_lock, read_json, write_json_atomic
from clipshift.models import ClipBundle, create_clip
from clipshift.progress import bar_position
from clipshift.tracking_api import NullTracker, Tracker
from clipshift.training_spec import (
    canonical,
    claim_run_dir,
    describe_changes,
    fingerprint,
    section_spec,
    set_aside,
)

log = logging.getLogger(__name__)

RESUME_DIR = "resume"
# What run_pretrain returns beside metrics.json's content: facts of this process, not outputs
TIMING_KEYS = ("samples_per_s", "train_time_s", "wall_time_s", "throughput")
# The run folder's layout, part of the training spec: a folder another layout wrote (v1 held
# timings and checkpoint.pt.config.json) is set aside and retrained, never mixed or reused.
OUTPUT_LAYOUT = 2
KEEP_RESUME = 3  # resume checkpoints kept while training (rollback targets); 1 at the end
MEMORY_LIMIT_BYTES = 2 << 30  # loader 'auto' decodes pools into RAM below this size


@dataclass
class TrainHooks:
    """Seams for tests (fault injection); production code passes none."""

    transform_loss: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    after_step: Callable[[int, torch.nn.Module], None] | None = None


def pool_path(cfg: PretrainConfig, pool: str) -> Path:
    return Path(cfg.data_dir) / f"pool-{pool}"


def run_path(cfg: PretrainConfig, pool: str) -> Path:
    return Path(cfg.out_dir) / pool


def resume_path(cfg: PretrainConfig, pool: str, step: int) -> Path:
    return run_path(cfg, pool) / RESUME_DIR / f"step-{step:06d}.pt"


# --------------------------------------------------------------------------------------------
# setup


def build_model(
    cfg: PretrainConfig,
    device: torch.device,
    init_path: Path | None = None,
    published: P.PublishedWeights | None = None,
) -> ClipBundle:
    """The model to train: ``cfg.model`` from scratch (seeded), ``cfg.pretrained`` (published
    weights; ``published``: already resolved) or ``cfg.init_checkpoint`` (``init_path``: its
    local copy, when the caller has already fetched it)."""
    torch.manual_seed(cfg.seed)
    if cfg.pretrained is not None:
        found = published or P.resolve(cfg.model, cfg.pretrained)
        return _to(P.load(found, cfg.model), device)
    if cfg.init_checkpoint is None:
        return _to(create_clip(cfg.model), device)
    path = str(init_path or local_checkpoint(cfg.init_checkpoint))
    state = load_checkpoint(path)  # verifies the checksum and refuses pickles
    if "name" in state and "model_config" in state:  # written by clipshift: carries its arch
        bundle = create_clip(state["name"], pretrained=path, config=state["model_config"])
    else:
        bundle = create_clip(cfg.model, pretrained=path)
    return _to(bundle, device)


def _to(bundle: ClipBundle, device: torch.device) -> ClipBundle:
    bundle.model.to(device)
    return bundle


def check_batching(cfg: PretrainConfig, world_size: int) -> int:
    """Micro-batch size per rank; the global batch must split evenly."""
    parts = cfg.accum_steps * world_size
    if cfg.batch_size % parts:
        raise ConfigError(
            f"batch_size {cfg.batch_size} does not split into accum_steps ({cfg.accum_steps}) × "
            f"ranks ({world_size}) equal micro-batches; use a batch_size divisible by {parts}"
        )
    if 0 < cfg.samples < cfg.batch_size:  # 0: the starting model is recorded, not trained
        raise ConfigError(
            f"samples ({cfg.samples}) is smaller than one batch ({cfg.batch_size}); "
            "raise pretrain.samples or lower batch_size"
        )
    return cfg.batch_size // parts


def check_decoded_pool(data: loaders.PoolTensors, image_size: int, config: dict) -> None:
    """A decoded pool must match the model it trains: image side and token context length."""
    context = config["text_cfg"].get("context_length", 77)
    if data.images.shape[-1] != image_size or data.tokens.shape[1] != context:
        raise ConfigError(
            f"the decoded pool has {data.images.shape[-1]} px images and {data.tokens.shape[1]} "
            f"tokens per caption, but the model takes {image_size} px and {context} tokens; "
            "decode the pool for this model"
        )


def choose_loader(cfg: PretrainConfig, pool_dir: Path, image_size: int) -> str:
    if cfg.loader != "auto":
        return cfg.loader
    decoded = load_info(pool_dir).num_samples * 3 * image_size * image_size
    return "memory" if decoded <= MEMORY_LIMIT_BYTES else "stream"


# --------------------------------------------------------------------------------------------
# the trainer


class Pretrainer:
    def __init__(
        self,
        cfg: PretrainConfig,
        pool: str,
        tracker: Tracker,
        progress: bool,
        hooks: TrainHooks | None,
        pool_data: loaders.PoolTensors | None = None,
        spec_extra: dict[str, Any] | None = None,
    ) -> None:
        self.cfg, self.pool, self.tracker, self.hooks = cfg, pool, tracker, hooks or TrainHooks()
        self.progress, self.pool_data = progress, pool_data
        self.spec_extra = dict(spec_extra or {})
        self.total_steps = cfg.samples // cfg.batch_size
        # samples: 0 records the starting model: the pool is never read, and need not exist
        self.pool_fingerprint = self.check_pool() if self.total_steps else None
        self.dist = D.init_distributed(cfg.device)
        self.device = self.dist.device
        T.check_precision(cfg.precision, self.device)
        self.micro = check_batching(cfg, self.dist.world_size)
        self.out = run_path(cfg, pool)
        self.init_path = local_checkpoint(cfg.init_checkpoint) if cfg.init_checkpoint else None
        self.published = P.resolve(cfg.model, cfg.pretrained) if cfg.pretrained else None
        self.bundle = build_model(cfg, self.device, self.init_path, self.published)
        self.raw = self.bundle.model
        self.loader_kind = "none"
        if self.total_steps:
            self.loader_kind = choose_loader(cfg, pool_path(cfg, pool), self.bundle.image_size)
        self.spec = self.training_spec()
        self.fingerprint = fingerprint(self.spec)
        self.optimizer = T.build_optimizer(
            self.raw, cfg.lr, cfg.weight_decay, cfg.beta1, cfg.beta2, cfg.eps
        )
        self.scaler = T.make_scaler(cfg.precision, self.device)
        self.loss_fn = ClipLoss(
            local_loss=cfg.local_loss,
            gather_with_grad=cfg.gather_with_grad,
            cache_labels=True,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.guard = T.SpikeGuard(factor=cfg.spike_factor)
        if self.dist.distributed and cfg.local_loss and not cfg.gather_with_grad:
            log.warning(
                "local_loss without gather_with_grad drops the gradient through other "
                "ranks' rows of the batch; set gather_with_grad: true for exact DDP"
            )
        self.step = 0
        self.pool_samples: int | None = None  # set when the pool is opened
        self.history: list[dict[str, float]] = []
        self.train_time = 0.0
        self.throughput: list[dict[str, float]] = []  # {step, samples_per_s} per logged step
        self.interval = {"sum": 0.0, "count": 0}
        self.model: torch.nn.Module = self.raw  # DDP wrapper once set up

    # ---- data ----------------------------------------------------------------------------

    def check_pool(self) -> str | None:
        """The pool's content hash; fails fast, naming the fix, if fetch has not built it."""
        load_info(pool_path(self.cfg, self.pool))
        return dataset_fingerprint(pool_path(self.cfg, self.pool))

    def starting_weights(self) -> dict[str, str]:
        """What the run started from, when not from scratch: recorded in every output."""
        if self.published is not None:
            return self.published.record()
        if self.init_path is not None:
            return {"init_checkpoint": str(self.cfg.init_checkpoint)}
        return {}

    def init_sha256(self) -> str | None:
        if self.published is not None:
            return self.published.sha256
        return sha256_file(self.init_path) if self.init_path else None

    def open_data(self) -> MemoryBatches | StreamBatches:
        pool_dir = pool_path(self.cfg, self.pool)
        size = self.bundle.image_size
        if self.loader_kind == "memory":
            data = self.pool_data or loaders.load_pool(pool_dir, self.bundle.tokenizer, size)
            check_decoded_pool(data, size, self.bundle.config)
            self.pool_samples = len(data)
            return MemoryBatches(data, self.cfg, self.dist, size)
        self.pool_samples = load_info(pool_dir).num_samples
        return StreamBatches(pool_dir, self.bundle.tokenizer, self.cfg, self.dist, size, self.micro)

    # ---- state ---------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        state = {
            "kind": "clipshift-pretrain-resume",
            "model": unwrap_model(self.raw).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "samples_seen": self.step * self.cfg.batch_size,
            "rng": T.capture_rng(),
            "guard": self.guard.state_dict(),
            "history": list(self.history),
            "interval": dict(self.interval),
            "config": self.cfg.model_dump(mode="json"),
            "training_spec": self.spec,
            "pool": self.pool,
            "pool_fingerprint": self.pool_fingerprint,
            "model_name": self.bundle.name,
            "model_config": self.bundle.config,
            "threads": torch.get_num_threads(),
        }
        if self.step < self.total_steps:  # the final state is kept in the output: no timings
            state["timings"] = {"train_time_s": self.train_time, "throughput": self.throughput}
        return state

    def load_state(self, state: dict[str, Any], rollback: bool = False) -> None:
        self.raw.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        self.interval = dict(state.get("interval", {"sum": 0.0, "count": 0}))
        # a rollback keeps the guard's counters (and its halved LR), a resume restores them
        self.guard.load_state_dict(state.get("guard", {}), history_only=rollback)
        if rollback:  # the time keeps counting; the rates of the undone steps are dropped
            self.throughput = [r for r in self.throughput if r["step"] <= self.step]
        else:
            timings = state.get("timings") or {}
            self.train_time = float(timings.get("train_time_s", 0.0))
            self.throughput = list(timings.get("throughput", []))
            T.restore_rng(state["rng"])

    def training_spec(self) -> dict[str, Any]:
        """Every resolved setting that can change this run's weights; resume and reuse need
        an identical one (see :mod:`clipshift.training_spec` and ``RESULT_NEUTRAL``)."""
        cfg = self.cfg
        spec = section_spec("pretrain", cfg)
        spec.update(
            {
                "pretrain.pool": self.pool,
                "pretrain.pool_fingerprint": self.pool_fingerprint,
                "pretrain.architecture": self.bundle.config,
                "pretrain.init_sha256": self.init_sha256(),
                "pretrain.device": self.device.type,
                "pretrain.world_size": self.dist.world_size,
                "pretrain.loader": self.loader_kind,
                "pretrain.output_layout": OUTPUT_LAYOUT,
            }
        )
        if self.loader_kind == "stream":  # webdataset workers interleave the shards
            spec["pretrain.workers"] = cfg.workers
        spec.update(self.spec_extra)
        return canonical(spec)

    def claim(self) -> None:
        """Set aside earlier work in the run folder that another spec made (rank 0 moves it,
        every rank then sees the same folder)."""
        if self.dist.is_main:
            moved = claim_run_dir(self.out, self.spec, f"pretrain {self.pool}")
            tags = {"clipshift.training_fingerprint": self.fingerprint}
            if moved is not None:
                tags["clipshift.superseded"] = str(moved)
            self.tracker.set_tags(tags)
        D.barrier()

    def latest_resume(self) -> Path | None:
        path = latest_checkpoint(self.out / RESUME_DIR) if self.dist.is_main else None
        return D.broadcast_object(path)

    def resume(self) -> None:
        path = self.latest_resume()
        if path is None:
            return
        state = load_checkpoint(path)  # on CPU: RNG states must stay CPU tensors
        if state.get("training_spec") != self.spec:  # a state copied in by hand
            if self.dist.is_main:
                moved = set_aside(self.out, state.get("training_spec"))
                log.warning(
                    "pretrain %s: resume state %s was trained with other settings (%s); moved "
                    "the run folder to %s and training from step 0",
                    self.pool,
                    path,
                    describe_changes(state.get("training_spec"), self.spec),
                    moved,
                )
                claim_run_dir(self.out, self.spec, f"pretrain {self.pool}")
            D.barrier()
            return
        self.load_state(state)
        self.match_threads(int(state.get("threads", torch.get_num_threads())))
        log.info("resumed %s at step %d from %s", self.pool, self.step, path)
        self.tracker.set_tags({"clipshift.resumed_from": str(path)})

    def match_threads(self, saved: int) -> None:
        """CPU results depend on the thread count (reduction order): keep the interrupted
        run's count so the resumed run stays bitwise identical, unless OMP_NUM_THREADS says."""
        if self.device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
            return
        threads = min(saved, T.available_cpus())
        if threads != torch.get_num_threads():
            log.info("resuming with %d CPU threads, as the interrupted run", threads)
            torch.set_num_threads(threads)

    def healthy(self) -> bool:
        """Only a state the guard trusts becomes a rollback target."""
        if self.guard.consecutive_skips:
            return False
        return all(bool(torch.isfinite(p).all()) for p in self.raw.parameters())

    def save_resume(self, periodic: bool = False) -> None:
        if periodic and not self.healthy():
            log.warning(
                "not checkpointing step %d: the last steps were skipped as non-finite", self.step
            )
            return
        if self.dist.is_main:
            save_checkpoint(resume_path(self.cfg, self.pool, self.step), self.state())
            self.prune(KEEP_RESUME)
        D.barrier()  # other ranks may roll back to this file

    def prune(self, keep: int) -> None:
        for leftover in (self.out / RESUME_DIR).glob("*.tmp"):  # from a kill mid-write
            leftover.unlink(missing_ok=True)
        for old in list_checkpoints(self.out / RESUME_DIR)[keep:]:
            old.unlink(missing_ok=True)
            sidecar_path(old).unlink(missing_ok=True)

    def wrap_ddp(self) -> None:
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.raw, device_ids=ids, broadcast_buffers=False
            )

    # ---- one optimizer step --------------------------------------------------------------

    def loss_weight(self) -> float:
        # Without gather_with_grad, each rank back-propagates only through its own rows of the
        # full-batch loss and DDP then averages: feature gradients would be 1/world of the
        # single-process ones. Scaling the loss by world restores them exactly; logit_scale,
        # which every rank sees whole, gets its gradient scaled back (see forward_backward).
        # local_loss without gather_with_grad stays open_clip's approximation (warned).
        plain = not self.cfg.gather_with_grad and not self.cfg.local_loss
        return float(self.dist.world_size) if plain else 1.0

    def forward_backward(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        cfg, dev = self.cfg, self.device
        micro = [(i.to(dev, non_blocking=True), t.to(dev, non_blocking=True)) for i, t in micro]
        amp = T.autocast(cfg.precision, dev)
        cached = []
        if len(micro) > 1:
            with torch.no_grad(), T.autocast(cfg.precision, dev):
                cached = [self.raw(images, tokens)[:2] for images, tokens in micro]
        weight = self.loss_weight()
        for j, (images, tokens) in enumerate(micro):
            last = j == len(micro) - 1
            sync: contextlib.AbstractContextManager = contextlib.nullcontext()
            if not last and isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
                sync = self.model.no_sync()
            with sync:
                with amp:
                    image_f, text_f, scale = self.model(images, tokens)
                    if cached:
                        image_f = torch.cat(
                            [c[0] for c in cached[:j]] + [image_f] + [c[0] for c in cached[j + 1 :]]
                        )
                        text_f = torch.cat(
                            [c[1] for c in cached[:j]] + [text_f] + [c[1] for c in cached[j + 1 :]]
                        )
                    # logit_scale's gradient is taken once (in the last pass), not per pass
                    scale = scale_grad(scale, 1.0 / weight) if last else scale.detach()
                    loss = self.loss_fn(image_f, text_f, scale)
                if self.hooks.transform_loss is not None:
                    loss = self.hooks.transform_loss(self.step, loss)
                self.scaler.scale(loss * weight).backward()
        return loss.detach()

    def optimizer_step(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
        """One global step; returns its numbers, or raises TrainingDiverged."""
        cfg = self.cfg
        lr = (
            T.cosine_lr(self.step, cfg.lr, cfg.warmup_steps, self.total_steps) * self.guard.lr_scale
        )
        T.set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_backward(micro)
        self.scaler.unscale_(self.optimizer)
        norm = T.grad_norm(self.raw.parameters(), cfg.grad_clip_norm)
        # every rank decides on rank 0's numbers, so all take the same branch
        numbers = torch.stack([D.all_reduce_mean(loss.float()), norm.float().to(loss.device)])
        if self.dist.distributed:
            torch.distributed.broadcast(numbers, src=0)
        loss_v, norm_v = (float(x) for x in numbers.cpu())
        decision = self.guard.check(loss_v, norm_v)
        if self.scaler.is_enabled() and math.isfinite(loss_v) and not math.isfinite(norm_v):
            decision = "scaler"  # fp16 overflow: GradScaler skips the step and lowers its scale
            self.guard.consecutive_skips = 0
        if decision in ("ok", "scaler"):
            self.scaler.step(self.optimizer)
        self.scaler.update()
        return {"loss": loss_v, "grad_norm": norm_v, "lr": lr, "decision": decision}

    # ---- guard actions -------------------------------------------------------------------

    def event(self, kind: str, numbers: dict[str, Any]) -> None:
        record = {
            "step": self.step,
            "event": kind,
            "loss": numbers["loss"],
            "grad_norm": numbers["grad_norm"],
            "median": self.guard.median(),
        }
        self.guard.events.append(record)
        log.warning(
            "pretrain %s: %s at step %d (loss %.4g, grad norm %.4g, running median %.4g)",
            self.pool,
            kind,
            self.step,
            numbers["loss"],
            numbers["grad_norm"],
            record["median"],
        )
        if self.dist.is_main:
            self.tracker.log_metrics(
                {f"guard_{kind}": 1.0, "guard_lr_scale": self.guard.lr_scale}, step=self.step
            )

    def rollback(self, numbers: dict[str, Any]) -> None:
        self.guard.rollbacks += 1
        if self.guard.rollbacks > self.cfg.max_rollbacks:
            self.event("diverged", numbers)
            raise T.TrainingDiverged(
                f"pretraining on pool '{self.pool}' diverged at step {self.step} (loss "
                f"{numbers['loss']:.4g}, running median {self.guard.median():.4g}) after "
                f"{self.cfg.max_rollbacks} rollbacks; lower pretrain.lr, raise warmup_steps or "
                "grad clipping, or check the pool for broken samples, then re-run (it resumes "
                "from the last good checkpoint)"
            )
        self.guard.lr_scale *= 0.5
        self.event("rollback", numbers)
        path = self.latest_resume()
        if path is None:
            raise CheckpointError(
                f"no valid resume checkpoint in {self.out / RESUME_DIR} to roll "
                "back to; delete the folder and re-run"
            )
        self.load_state(load_checkpoint(path), rollback=True)

    # ---- the loop ------------------------------------------------------------------------

    def log_step(self, numbers: dict[str, float], seconds: float, interval_samples: int) -> None:
        cfg = self.cfg
        if math.isfinite(numbers["loss"]):
            self.interval["sum"] += numbers["loss"]
            self.interval["count"] += 1
        if self.step % cfg.log_every and self.step != self.total_steps:
            return
        count = max(1, self.interval["count"])
        record = {
            "step": self.step,
            "samples": self.step * cfg.batch_size,
            "loss": numbers["loss"],
            "loss_avg": self.interval["sum"] / count if self.interval["count"] else float("nan"),
            "logit_scale": float(
                unwrap_model(self.raw).get_parameter("logit_scale").detach().exp()
            ),
            "lr": numbers["lr"],
            "grad_norm": numbers["grad_norm"],
        }
        rate = interval_samples / max(seconds, 1e-9)
        self.history.append(record)
        self.throughput.append({"step": self.step, "samples_per_s": rate})
        self.interval = {"sum": 0.0, "count": 0}
        if self.dist.is_main:
            numbers = {k: v for k, v in record.items() if k != "step"}
            self.tracker.log_metrics({**numbers, "samples_per_s": rate}, step=self.step)

    def train(self, data: MemoryBatches | StreamBatches) -> None:
        cfg = self.cfg
        data.seek(self.step)
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=f"pretrain {self.pool}",
            disable=not (self.progress and self.dist.is_main),
            dynamic_ncols=True,
            position=bar_position(),
        )
        self.raw.train()
        tick, interval_samples = time.perf_counter(), 0
        while self.step < self.total_steps:
            start = time.perf_counter()
            numbers = self.optimizer_step(data.micro_batches(self.step))
            self.train_time += time.perf_counter() - start
            if numbers["decision"] == "rollback":
                self.rollback(numbers)
                data.seek(self.step)
                bar.n = self.step
                bar.refresh()
                tick, interval_samples = time.perf_counter(), 0
                continue
            if numbers["decision"] == "skip":
                self.event("skip", numbers)
            elif numbers["decision"] == "ok":
                self.guard.record(numbers["loss"])
            self.step += 1
            interval_samples += cfg.batch_size
            logged = len(self.history)
            self.log_step(numbers, time.perf_counter() - tick, interval_samples)
            if len(self.history) > logged:
                tick, interval_samples = time.perf_counter(), 0
                bar.set_postfix(loss=f"{numbers['loss']:.3f}")
            bar.update(1)
            if self.step % cfg.checkpoint_every == 0 or self.step == self.total_steps:
                pause = time.perf_counter()
                self.save_resume(periodic=self.step != self.total_steps)
                tick += time.perf_counter() - pause  # checkpoint time is not training time
            if self.hooks.after_step is not None:
                self.hooks.after_step(self.step, self.raw)
        bar.close()

    def finish(self, wall: float) -> dict[str, Any]:
        """Write the outputs; return metrics.json's content plus this process's timings."""
        cfg, samples = self.cfg, self.step * self.cfg.batch_size
        last = self.history[-1] if self.history else {}
        metrics: dict[str, Any] = {
            "pool": self.pool,
            "model": self.bundle.name,
            "steps": self.step,
            "samples": samples,
            "batch_size": cfg.batch_size,
            "final_loss": last.get("loss"),
            "final_loss_avg": last.get("loss_avg"),
            "final_logit_scale": last.get("logit_scale"),
            "params": sum(p.numel() for p in self.raw.parameters()),
            "world_size": self.dist.world_size,
            "loader": self.loader_kind,
            "pool_samples": self.pool_samples,
            "rollbacks": self.guard.rollbacks,
            "skipped_steps": sum(1 for e in self.guard.events if e["event"] == "skip"),
            "events": self.guard.events,
            "training_fingerprint": self.fingerprint,
            "reused": False,
            **self.starting_weights(),
        }
        metrics.update(flops_metrics(self.bundle.config, samples))
        if self.dist.is_main:
            self.write_outputs(metrics)
        D.barrier()
        timings = {
            "samples_per_s": samples / self.train_time if self.train_time else None,
            "train_time_s": round(self.train_time, 3),
            "wall_time_s": round(wall, 3),
            "throughput": list(self.throughput),
        }
        return {**metrics, **timings, "checkpoint": str(self.out / "checkpoint.pt")}

    def write_outputs(self, metrics: dict[str, Any]) -> None:
        extra = {
            "step": self.step,
            "samples_seen": metrics["samples"],
            "pool": self.pool,
            "pretrain_config": self.cfg.model_dump(mode="json"),
            "training_spec": self.spec,
            "training_fingerprint": self.fingerprint,
            **self.starting_weights(),
        }
        save_open_clip_checkpoint(
            self.out / "checkpoint.pt", self.raw, self.bundle.name, self.bundle.config, extra
        )
        write_json_atomic(self.out / "metrics.json", metrics)
        write_json_atomic(self.out / "history.json", self.history)
        self.prune(1)  # the final state lets a re-run with the same spec see it is done

    def finished_metrics(self) -> dict[str, Any] | None:
        """The metrics of this very run if it already finished (same spec, all steps done,
        outputs written), else None."""
        files = [self.out / "checkpoint.pt", self.out / "metrics.json"]
        if self.step < self.total_steps or not all(f.exists() for f in files):
            return None
        metrics = read_json(files[1])
        return metrics if metrics.get("training_fingerprint") == self.fingerprint else None

    def reuse(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Return a finished run's results untouched: retraining would give the same bits.
        Nothing was trained, so its timings are None."""
        log.info(
            "pretrain %s: reusing the finished run in %s (identical training spec %s)",
            self.pool,
            self.out,
            self.fingerprint,
        )
        if self.dist.is_main:
            self.tracker.set_tags({"clipshift.reused": "true"})
        D.barrier()
        timings = dict.fromkeys(TIMING_KEYS)
        return {**metrics, **timings, "reused": True, "checkpoint": str(self.out / "checkpoint.pt")}

    def run(self) -> dict[str, Any]:
        wall_start = time.perf_counter()
        self.claim()
        self.resume()
        if self.dist.is_main and self.published is not None:
            self.tracker.log_params(self.published.record())
        done = self.finished_metrics()
        if done is not None:
            return self.reuse(done)
        if self.total_steps == 0:  # samples: 0: the starting model, recorded as it is
            return self.finish(time.perf_counter() - wall_start)
        self.wrap_ddp()
        data = self.open_data()
        if self.step == 0 and self.latest_resume() is None:
            self.save_resume()  # the rollback target before the first periodic checkpoint
        self.train(data)
        return self.finish(time.perf_counter() - wall_start)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``factor`` on the way back."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x if factor == 1.0 else _ScaleGrad.apply(x, factor)


def run_pretrain(
    cfg: PretrainConfig,
    pool: str,
    tracker: Tracker | None = None,
    progress: bool = True,
    hooks: TrainHooks | None = None,
    pool_data: loaders.PoolTensors | None = None,
    spec_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Pretrain ``cfg.model`` on ``<cfg.data_dir>/pool-<pool>``; resume if a run was cut off.

    Works in one process and under ``torchrun`` (every rank calls it; only rank 0 logs and
    writes files). ``pool_data``: that pool already decoded for this model (the scaling stage
    decodes each pool once for its whole grid); used by the in-memory loader. ``spec_extra``:
    training-spec entries for what the caller did to ``pool_data`` (e.g. took a subset), so
    the reuse check sees it. Returns the
    metrics also written to ``<out_dir>/<pool>/metrics.json`` plus this process's timings
    (:data:`TIMING_KEYS`; None for a reused run), which are not written there.
    """
    previous_threads = torch.get_num_threads()
    trainer = Pretrainer(
        cfg, pool, tracker or NullTracker(), progress, hooks, pool_data, spec_extra
    )
    if trainer.device.type == "cpu":
        T.set_threads(trainer.dist.local_world_size)
    # Two runs on one output folder would interleave resume checkpoints: the second waits.
    lock = output_lock(run_path(cfg, pool)) if trainer.dist.is_main else contextlib.nullcontext()
    try:
        with lock:
            return trainer.run()
    finally:
        torch.set_num_threads(previous_threads)
