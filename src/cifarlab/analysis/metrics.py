"""Accuracy metrics from predicted and true labels."""

from __future__ import annotations

import numpy as np


def per_class_accuracy(predicted: np.ndarray, labels: np.ndarray, classes: int) -> list[float]:
    """Accuracy of each class (NaN for a class with no examples)."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    hits = np.bincount(labels[predicted == labels], minlength=classes)
    totals = np.bincount(labels, minlength=classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (hits / totals).tolist()
