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


def confusion_matrix(predicted: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    return np.bincount(np.asarray(labels) * classes + np.asarray(predicted), minlength=classes * classes).reshape(
        classes, classes)


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of examples whose true class is among the k highest scores."""
    top = np.argsort(-np.asarray(scores), axis=1, kind="stable")[:, :k]
    return float((top == np.asarray(labels)[:, None]).any(axis=1).mean())
