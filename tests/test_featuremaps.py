"""Feature maps and filters as Keras users read them: layers by name or count, a conv's maps after its
activation under the keras flavor, -o, a photo of yours never overwriting the run's figures, first / last
kernels. trained_run (conftest.py): cnn3-avg (conv, BN, ReLU, avg-pool x 3) on the CIFAR-10 head."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cifarlab.analysis.layer_outputs import conv_layers, feature_map_layers, kernel_range
from cifarlab.config import load_config
from cifarlab.models.build import build_model
from cifarlab.runs import LoadedRun
from conftest import copy_run
from helpers import assert_error, invoke


class OwnNet(nn.Module):
    """A PyTorch user's network: a nested Sequential and one ReLU module reused after each conv."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1))
        self.act = nn.ReLU()
        self.head = nn.Linear(6 * 16 * 16, 10)

    def forward(self, x):
        x = self.act(self.features[0](x))
        x = self.act(self.features[2](self.features[1](x)))
        return self.head(x.flatten(1))


@pytest.fixture(scope="module")
def test_image(trained_run):
    run = LoadedRun(trained_run)
    images, _ = run.split("test")
    return run, images[0]


def test_layers_are_counted_and_shown_as_the_flavor_reads_them(test_image):
    run, image = test_image
    torch.manual_seed(0)
    plain = build_model(load_config(overrides=["model.preset=cnn3", "model.batchnorm=false"]).model, (3, 32, 32), 10)
    x = run.normalize(image[None]).contiguous()
    keras = feature_map_layers(plain, x, 4, "keras")
    # Keras' Conv2D(activation="relu"): the ReLU folds into the conv; layers 1-4 are conv, pool, conv, pool
    assert [layer.title for layer in keras] == ["conv1 + relu1", "pool1", "conv2 + relu2", "pool2"]
    with torch.no_grad():
        conv1 = plain.conv1(x)[0].numpy()
    np.testing.assert_allclose(keras[0].output, np.maximum(conv1, 0), atol=1e-6)
    torch_layers = feature_map_layers(plain, x, 4, "torch")
    assert [layer.title for layer in torch_layers] == ["conv1", "relu1", "pool1", "conv2"]
    np.testing.assert_allclose(torch_layers[0].output, conv1, atol=1e-6)
    assert (torch_layers[0].output < 0).mean() > 0.2  # before the activation: negative values shown
    # a batch norm between conv and ReLU (the Keras code has BatchNormalization, Activation): nothing folds
    trained = feature_map_layers(run.model, run.normalize(image[None]), 4, "keras")
    assert [layer.title for layer in trained] == ["conv1", "bn1", "relu1", "pool1"]
    assert trained[0].output.shape == (32, 32, 32) and trained[3].output.shape == (32, 16, 16)


def test_layers_by_dotted_name_in_your_own_module(test_image):
    run, image = test_image
    torch.manual_seed(0)
    net = OwnNet().eval()
    x = run.normalize(image[None]).contiguous()
    with torch.no_grad():
        first = net.features[0](x)[0].numpy()
        second = net.features[2](net.features[1](torch.relu(net.features[0](x))))[0].numpy()
    keras = feature_map_layers(net, x, "features.0,features.2", "keras")
    assert [layer.title for layer in keras] == ["features.0 + act", "features.2 + act"]  # the reused ReLU folds
    np.testing.assert_allclose(keras[0].output, np.maximum(first, 0), atol=1e-6)
    np.testing.assert_allclose(keras[1].output, np.maximum(second, 0), atol=1e-5)
    counted = feature_map_layers(net, x, 3, "keras")
    assert [layer.title for layer in counted] == ["features.0 + act", "features.1", "features.2 + act"]
    assert [layer.title for layer in feature_map_layers(net, x, 3, "torch")] == ["features.0", "act", "features.1"]
    net.act.inplace = True  # ReLU(inplace=True), common in PyTorch code: the conv's own map stays as the conv gave it
    inplace = feature_map_layers(net, x, 2, "torch")
    np.testing.assert_allclose(inplace[0].output, first, atol=1e-6)
    assert (inplace[0].output < 0).any() and [layer.title for layer in feature_map_layers(net, x, 1, "keras")] == [
        "features.0 + act"]


def test_filters_of_named_convs_first_and_last_kernels(trained_run):
    model = LoadedRun(trained_run).model
    assert [name for name, _ in conv_layers(model, 2)] == ["conv1", "conv2"]
    assert [name for name, _ in conv_layers(model, "conv3,conv1")] == ["conv3", "conv1"]
    assert list(kernel_range(64, last=8)) == list(range(56, 64))  # report 002: the last 8
    assert list(kernel_range(32, first=5)) == [0, 1, 2, 3, 4] and list(kernel_range(4, last=8)) == [0, 1, 2, 3]


def test_featuremaps_of_a_photo_leave_the_runs_figures_alone(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "copy")
    own = run / "plots" / "featuremaps_01_conv1.png"
    before = own.read_bytes()
    images, _ = LoadedRun(run).split("test")
    photo = tmp_path / "horse.jpg"  # a real test image as a photo of another size
    Image.fromarray(images[3].transpose(1, 2, 0)).resize((160, 120), Image.BICUBIC).save(photo)
    result = invoke("viz", "featuremaps", run, "--image", photo, "--layers", "conv1,pool1")
    assert result.returncode == 0, result.stderr
    folder = run / "plots" / "featuremaps-horse"
    assert sorted(p.name for p in folder.iterdir()) == [
        "featuremaps_01_conv1.png", "featuremaps_02_pool1.png", "featuremaps_input.png"]
    assert own.read_bytes() == before
    with Image.open(folder / "featuremaps_input.png") as shown:  # as given and as resized, side by side
        assert shown.width > 1.6 * shown.height
    result = invoke("viz", "featuremaps", run, "--layers", "2", "-o", tmp_path / "maps")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == [
        "featuremaps_01_conv1.png", "featuremaps_02_bn1.png", "featuremaps_input.png"]
    assert own.read_bytes() == before
    result = invoke("viz", "filters", run, "--layers", "conv2", "--last", "8", "-o", tmp_path / "filters")
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "filters" / "filters_conv2.png") as tiles:  # one row of 8 kernels
        assert tiles.width > 4 * tiles.height and np.asarray(tiles.convert("L")).std() > 5


@pytest.mark.parametrize("args, fragments", [
    (["featuremaps", "--layers", "conv9"], ["--layers: layer 'conv9' is not in the model", "conv1, bn1"]),
    (["featuremaps", "--layers", "fc1"], ["--layers: 'fc1' gives 512 values, not feature maps"]),
    (["featuremaps", "--layers", "0"], ["--layers=0: give a count of at least 1"]),
    (["filters", "--layers", "pool1"], ["--layers: 'pool1' is a AvgPool2d, not a convolution", "conv1, conv2, conv3"]),
    (["filters", "--first", "2", "--last", "3"], ["--first=2 and --last=3: give one of them"]),
])
def test_bad_layer_choices_are_one_line_errors(trained_run, args, fragments):
    assert_error(invoke("viz", *args, trained_run), 2, *fragments)
