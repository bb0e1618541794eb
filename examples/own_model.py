"""Your own network in cifarlab: report 003's ONModelDrop1 (five conv layers, two dropouts), written
as a PyTorch user writes it, then trained, resumed, exported to ONNX and compared with the cnn4 preset.

    python examples/own_model.py PATH/TO/cifar-10-batches-py [--epochs 20]

The same network from the command line (the class is imported from this file; its `__main__` guard
keeps the import from running the script):

    cifarlab train model.module=examples/own_model.py:ONModelDrop1 'model.args={p: 0.5}' data.root=PATH
"""

import argparse
from pathlib import Path

import torch
from torch import nn

import cifarlab


class ONModelDrop1(nn.Module):
    """Report 003's ONModelDrop1, layer for layer as the report prints it (no padding; its conv5 gives
    256 x 1 x 1, so fc1 takes 256 inputs where the report's printout says 512)."""

    def __init__(self, p: float = 0.5, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.conv2 = nn.Conv2d(32, 32, 3)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv3 = nn.Conv2d(32, 64, 3)
        self.conv4 = nn.Conv2d(64, 128, 3)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.drop1 = nn.Dropout(p)
        self.conv5 = nn.Conv2d(128, 256, 3)
        self.pool3 = nn.MaxPool2d(2, 2)
        self.drop2 = nn.Dropout(p)
        self.fc1 = nn.Linear(256, 512)
        self.out1 = nn.Linear(512, num_classes)
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.activation
        x = self.pool1(a(self.conv2(a(self.conv1(x)))))
        x = self.drop1(self.pool2(a(self.conv4(a(self.conv3(x))))))
        x = self.drop2(self.pool3(a(self.conv5(x))))
        return self.out1(a(self.fc1(torch.flatten(x, 1))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="a CIFAR-10 folder (cifar-10-batches-py or its parent)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", default="runs/own-model")
    args = parser.parse_args()
    settings = {"data.root": args.root, "data.val_size": 1000, "augment.preset": "none",
                "optim.name": "sgd", "optim.lr": 0.01, "optim.momentum": 0.9, "train.batch_size": 32,
                "train.early_stopping.enabled": False, "train.out_dir": args.out, "analysis.tsne.layers": ["fc1"]}

    print(cifarlab.summary(ONModelDrop1))  # Keras' layout: layers, output shapes, parameters
    # Train half the epochs, then resume to the full count (bit-exact with one uninterrupted run).
    run = cifarlab.fit(overrides={**settings, "train.epochs": args.epochs // 2}, model=ONModelDrop1)
    run = cifarlab.resume(run, {"train.epochs": args.epochs})
    print(f"{run.path.name}: test accuracy {100 * run.summary['test_acc']:.2f}%")
    print("ONNX:", cifarlab.export_run(run, "onnx"))

    # A study: this network at three dropout rates next to the cnn4 preset (run from the repository's root).
    study = Path(__file__).resolve().parent.parent / "configs" / "studies" / "own-model.yaml"
    result = cifarlab.run_study(study, overrides=[f"data.root={args.root}", f"train.epochs={args.epochs}"],
                                out=Path(args.out) / "study")
    print(result.table)


if __name__ == "__main__":
    main()
