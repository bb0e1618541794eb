"""cifarlab: train and study small CNNs on CIFAR-10 and its cousins."""

__version__ = "0.1.0"
