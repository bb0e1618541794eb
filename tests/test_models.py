import re
from collections import OrderedDict

import pytest
import torch

from cifarlab.config import load_config
from cifarlab.errors import ConfigError
from cifarlab.models.build import build_layers, build_model, preset_names
from cifarlab.models.layers import BiasedBatchNorm2d
from cifarlab.models.summary import count_params, format_summary, summarize

# Parameter counts of the reports' networks: (trainable, non-trainable), from their own tables.
REPORT_COUNTS = {
    "cnn3": (1_147_914, 448),  # report 000
    "cnn3-avg": (1_211_018, 1_728),  # report 001
    "cnn3-fast": (1_147_914, 448),  # report 000's layers, lighter dropout
    "lab-m1": (48_970, 0),  # report 002, model 1
    "lab-m1-bn": (51_146, 2_176),
    "lab-m2": (1_442_902, 0),
    "lab-m2-bn": (1_443_230, 328),
    "lab-m3": (1_121_430, 0),
    "lab-m3-bn": (1_121_758, 328),
    "cnn4": (890_410, 0),  # report 003 CNNModel
    "cnn4-improved": (4_270_474, 576),  # report 003 CNNImp
    "cnn-5x5": (2_284_970, 384),  # report 004 as described there (our widths: 32, 64, dense 512)
    "resnet-fast": (6_573_120, 4_480),  # ResNet-9 of Page's "How to train your ResNet": 6.57M
    "airbench": (568_728, 1_568),  # airbench94's layout at widths 64/128/128 (whitening filters fitted, frozen)
}


def model_for(preset, shape=(3, 32, 32), classes=10, *overrides):
    config = load_config(overrides=[f"model.preset={preset}", *overrides])
    return build_model(config.model, shape, classes)


@pytest.mark.parametrize("preset", sorted(REPORT_COUNTS))
def test_preset_parameter_counts_match_the_reports(preset):
    assert count_params(model_for(preset)) == REPORT_COUNTS[preset]


def test_every_preset_has_a_count_in_this_test():
    assert set(preset_names()) == set(REPORT_COUNTS)


@pytest.mark.parametrize("preset", preset_names())
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_every_preset_runs_forward_and_backward(preset, shape):
    torch.manual_seed(0)
    model = model_for(preset, shape, 10)
    x = torch.randn(4, *shape)
    out = model(x)
    assert out.shape == (4, 10)
    assert torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{preset}: {name} got no gradient"


def test_cnn3_summary_has_the_layer_shapes_of_report_000():
    model = model_for("cnn3")
    rows = summarize(model, (3, 32, 32))
    shapes = {r.name: r.output_shape for r in rows}
    assert shapes["conv1"] == (32, 32, 32)
    assert shapes["pool1"] == (16, 16, 32)
    assert shapes["conv2"] == (16, 16, 64)
    assert shapes["pool2"] == (8, 8, 64)
    assert shapes["conv3"] == (8, 8, 128)
    assert shapes["pool3"] == (4, 4, 128)
    assert shapes["flatten"] == (2048,)
    assert shapes["fc1"] == (512,)
    assert shapes["fc2"] == (10,)
    text = format_summary(rows)
    assert "Total params: 1,148,362" in text
    assert "Trainable params: 1,147,914" in text
    assert "Non-trainable params: 448" in text
    # BN layers count gamma, beta, moving mean and moving variance, as Keras does.
    assert {r.name: r.params for r in rows}["bn1"] == 4 * 32


def test_layer_names_are_stable():
    names = [n for n, _ in model_for("cnn3-avg").named_children()]
    assert names[:4] == ["conv1", "bn1", "relu1", "pool1"]
    assert "flatten" in names and "fc1" in names and "bn4" in names and names[-1] == "fc3"


def test_preset_parameters_change_the_network():
    plain = model_for("cnn3", (3, 32, 32), 10, "model.batchnorm=false")
    assert count_params(plain) == (1_147_914 - 448, 0)
    wide = model_for("cnn3", (3, 32, 32), 10, "model.kernels=[7,5,3]")
    assert wide.conv1.kernel_size == (7, 7) and wide.conv2.kernel_size == (5, 5)
    dropped = model_for("cnn3-avg", (3, 32, 32), 10, "model.dropout=0.2")
    assert [m.p for m in dropped.modules() if isinstance(m, torch.nn.Dropout)] == [0.2, 0.2]
    # airbench without its whitening layer (configs/studies/fmnist-fast-ablation.yaml): the first conv sees the pixels
    whitened, bare = (model_for("airbench", (1, 28, 28), 10, f"model.whiten={w}") for w in ("true", "false"))
    assert list(whitened.named_children())[0][0] == "whiten1" and whitened.conv1.in_channels == 8
    assert list(bare.named_children())[0][0] == "conv1" and bare.conv1.in_channels == 1
    # 7 more input channels of conv1's 64 3x3 filters and the whitening bias; its 8 frozen 2x2 filters
    assert count_params(whitened) == (count_params(bare)[0] + 7 * 64 * 9 + 8, count_params(bare)[1] + 8 * 4)


def test_mnist_input_and_class_count_follow_the_dataset():
    model = model_for("cnn3-avg", (1, 28, 28), 100)
    assert model.conv1.in_channels == 1
    assert model.fc1.in_features == 128 * 3 * 3
    assert model.fc3.out_features == 100


def test_inline_layers_build_with_inferred_shapes():
    config = load_config(overrides=["model.layers=[{conv: 8}, relu, {maxpool: 2}, flatten, {dense: 10}]"])
    assert config.model.preset is None
    model = build_model(config.model, (3, 32, 32), 10)
    assert model.fc1.in_features == 8 * 16 * 16


