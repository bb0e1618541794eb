"""The training loop: data and model on the device, the optimizer step, per-epoch evaluation of the
configured splits, the run directory, and the dispatch of callback hooks. Everything optional
(stopping rules, checkpoints, the metrics log, progress, feature capture, the report) is a callback;
`cifarlab.api.default_callbacks` builds the list a config asks for.

Model selection only ever looks at the validation split; the test split is scored once, at the end.

With train.devices > 1 the same loop runs in every rank (train/distributed.py): the model is wrapped
in DistributedDataParallel for the training forward and backward only, each rank trains on its slice
of every global batch and scores its part of each split, and only rank 0 runs the callbacks and
writes the run directory.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import runs
from ..config import Config, write_config
from ..data.augment import build_augment, mix_batch
from ..data.loader import DeviceLoader, shard
from ..data.local import content_checksum
from ..data.prepare import eval_loader, prepare_data, select_device, to_device
from ..data.sources import cache_dir
from ..errors import CifarlabError, ConfigError, Interrupted, TrainingFailed
from ..evaluation import Evaluation, autocast, autocast_dtype, evaluate
from ..models.build import build_model
from ..models.summary import count_params
from . import distributed
from .callbacks import Callback
from .optim import LRSchedule, kernels, l2_penalty, make_optimizer

log = logging.getLogger(__name__)
HOOKS = ("on_fit_start", "on_step_end", "on_epoch_end", "on_train_end", "on_fit_end", "on_interrupt")


# train.compile=auto compiles runs of at least this many steps on these devices. On our 2-core CPU
# a compiled cnn3 trains slower than eager (bf16 -17 %, float32 -4 %, benchmarks/compile_start.py),
# so auto never compiles on a CPU. On a GPU a cold compile costs tens of seconds (a few with the
# cache warm) and commonly saves a third of a step: 5000 steps repay it (an estimate; no GPU here).
COMPILE_AUTO_STEPS = {"cuda": 5000}


def compile_pays(setting, device: torch.device, steps: int) -> bool:
    """Whether train.compile=`setting` compiles a run of `steps` training steps on `device`."""
    if setting != "auto":
        return bool(setting)
    return device.type in COMPILE_AUTO_STEPS and steps >= COMPILE_AUTO_STEPS[device.type]


def compile_cache() -> Path:
    """The folder inductor keeps compiled graphs and kernels in, shared by runs (and processes): the
    TORCHINDUCTOR_CACHE_DIR a user set, else compile/ in cifarlab's cache folder."""
    folder = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "compile")))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class _CompiledOrEager:
    """torch.compile with a fallback: if compiling fails on the first call, warn and run eagerly."""

    def __init__(self, model: nn.Module):
        self.model = model
        compile_cache()
        self.compiled = torch.compile(model)
        self.checked = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.checked:
            return self.compiled(x)
        try:
            out = self.compiled(x)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: run eagerly
            log.warning("train.compile: torch.compile failed (%s); training eagerly", str(e).splitlines()[0])
            self.compiled = self.model
            out = self.model(x)
        self.checked = True
        return out


