"""Checks across a config's sections: a setting that needs another section's setting (a monitored
metric needs its split evaluated, a validation metric needs a validation split). Called by Config's
validator; the errors are ValueErrors that pydantic reports as one line."""

from __future__ import annotations

from typing import Any


def check_across_sections(config: Any) -> None:
    """Adjust train.evaluate to the splits that exist, then raise a ValueError naming the first key
    whose setting another section cannot satisfy."""
    if config.data.val_size == 0 and "val" in config.train.evaluate:
        object.__setattr__(config.train, "evaluate", [s for s in config.train.evaluate if s != "val"])
    measured = {"train_acc", "train_loss"} | {f"{s}_{m}" for s in config.train.evaluate for m in ("acc", "loss")}
    for key, metric in (("schedule.monitor", config.schedule.monitor if config.schedule.name == "plateau" else None),
                        ("train.target.metric", config.train.target.metric)):
        if metric is not None and metric not in measured:
            raise ValueError(f"{key}={metric} is not measured; add its split to train.evaluate "
                             f"(now {config.train.evaluate})")
    outside = [e for e in config.analysis.tsne.epochs or [] if not 0 <= e <= config.train.epochs]
    if outside:
        raise ValueError(f"analysis.tsne.epochs: epoch {outside[0]} is not in 0..{config.train.epochs} "
                         "(0: the network before its first step; train.epochs is the last)")
    if config.analysis.tsne.layers and config.analysis.tsne.split == "val" and config.data.val_size == 0:
        raise ValueError("analysis.tsne.split=val needs data.val_size > 0")
    if config.train.divergence.enabled and "val" not in config.train.evaluate:
        raise ValueError("train.divergence needs validation loss: data.val_size > 0 and val in train.evaluate")
    es = config.train.early_stopping
    if es.enabled and es.monitor.startswith("val_") and config.data.val_size == 0:
        raise ValueError(
            f"train.early_stopping.monitor={es.monitor} needs data.val_size > 0 "
            "(or monitor a train_ metric, or set train.early_stopping.enabled=false)"
        )
