"""The reports' own pipeline, run by benchmarks/peers.py inside its tf-keras venv (never in cifarlab's):
tf.keras `model.fit` over `ImageDataGenerator.flow`, report 000's network (3 x [conv 3x3 same, BN,
ReLU, max-pool 2] 32/64/128, dense 512, dropout 0.5), Adam. Reads the arrays peers.py wrote (uint8
NCHW, the normalization mean and std), trains, prints one JSON line: each epoch's seconds and the
test accuracy. Imports nothing of cifarlab.

    python keras_peer.py DATA.npz --augment shift-flip|keras-affine --epochs N --batch-size B --lr LR --seed S
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["TF_USE_LEGACY_KERAS"] = "1"  # tf.keras is tf-keras (Keras 2), where ImageDataGenerator lives

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tf_keras import layers, models, optimizers  # noqa: E402
from tf_keras.callbacks import Callback  # noqa: E402
from tf_keras.preprocessing.image import ImageDataGenerator  # noqa: E402

AUGMENT = {  # the presets of cifarlab/config.py AUGMENT_PRESETS, in ImageDataGenerator's words
    "shift-flip": {"width_shift_range": 0.1, "height_shift_range": 0.1, "horizontal_flip": True, "fill_mode": "nearest"},
    "keras-affine": {"rotation_range": 15, "width_shift_range": 0.1, "height_shift_range": 0.1, "shear_range": 0.2,
                     "zoom_range": 0.2, "horizontal_flip": True, "fill_mode": "nearest"},
}


def network(shape: tuple[int, int, int], classes: int) -> models.Sequential:
    model = models.Sequential([layers.Input(shape)])
    for filters in (32, 64, 128):
        model.add(layers.Conv2D(filters, 3, padding="same"))
        model.add(layers.BatchNormalization(momentum=0.9, epsilon=1e-3))
        model.add(layers.ReLU())
        model.add(layers.MaxPooling2D(2))
    model.add(layers.Flatten())
    model.add(layers.Dense(512, activation="relu"))
    model.add(layers.Dropout(0.5))
    model.add(layers.Dense(classes))
    return model


class EpochTimes(Callback):
    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("--augment", choices=sorted(AUGMENT), required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tf.keras.utils.set_random_seed(args.seed)
    arrays = np.load(args.data)
    mean, std = arrays["mean"].astype(np.float32), arrays["std"].astype(np.float32)

    def images(x: np.ndarray) -> np.ndarray:  # uint8 NCHW -> normalized float NHWC, as the reports feed Keras
        return (x.transpose(0, 2, 3, 1).astype(np.float32) / 255 - mean) / std

    x_train, y_train = images(arrays["x_train"]), arrays["y_train"].astype(np.int64)
    x_test, y_test = images(arrays["x_test"]), arrays["y_test"].astype(np.int64)
    model = network(x_train.shape[1:], int(arrays["classes"]))
    model.compile(optimizer=optimizers.Adam(args.lr),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    flow = ImageDataGenerator(**AUGMENT[args.augment]).flow(x_train, y_train, batch_size=args.batch_size,
                                                             seed=args.seed)
    times = EpochTimes()
    model.fit(flow, epochs=args.epochs, callbacks=[times], verbose=0)
    _, test_acc = model.evaluate(x_test, y_test, batch_size=1024, verbose=0)
    print(json.dumps({"tensorflow": tf.__version__, "epoch_s": times.seconds, "images": len(y_train),
                      "test_acc": float(test_acc)}))


if __name__ == "__main__":
    main()