class _SignalFlag:
    """Turns SIGINT / SIGTERM into a flag the loop checks after each step (main thread only)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "_SignalFlag":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class Trainer:
    """One training run. `fit()` runs it from the start, `resume_from(run_dir)` from the run's last.pt.
    Callbacks are called in list order for every hook. With train.devices > 1 this process is one rank
    (it joins the process group here) and only rank 0 keeps the callbacks."""

    def __init__(self, config: Config, callbacks: Sequence[Callback] = ()):
        self.config = config
        self.started = time.perf_counter()
        data_parallel = config.train.devices > 1
        torch.set_num_threads(config.train.threads or (distributed.default_threads() if data_parallel
                                                       else os.cpu_count() or 1))
        self.device = device = select_device(config.train.device)
        if data_parallel:
            self.device = device = distributed.join(config.train.devices, device)
        self.world, self.rank = (distributed.world_size(), distributed.rank()) if data_parallel else (1, 0)
        self.is_main = self.rank == 0
        self.callbacks = list(callbacks) if self.is_main else []  # callbacks write: rank 0's job
        self.callback_keys = state_keys(self.callbacks)
        # a callback may define any subset of the hooks (the Callback base class defines them all)
        self.hooks = {hook: [getattr(cb, hook) for cb in self.callbacks if hasattr(cb, hook)] for hook in HOOKS}
        self.splits = splits = prepare_data(config)
        self.classes = splits.dataset.classes
        self.input_shape = splits.dataset.image_shape

        torch.manual_seed(config.seed)
        np.random.seed(config.seed % 2**32)
        model = build_model(config.model, self.input_shape, len(self.classes)).to(device)
        self.model = model.to(memory_format=torch.channels_last) if config.train.channels_last else model
        self.optimizer = make_optimizer(config.optim, self.model)
        # fp16 gradients underflow without loss scaling; bf16 and float32 need none
        fp16 = autocast_dtype(device, config.train.precision) == torch.float16
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16)
        # the permutation of each epoch: the same draws on every rank; augmentation (and mixup / cutmix)
        # draws: one generator per rank, the permutation's own one in a single process
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.augment_generator = self.generator
        self.rank_states: list[dict[str, Any]] = []  # every rank's RNG states at the last epoch end (for last.pt)
        trained: nn.Module = self.model  # what the training forward calls: the model, or its DDP wrapper
        if self.world > 1:
            seed = distributed.rank_seed(config.seed, self.rank)
            self.augment_generator = torch.Generator(device=device).manual_seed(seed)
            torch.manual_seed(seed)  # dropout draws differ per rank (the weights are built and DDP syncs them)
            trained = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        augment = build_augment(config.augment, splits.mean)
        self.train_loader = DeviceLoader(*to_device(splits.train, device), config.train.batch_size, splits.mean,
                                         splits.std, shuffle=True, generator=self.generator, augment=augment,
                                         channels_last=config.train.channels_last, whiten=splits.whiten,
                                         augment_generator=self.augment_generator, rank=self.rank, world=self.world)
        self.schedule = LRSchedule(config.schedule, config.optim.lr, config.train.epochs, len(self.train_loader))
        self.compiling = compile_pays(config.train.compile, device, config.train.epochs * len(self.train_loader))
        self.forward = _CompiledOrEager(trained) if self.compiling else trained  # training forward only
        self.eval_loaders = {split: self.eval_part(split) for split in config.train.evaluate}
        self.l2_weights = kernels(self.model, config.optim.l2_layers) if config.optim.l2 else []
        # progress; a resumed run overwrites these from last.pt
        self.epoch, self.step, self.train_time, self.images_seen = 0, 0, 0.0, 0
        self.current_epoch = 0  # the epoch in progress (for step hooks)
        self.history: list[dict[str, Any]] = []
        self.position: Optional[dict[str, Any]] = None  # set when resuming in the middle of an epoch
        self.stop_reasons: list[str] = []
        self.selected_epoch: Optional[int] = None  # the epoch whose weights are tested (a callback may choose)
        self.best_epoch: Optional[int] = None  # the epoch best.pt holds (set by BestCheckpoint)
        self.best_value: Optional[float] = None
        self.test_result: Optional[Evaluation] = None
        self.run_dir: Optional[Path] = None
        self.lock: Optional[runs.RunLock] = None  # held from start() / resume_from() to the end of fit()
        self.resuming = False

    # ---------------------------------------------------------------- for callbacks

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    def loader(self, split: str, arrays: Optional[tuple[np.ndarray, np.ndarray]] = None) -> DeviceLoader:
        """An evaluation loader of a split (or of `arrays`) with the run's normalization."""
        return eval_loader(arrays if arrays is not None else getattr(self.splits, split), self.splits, self.config,
                           self.device)

    def eval_part(self, split: str) -> DeviceLoader:
        """The evaluation loader of this rank's contiguous part of a split (the whole split in a single process)."""
        if self.world == 1:
            return self.loader(split)
        images, labels = getattr(self.splits, split)
        start, stop = shard(len(labels), self.rank, self.world)
        return self.loader(split, (images[start:stop], labels[start:stop]))

    def score(self, split: str, loader: DeviceLoader) -> Evaluation:
        """`evaluate` of a split by its `eval_part` loader; with several ranks each scores its part and
        every rank gets the result of the whole split."""
        if self.world == 1:
            return evaluate(self.model, loader, self.config.train)
        return distributed.evaluate_sharded(self.model, loader, len(getattr(self.splits, split)[1]),
                                            len(self.classes), self.config.train)

    def elapsed(self) -> float:
        """Seconds since the Trainer was created (data loading included)."""
        return time.perf_counter() - self.started

    def stop(self, reason: str) -> None:
        """Ask to stop after this epoch; the reasons given in one epoch are joined in the summary."""
        self.stop_reasons.append(reason)

    def dispatch(self, hook: str, *args: Any) -> None:
        for method in self.hooks[hook]:
            method(self, *args)

    # ---------------------------------------------------------------- state

    def base_state(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "classes": self.classes, "input_shape": list(self.input_shape),
                "normalization": self.splits.normalization()}

    def weights_state(self) -> dict[str, Any]:
        """What best.pt holds: the current weights and what is needed to use them."""
        return {**self.base_state(), "epoch": self.epoch, "model": self.model.state_dict()}

    def checkpoint_state(self, position: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimizer, schedule, callbacks, RNG states, progress
        (with several ranks also every rank's RNG states, under "ranks")."""
        ranks = {"ranks": self.rank_states} if self.world > 1 else {}
        return {**self.weights_state(), **ranks, "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "scaler": self.scaler.state_dict(),
                "callbacks": {key: cb.state_dict() for key, cb in zip(self.callback_keys, self.callbacks)
                              if hasattr(cb, "state_dict")},
                "generator": self.generator.get_state() if position is None else position["generator"],
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
                "progress": {"step": self.step, "train_time": self.train_time, "images_seen": self.images_seen,
                             "history": self.history},
                "position": position}

    def apply_optim_settings(self) -> None:
        """The config's optimizer settings over the ones a loaded optimizer state brought back (a resumed
        run may change optim.lr, weight_decay, momentum, ...; the moments and step counts stay)."""
        fresh = make_optimizer(self.config.optim, self.model).param_groups
        for group, new in zip(self.optimizer.param_groups, fresh):
            group.update({k: v for k, v in new.items() if k != "params"})
            group["initial_lr"] = new["lr"]  # the schedule multiplies this

    def load_checkpoint_state(self, state: dict[str, Any], source: Path = Path("last.pt")) -> None:
        runs.load_weights(self.model, state["model"], source)
        self.optimizer.load_state_dict(state["optimizer"])
        self.apply_optim_settings()
        self.schedule.load_state_dict(state["schedule"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        saved = state.get("callbacks", {})
        for key, callback in zip(self.callback_keys, self.callbacks):
            if key in saved and hasattr(callback, "load_state_dict"):
                callback.load_state_dict(saved[key])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        progress = state["progress"]
        self.epoch, self.step = state["epoch"], progress["step"]
        self.train_time, self.images_seen = progress["train_time"], progress["images_seen"]
        self.history = list(progress["history"])
        self.position = state["position"]
        if self.world > 1:
            own = state["ranks"][self.rank]
            self.augment_generator.set_state(own["augment"])
            torch.set_rng_state(own["torch_rng"])
            if own["cuda_rng"] is not None:
                torch.cuda.set_rng_state(own["cuda_rng"], self.device)

    def rng_state(self) -> dict[str, Any]:
        """This rank's own random states: augmentation generator, torch (and CUDA) RNG."""
        return {"augment": self.augment_generator.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}

    # ---------------------------------------------------------------- run directory

    def summary_base(self) -> dict[str, Any]:
        trainable, non_trainable = count_params(self.model)
        sizes = {name: len(getattr(self.splits, name)[1]) for name in ("train", "val", "test")}
        return {"run": self.run_dir.name, "dataset": self.splits.dataset.name, "model": self.config.model.preset,
                "sizes": sizes, "params": {"trainable": trainable, "non_trainable": non_trainable},
                "normalization": {"mean": self.splits.mean, "std": self.splits.std}, "classes": self.classes,
                "input_shape": list(self.input_shape), "device": str(self.device),
                "devices": self.config.train.devices, "world_size": self.world,
                "monitor": self.config.train.early_stopping.monitor}

    def write_summary(self, status: str, stop_reason: str, **fields: Any) -> dict[str, Any]:
        """summary.json (written by rank 0 only); returns its contents."""
        summary = {**self.summary_base(), "status": status, "stop_reason": stop_reason, "epochs_run": self.epoch,
                   **fields}
        if self.is_main:
            runs.write_json(self.run_dir / runs.SUMMARY, summary)
        return summary

    def start(self, run_dir: Optional[Path] = None) -> Path:
        """A new run directory (`run_dir` if given) with config.yaml and env.json, made by rank 0 (the
        other ranks learn its path)."""
        if self.is_main:
            self.run_dir = runs.create_run_dir(self.config.train.out_dir, self.config.run_name(), run_dir)
            self.lock = runs.RunLock(self.run_dir).acquire()
            try:
                write_config(self.config, self.run_dir / runs.CONFIG)
                runs.write_json(self.run_dir / runs.ENV, {**runs.environment(str(self.device), self.config.seed),
                                                          "data_origin": self.splits.dataset.origin,
                                                          "data_sha256": content_checksum(self.splits.dataset)})
            except BaseException:
                self.lock.release()
                raise
        if self.world > 1:
            with distributed.peer_errors():
                self.run_dir = Path(distributed.broadcast_object(str(self.run_dir)))
        return self.run_dir

    def resume_from(self, run_dir: Path, state: dict[str, Any], lock: Optional[runs.RunLock]) -> Path:
        """Take up `run_dir` from its last.pt `state` (end of an epoch, or the step of an interrupt),
        holding its `lock` until fit() ends."""
        self.lock = lock
        self.load_checkpoint_state(state, run_dir / runs.CHECKPOINTS / "last.pt")
        # a run killed after its last epoch's last.pt but before summary.json only needs its test score
        finished = (run_dir / runs.SUMMARY).is_file() and runs.read_summary(run_dir).get("status") == "completed"
        if self.position is None and self.epoch >= self.config.train.epochs and finished:
            raise ConfigError(f"{run_dir}: already trained {self.epoch} of train.epochs={self.config.train.epochs}; "
                              "pass train.epochs=N to train longer")
        self.run_dir, self.resuming = run_dir, True
        if self.is_main:
            write_config(self.config, run_dir / runs.CONFIG)
            (run_dir / runs.SUMMARY).unlink(missing_ok=True)
        return run_dir

    # ---------------------------------------------------------------- training

    def batches(self):
        """(images, labels, targets) of one epoch; targets are soft when mixup / cutmix are on."""
        a = self.config.augment
        for images, labels in self.train_loader:
            if a.mixup or a.cutmix:
                images, targets = mix_batch(images, labels, len(self.classes), self.augment_generator, a.mixup,
                                            a.cutmix)
                if self.config.train.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                yield images, labels, targets
            else:
                yield images, labels, labels

    def train_step(self, images: torch.Tensor, targets: torch.Tensor,
                   global_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step at the scheduled LR; (detached loss, detached logits, that LR).
        With several ranks (`global_size`: the images of the whole global batch) the rank's loss is its
        summed per-image losses x ranks / global_size (plus the whole L2 penalty), so DDP's average of
        the ranks' gradients is the single-process gradient of the global batch; the loss returned is
        then this rank's part of the batch's summed loss (its per-image losses plus the penalty each)."""
        c = self.config
        lr = self.schedule.apply(self.optimizer, self.step)
        with autocast(self.device, c.train.precision):
            logits = self.forward(images)
        if global_size is None:
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=c.train.label_smoothing)
            if self.l2_weights:
                loss = loss + l2_penalty(self.l2_weights, c.optim.l2)
            reported = loss
        else:
            reported = F.cross_entropy(logits.float(), targets, label_smoothing=c.train.label_smoothing,
                                       reduction="sum")
            loss = reported * (self.world / global_size)
            if self.l2_weights:
                penalty = l2_penalty(self.l2_weights, c.optim.l2)
                loss, reported = loss + penalty, reported + penalty * len(images)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # the scaler does nothing unless the run is fp16
        if c.optim.clip_norm:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), c.optim.clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        return reported.detach(), logits.detach(), lr

    def totals(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> tuple[float, int, int]:
        """(summed loss, correct, images) of the epoch so far, over all ranks."""
        if self.world == 1:
            return loss_sum.item(), correct.item(), seen
        values = torch.stack([loss_sum, correct.double(), torch.tensor(seen, dtype=torch.float64, device=self.device)])
        loss, hits, images = distributed.all_reduce_sum(values).tolist()
        return loss, round(hits), round(images)

    def run_epoch(self, epoch: int, flag: "_SignalFlag") -> dict[str, Any]:
        """Train one epoch (from the saved position when resuming mid-epoch) and score it."""
        c = self.config
        epoch_start = time.perf_counter()
        self.current_epoch = epoch
        position, self.position = self.position, None
        generator_at_start = position["generator"] if position else self.generator.get_state()
        skip = position["batch"] if position else 0
        partial = position["partial"] if position else {"loss_sum": 0.0, "correct": 0, "seen": 0, "lrs": []}
        loss_sum = torch.tensor(partial["loss_sum"], dtype=torch.float64, device=self.device)
        correct = torch.tensor(partial["correct"], dtype=torch.long, device=self.device)
        seen, lrs = partial["seen"], list(partial["lrs"])
        self.model.train()
        for batch_index, (images, labels, targets) in enumerate(self.batches(), start=1):
            if batch_index <= skip:  # replaying the random draws of batches trained before the interrupt
                if batch_index == skip:
                    torch.set_rng_state(position["torch_rng"])
                continue
            if self.world == 1:
                loss, logits, lr = self.train_step(images, targets)
                loss_sum += loss.double() * len(labels)
            else:  # the rank's summed loss
                loss, logits, lr = self.train_step(images, targets, self.train_loader.global_size(batch_index - 1))
                loss_sum += loss.double()
            lrs.append(lr)
            seen += len(labels)
            hits = logits.argmax(1) == (targets.argmax(1) if targets.dim() == 2 else labels)
            correct += hits.sum()
            logs = None
            if batch_index % c.train.log_every == 0:
                total_loss, total_correct, total_seen = self.totals(loss_sum, correct, seen)
                logs = {"loss": total_loss / total_seen, "acc": total_correct / total_seen, "lr": lr}
            self.dispatch("on_step_end", batch_index, logs)
            if flag.signum is not None and self.world == 1:  # ranks stop together, at an epoch's end
                self.train_time += time.perf_counter() - epoch_start
                self.interrupt(epoch, batch_index, generator_at_start, flag.signum,
                               {"loss_sum": loss_sum.item(), "correct": correct.item(), "seen": seen, "lrs": lrs})
        epoch_time = time.perf_counter() - epoch_start
        self.train_time += epoch_time
        loss_total, correct_total, seen = self.totals(loss_sum, correct, seen)
        self.images_seen += seen
        record: dict[str, Any] = {"kind": "epoch", "epoch": epoch, "train_loss": loss_total / seen,
                                  "train_acc": correct_total / seen, "lr": lrs[-1]}
        if c.schedule.name != "constant" or c.schedule.warmup_epochs:
            record["lr_steps"] = lrs
        if self.world > 1:  # batch-norm statistics differ per rank: score (and save) rank 0's
            distributed.broadcast_module(self.model, buffers_only=True)
        for split, loader in self.eval_loaders.items():
            result = self.score(split, loader)
            record.update({f"{split}_loss": result.loss, f"{split}_acc": result.acc})
        record["time"] = {"elapsed_s": round(self.elapsed(), 3), "epoch_s": round(epoch_time, 3),
                          "img_per_s": round(seen / epoch_time, 1)}
        return record

    def interrupt(self, epoch: int, batch: int, generator_at_start: torch.Tensor, signum: int,
                  partial: dict[str, Any]) -> None:
        position = {"epoch": epoch, "batch": batch, "generator": generator_at_start,
                    "torch_rng": torch.get_rng_state(), "partial": partial}
        self.stop_for_signal(f"in epoch {epoch} after step {batch}", signum, position)

    def stop_for_signal(self, where: str, signum: int, position: Optional[dict[str, Any]]) -> None:
        """Save the state (`position`: where in the epoch; None: at its end), say so, raise Interrupted."""
        self.dispatch("on_interrupt", position)
        reason = f"interrupted by {signal.Signals(signum).name} {where}"
        self.write_summary("interrupted", reason)
        raise Interrupted(reason, signum, self.run_dir)

    def fit(self) -> Path:
        """Train until train.epochs or a callback's stop, score the test split once, write summary.json.
        A NaN loss ends with status "diverged" (TrainingFailed), any other error with "failed"."""
        completed = False
        try:
            with distributed.peer_errors():
                run_dir = self._fit()
            completed = True
            return run_dir
        except TrainingFailed as e:
            self.record_failure("diverged", str(e))
            raise
        except (Interrupted, KeyboardInterrupt):
            raise
        except Exception as e:
            lines = str(e).splitlines()
            self.record_failure("failed", str(e) if isinstance(e, CifarlabError) else
                                f"{type(e).__name__}: {lines[0] if lines else ''}")
            raise
        finally:
            if self.lock is not None:
                self.lock.release()
            if self.world > 1:
                distributed.leave(together=completed)

    def record_failure(self, status: str, reason: str) -> None:
        """summary.json with the failure, if it can still be written (not when the disk is full)."""
        try:
            self.write_summary(status, reason)
        except CifarlabError as e:
            log.warning("%s", e)

    def _fit(self) -> Path:
        c = self.config
        first = self.position["epoch"] if self.position else self.epoch + 1
        self.dispatch("on_fit_start")
        stop_reason = f"max epochs: trained all {c.train.epochs} epochs"
        with _SignalFlag() as flag:
            for epoch in range(first, c.train.epochs + 1):
                record = self.run_epoch(epoch, flag)
                self.epoch = epoch
                self.history.append(record)
                self.schedule.epoch_end(record)
                if self.world > 1:  # for last.pt, which rank 0's callbacks write
                    self.rank_states = distributed.all_gather_object(self.rng_state())
                self.dispatch("on_epoch_end", record)
                signum = flag.signum if self.world == 1 else self.agree_to_stop(flag.signum)
                if signum is not None and epoch < c.train.epochs:  # it came after the epoch's last step
                    self.stop_for_signal(f"at the end of epoch {epoch}", signum, None)
                if self.stop_reasons:
                    stop_reason = "; ".join(self.stop_reasons)
                    break
        self.selected_epoch = self.epoch
        self.dispatch("on_train_end")
        if self.world > 1:  # rank 0's callbacks may have put the best epoch's weights back
            distributed.broadcast_module(self.model)
        self.test_result = self.score("test", self.eval_part("test"))
        chosen = next(r for r in self.history if r["epoch"] == self.selected_epoch)
        summary = self.write_summary(
            "completed", stop_reason, best_epoch=self.selected_epoch, best_value=self.best_value,
            train_loss=chosen["train_loss"], train_acc=chosen["train_acc"], val_loss=chosen.get("val_loss"),
            val_acc=chosen.get("val_acc"), test_loss=self.test_result.loss, test_acc=self.test_result.acc,
            train_time_s=round(self.train_time, 3), wall_time_s=round(self.elapsed(), 3),
            train_img_per_s=round(self.images_seen / self.train_time, 1) if self.train_time else None)
        try:
            self.dispatch("on_fit_end", summary)
        except Exception as e:  # noqa: BLE001 - the run is trained and scored: a hook at the end must not undo that
            log.warning("a callback failed after the run completed: %s: %s", type(e).__name__, e)
        return self.run_dir

    def agree_to_stop(self, signum: Optional[int]) -> Optional[int]:
        """Every rank takes rank 0's stop reasons and the first signal any rank received, so that all
        ranks stop after the same epoch; returns that signal (or None)."""
        decisions = distributed.all_gather_object((self.stop_reasons, signum))
        self.stop_reasons = list(decisions[0][0])
        return next((got for _, got in decisions if got is not None), None)


# What a resumed run must share with its checkpoint: the network, the data and its split (seed). A new
# data.root (the data moved) or train.* / optim.* / schedule.* settings are allowed.
FIXED_ON_RESUME = ("model", "data", "seed")
# and single keys: another optimizer cannot take the saved state; the batch size sets the step count
# the schedule and a mid-epoch position are measured in
FIXED_KEYS_ON_RESUME = (("optim", "name"), ("train", "batch_size"))
MOVABLE_DATA_KEYS = ("root", "download")


def check_resumable(saved: dict[str, Any], config: Config, run_dir: Path) -> None:
    """Refuse overrides that cannot apply to a run's checkpoint (ConfigError naming the key)."""
    now = config.to_dict()
    devices = saved.get("train", {}).get("devices", 1)  # runs from before train.devices had one
    if saved and devices != config.train.devices:
        raise ConfigError(f"{run_dir}: train.devices cannot change when resuming (it was {devices}, now "
                          f"{config.train.devices}): the ranks' random draws and the data order would not continue "
                          "exactly; start a new run instead")
    for section in FIXED_ON_RESUME:
        before, after = saved.get(section), now.get(section)
        if isinstance(before, dict) and isinstance(after, dict):
            # model: any key (preset parameters are free-form); data: a key the checkpoint lacks is a
            # setting added to cifarlab since, which keeps its default
            keys = set(before) | set(after) if section == "model" else set(before) & set(after)
            changed = [f"{section}.{k}" for k in sorted(keys)
                       if before.get(k) != after.get(k) and not (section == "data" and k in MOVABLE_DATA_KEYS)]
            if changed:
                key = changed[0]
                leaf = key.split(".", 1)[1]
                raise ConfigError(f"{run_dir}: {key} cannot change when resuming (it was {before.get(leaf)!r}, "
                                  f"now {after.get(leaf)!r}); start a new run instead")
        elif saved and before != after:
            raise ConfigError(f"{run_dir}: {section} cannot change when resuming (it was {before!r}, now {after!r})")
    for section, key in FIXED_KEYS_ON_RESUME:
        before, after = saved.get(section, {}).get(key), now.get(section, {}).get(key)
        if before is not None and before != after:
            raise ConfigError(f"{run_dir}: {section}.{key} cannot change when resuming (it was {before!r}, "
                              f"now {after!r}); start a new run instead")


def state_keys(callbacks: Sequence[Callback]) -> list[str]:
    """Each callback's key in last.pt: its state_key or class name, numbered when repeated."""
    keys: list[str] = []
    for callback in callbacks:
        base = getattr(callback, "state_key", None) or type(callback).__name__
        key, n = base, 1
        while key in keys:
            n += 1
            key = f"{base}#{n}"
        keys.append(key)
    return keys


def fit(config: Config, callbacks: Sequence[Callback] = (), run_dir: Optional[Path] = None) -> Path:
    """Train as `config` says with `callbacks` into a new run directory (`run_dir` if given)."""
    trainer = Trainer(config, callbacks)
    trainer.start(run_dir)
    return trainer.fit()


def resume(run_dir: Path, config: Config, callbacks: Sequence[Callback] = ()) -> Path:
    """Continue a run from its last.pt exactly where it stopped, with `config` (the run's own,
    possibly with overrides such as train.epochs=30)."""
    # a second writer is refused before anything is read; with several ranks rank 0 holds the lock
    main = config.train.devices == 1 or distributed.main_process()
    lock = runs.RunLock(run_dir).acquire() if main else None
    try:
        state = runs.load_checkpoint(run_dir / runs.CHECKPOINTS / "last.pt")
        check_resumable(state.get("config", {}), config, run_dir)  # before the data is read
        trainer = Trainer(config, callbacks)
        trainer.resume_from(run_dir, state, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return trainer.fit()