@pytest.mark.parametrize("layers, message", [
    ([{"conv": {"filters": 8, "kernal": 3}}], "conv has no argument 'kernal'"),
    (["softmaxx"], "unknown layer kind 'softmaxx'"),
    ([{"dense": 10}], "needs a flat input"),
    ([{"dropout": 1.5}], "p=1.5 must be in [0, 1)"),
])
def test_bad_layer_specs_name_the_problem(layers, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_layers(layers, (3, 32, 32))


def test_residual_adds_its_input_and_must_keep_the_shape():
    model = build_layers([{"residual": [{"conv": {"filters": 3, "bias": False}}]}, {"scale": 0.5}], (3, 8, 8))
    assert [n for n, _ in model.named_modules()][1:] == ["res1", "res1.conv1", "scale1"]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model.res1.conv1.weight.zero_()
        assert torch.equal(model(x), x * 0.5)  # x + conv(x) with a zero conv, halved
        model.res1.conv1.weight[:, :, 1, 1] = torch.eye(3)  # conv(x) = x
        assert torch.allclose(model(x), x)
    with pytest.raises(ConfigError, match=r"layer 0 \(residual\).*must keep the shape"):
        build_layers([{"residual": [{"conv": {"filters": 4}}]}], (3, 8, 8))
    with pytest.raises(ConfigError, match="non-empty list"):
        build_layers([{"residual": 3}], (3, 8, 8))
    with pytest.raises(ConfigError, match=r"layer 0 \(residual\) layer 1: unknown layer kind 'conv9'"):
        build_layers([{"residual": ["relu", "conv9"]}], (3, 8, 8))


class ReluInputs(torch.overrides.TorchFunctionMode):
    """The shape of every tensor torch's ReLU runs on in its block."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.relu, torch.nn.functional.relu, torch.relu_):
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def test_a_relu_before_a_max_pool_runs_after_it_with_the_same_values_and_gradients():
    torch.manual_seed(0)
    model = model_for("cnn3")  # conv, BN, ReLU, max-pool x 3: the ReLUs run on the pooled maps
    written = torch.nn.Sequential(OrderedDict(model.named_children())).train()  # the same modules, each run in the written order
    images = torch.randn(8, 3, 32, 32)
    images[:, :, :4] = 0.0  # flat regions: ties in the pools' windows
    labels = torch.arange(8) % 10
    results = []
    for net in (model.train(), written):
        net.zero_grad()
        torch.manual_seed(1)  # the same dropout masks
        with ReluInputs() as seen:
            logits = net(images)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        results.append((logits, {n: p.grad.clone() for n, p in net.named_parameters()}, seen.shapes))
    (fast, fast_grads, fast_relus), (plain, plain_grads, plain_relus) = results
    assert torch.equal(fast, plain)
    assert all(torch.equal(fast_grads[n], plain_grads[n]) for n in plain_grads)
    assert plain_relus[:3] == [(8, 32, 32, 32), (8, 64, 16, 16), (8, 128, 8, 8)]
    assert fast_relus[:3] == [(8, 32, 16, 16), (8, 64, 8, 8), (8, 128, 4, 4)]
    # a hook on either layer (feature capture, a summary) sees the written order: relu1's output is unpooled
    captured = []
    handle = model.relu1.register_forward_hook(lambda m, i, out: captured.append(out.shape))
    torch.manual_seed(1)
    with ReluInputs() as seen:
        assert torch.equal(model(images), plain)
    handle.remove()
    assert captured == [(8, 32, 32, 32)] and seen.shapes[0] == (8, 32, 32, 32) and seen.shapes[1] == (8, 64, 8, 8)
    # so does a hook on every module (torch.nn.modules.module.register_module_forward_hook)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, out: None)
    try:
        with ReluInputs() as seen:
            model(images)
    finally:
        handle.remove()
    assert seen.shapes[:3] == plain_relus[:3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keras_batchnorm_moves_by_the_biased_batch_variance_and_normalizes_as_torch(dtype):
    # Keras' moving variance follows the biased batch variance (test_keras_parity checks it against Keras);
    # here on what training feeds it: a channels-last batch, in float32 and in bf16 (autocast's convolutions give bf16)
    ours, theirs = BiasedBatchNorm2d(8, momentum=0.01, eps=1e-3), torch.nn.BatchNorm2d(8, momentum=0.01, eps=1e-3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for bn in (ours, theirs):
            bn.weight.copy_(torch.rand(8, generator=g) + 0.5)
            bn.running_mean.copy_(torch.randn(8, generator=g))
            bn.running_var.copy_(torch.rand(8, generator=g) + 0.5)
        theirs.load_state_dict(ours.state_dict())
    x = (torch.randn(16, 8, 5, 5, generator=g) * 3 + 1).to(dtype).contiguous(memory_format=torch.channels_last)
    before_mean, before_var = ours.running_mean.clone(), ours.running_var.clone()
    out, expected = ours(x), theirs(x)
    assert torch.equal(out, expected)  # the training output is torch's
    (out.float() * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
    (expected.float() * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
    assert torch.equal(ours.weight.grad, theirs.weight.grad) and torch.equal(ours.bias.grad, theirs.bias.grad)
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(ours.running_mean, (0.99 * before_mean + 0.01 * mean).float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.running_var, (0.99 * before_var + 0.01 * var).float(), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(theirs.running_var, ours.running_var, rtol=1e-4)  # torch's own moves by the unbiased
    assert int(ours.num_batches_tracked) == 1
