"""airbench's ingredients as cifarlab options (issue 25): the patch-whitening layer, dirac init, batch
norm without its weight, biases at a higher learning rate, alternating flips, the lookahead, Muon and
scaled logits; each with real numbers, and a run with all of them resumes bit-exactly."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import cifarlab
from cifarlab import runs
from cifarlab.api import evaluate_run, fit, resume
from cifarlab.config import load_config
from cifarlab.data.augment import alternate_flip, build_augment, flip_phase, Batch
from cifarlab.errors import ConfigError
from cifarlab.export import export_run
from cifarlab.models.build import build_layers, build_model
from cifarlab.models.layers import parse_layer
from cifarlab.models.whitening import PatchWhitening, patch_covariance, whitening_filters
from cifarlab.train.callbacks import Lookahead
from cifarlab.train.muon import Muon, orthogonalize
from cifarlab.train.optim import make_optimizer, parameter_groups
from cifarlab.data.sources import dataset_from_config


def assert_error(make, key):
    """A ConfigError of one line that names `key`."""
    with pytest.raises(ConfigError) as info:
        make()
    message = str(info.value)
    assert key in message and "\n" not in message, message


def head_images(cifar10_head, count=200):
    """Real CIFAR-10 training images, normalized per channel, float (N, 3, 32, 32)."""
    ds = dataset_from_config(load_config(overrides=[f"data.root={cifar10_head}"]).data, 0)
    x = torch.from_numpy(ds.x_train[:count]).float() / 255
    return (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)


# ---------------------------------------------------------------- whitening


def test_patch_covariance_matches_numpy_over_every_patch(cifar10_head):
    images = head_images(cifar10_head, 7)
    x = images.double().numpy()
    patches = [x[n, :, i:i + 2, j:j + 2].reshape(-1) for n in range(7) for i in range(31) for j in range(31)]
    expected = np.mean([np.outer(p, p) for p in patches], axis=0)
    np.testing.assert_allclose(patch_covariance(images, 2).numpy(), expected, rtol=1e-10, atol=1e-12)


def test_whitening_filters_whiten_the_patches_of_real_images(cifar10_head):
    images = head_images(cifar10_head)
    layer = PatchWhitening(3, 2, 1e-9, 200, None)
    layer.fit(images)
    assert layer.weight.shape == (24, 3, 2, 2)
    with torch.no_grad():
        out = layer(images.double().float())  # the bias is zero: the filters alone
    flat = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()
    covariance = flat.T @ flat / len(flat)
    # the first half of the channels is white: unit variance, uncorrelated; the second half is its negative
    np.testing.assert_allclose(covariance.numpy(), np.eye(12), atol=2e-3)
    torch.testing.assert_close(out[:, 12:], -out[:, :12])
    # largest eigenvalue first: the first filter is the patch's mean brightness, all weights one sign
    first = layer.weight[0].flatten()
    assert (first > 0).all() or (first < 0).all()
    # eps damps the directions of small variance: a large eps leaves the small eigen-directions below 1
    damped = whitening_filters(images, 2, 1.0)
    assert damped[11].norm() < whitening_filters(images, 2, 1e-9)[11].norm() / 3


@pytest.fixture(scope="module")
def whitening_run(cifar10_head, tmp_path_factory):
    """A run whose first layer is `whiten` (bias trained 1 epoch of 3), and its weights after each epoch."""
    seen = []

    class Record(cifarlab.Callback):
        def on_epoch_end(self, trainer, record):
            seen.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})

    config = load_config(overrides=[
        f"data.root={cifar10_head}", "data.train_limit=400", "data.test_limit=100", "data.val_size=0",
        "model.layers=[{whiten: {kernel: 2, bias_epochs: 1, samples: 300}}, relu, {conv: 8}, relu, global_avgpool, "
        "{dense: 10}]", "optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9", "optim.weight_decay=0.01",
        "train.epochs=3", "train.early_stopping.enabled=false", f"train.out_dir={tmp_path_factory.mktemp('whiten')}",
        "analysis.report=false"])
    return fit(config, callbacks=[Record()]), seen


def test_whitening_run_stores_its_filters_and_freezes_the_bias(whitening_run):
    run, seen = whitening_run
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    # the stored filters are those of the first 300 training images under the run's normalization
    splits = cifarlab.load_run(run).loaded.splits
    x = torch.from_numpy(splits.train[0][:300]).float() / 255
    mean, std = torch.tensor(splits.mean).view(1, 3, 1, 1), torch.tensor(splits.std).view(1, 3, 1, 1)
    expected = whitening_filters((x - mean) / std, 2, 5e-4).float()
    torch.testing.assert_close(state["model"]["whiten1.weight"], expected,
                               rtol=1e-4, atol=1e-4)
    # the bias trained in epoch 1 only; the filters never moved; the conv trained every epoch
    bias = [s["whiten1.bias"] for s in seen]
    assert bias[0].abs().sum() > 0 and torch.equal(bias[0], bias[1]) and torch.equal(bias[1], bias[2])
    assert all(torch.equal(s["whiten1.weight"], seen[0]["whiten1.weight"]) for s in seen)
    assert not torch.equal(seen[1]["conv1.weight"], seen[2]["conv1.weight"])
    # eval (and predict) rebuild the model from the checkpoint and score what training scored
    assert evaluate_run(run, "test")["acc"] == pytest.approx(runs.read_summary(run)["test_acc"])


def test_whitening_layer_refuses_bad_arguments():
    with pytest.raises(ConfigError, match=r"whiten kernel=0 must be a whole number >= 1"):
        parse_layer({"whiten": {"kernel": 0}}, "layer 0")
    with pytest.raises(ConfigError, match=r"whiten bias_epochs=-1 must be a whole number >= 0"):
        parse_layer({"whiten": {"bias_epochs": -1}}, "layer 0")
    with pytest.raises(ConfigError, match=r"whiten eps=0 must be a number > 0"):
        parse_layer({"whiten": {"eps": 0}}, "layer 0")
    with pytest.raises(ConfigError, match="needs an image input"):
        build_layers(["flatten", "whiten"], (3, 8, 8))


def test_whitening_travels_into_the_onnx_export(whitening_run, tmp_path):
    for name in ("onnx", "onnxscript"):
        pytest.importorskip(name)
    ort = pytest.importorskip("onnxruntime")
    run = cifarlab.load_run(whitening_run[0])
    path = export_run(run.path, "onnx", tmp_path / "whiten.onnx")
    images = run.loaded.split("test")[0][:32]
    graph = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probabilities = graph.run(None, {"images": np.ascontiguousarray(images.transpose(0, 2, 3, 1))})[0]
    expected = run.predict(images)
    np.testing.assert_allclose(probabilities, expected, rtol=0, atol=1e-5)
    # without the fitted filters (the layer's white-patch start) the network answers otherwise
    unfitted = copy.deepcopy(run.model())  # the run's own model is cached: change a copy
    unfitted.whiten1.weight.copy_(PatchWhitening(3, 2, 5e-4, 1, None).weight)
    with torch.inference_mode():
        other = torch.softmax(unfitted(run.loaded.normalize(images)).float(), 1).numpy()
    assert np.abs(other - expected).max() > 1e-2


# ---------------------------------------------------------------- dirac init, batch norm, scale


def test_dirac_conv_starts_as_the_identity_on_its_inputs():
    torch.manual_seed(0)
    model = build_layers([{"conv": {"filters": 6, "init": "dirac"}}], (4, 8, 8))
    x = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        y = model(x)
    torch.testing.assert_close(y[:, :4], x)  # the first four filters pass their channel through
    assert model.conv1.weight[4:].abs().sum() > 0  # the others keep torch's random init
    assert model.conv1.bias.abs().sum() == 0
    fewer = build_layers([{"conv": {"filters": 2, "init": "dirac", "kernel": 2}}], (3, 5, 5))
    assert fewer.conv1.weight.shape == (2, 3, 2, 2) and fewer.conv1.weight.sum() == 2
    with pytest.raises(ConfigError, match=r"init='dirac' must be torch or glorot"):
        parse_layer({"dense": {"units": 3, "init": "dirac"}}, "layer 1")
    with pytest.raises(ConfigError, match=r"init='identity' must be torch, glorot or dirac"):
        parse_layer({"conv": {"filters": 3, "init": "identity"}}, "layer 1")


def test_batchnorm_without_scale_has_no_weight_and_unit_variance():
    model = build_layers([{"batchnorm": {"scale": False, "momentum": 0.4}}], (3, 4, 4))
    assert [n for n, _ in model.named_parameters()] == ["bn1.bias"]
    assert "bn1.weight" not in model.state_dict()
    x = torch.randn(16, 3, 4, 4) * 5 + 2
    with torch.no_grad():
        model.bn1.bias.fill_(0.5)
        y = model.train()(x)
    np.testing.assert_allclose(y.std((0, 2, 3), unbiased=False).numpy(), 1, atol=1e-4)
    np.testing.assert_allclose(y.mean((0, 2, 3)).numpy(), 0.5, atol=1e-5)
    # momentum 0.4 (torch's convention): the running mean moved 40 % of the way to the batch mean
    torch.testing.assert_close(model.bn1.running_mean, 0.4 * x.mean((0, 2, 3)))
    neither = build_layers([{"batchnorm": {"scale": False, "center": False}}], (3, 4, 4))
    assert list(neither.parameters()) == []
    with pytest.raises(ConfigError, match=r"batchnorm scale='no' must be true or false"):
        parse_layer({"batchnorm": {"scale": "no"}}, "layer 2")


def test_cnn3_fast_preset_switches_the_network_ingredients():
    plain = build_model(load_config(overrides=["model.preset=cnn3-fast"]).model, (3, 32, 32), 10)
    assert list(plain._modules)[:2] == ["conv1", "bn1"] and plain.bn1.weight is not None
    config = load_config(overrides=["model.preset=cnn3-fast", "model.whiten=true", "model.dirac=true",
                                    "model.bn_scale=false", "model.bn_momentum=0.4", "model.logit_scale=0.125"])
    model = build_model(config.model, (3, 32, 32), 10)
    assert list(model._modules)[:3] == ["whiten1", "relu1", "conv1"] and list(model._modules)[-1] == "scale1"
    assert model.bn2.weight is None and model.bn2.momentum == 0.4 and model.scale1.factor == 0.125
    assert model.conv2.weight[:32, :, 1, 1].diagonal().eq(1).all()
    with pytest.raises(ConfigError, match=r"scale factor='big' must be a number"):
        load_config(overrides=["model.preset=cnn3-fast", "model.logit_scale=big"])


# ---------------------------------------------------------------- bias learning rate, Muon


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def test_bias_lr_scale_moves_biases_that_much_faster():
    config = load_config(overrides=["optim.name=sgd", "optim.lr=0.1", "optim.weight_decay=0.01",
                                    "optim.bias_lr_scale=8"])
    groups = parameter_groups(config.optim, small_net())
    assert [len(g["params"]) for g in groups] == [3, 3]  # conv, bn, dense weights; their biases
    assert groups[1]["lr"] == pytest.approx(0.8) and groups[1]["weight_decay"] == pytest.approx(0.01 / 8)
    steps = {}
    for scale in (1, 8):
        model = small_net()
        c = load_config(overrides=["optim.name=sgd", "optim.lr=0.1", f"optim.bias_lr_scale={scale}"]).optim
        optimizer = make_optimizer(c, model)
        x = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(1))
        model(x).square().sum().backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.step()
        steps[scale] = {n: (p.detach() - before[n]) for n, p in model.named_parameters()}
    torch.testing.assert_close(steps[8]["3.bias"], 8 * steps[1]["3.bias"])
    torch.testing.assert_close(steps[8]["3.weight"], steps[1]["3.weight"])
    assert_error(lambda: load_config(overrides=["optim.bias_lr_scale=0"]), "optim.bias_lr_scale")


def test_newton_schulz_orthogonalizes():
    g = torch.randn(16, 72, generator=torch.Generator().manual_seed(0))
    singular = torch.linalg.svdvals(orthogonalize(g))
    before = torch.linalg.svdvals(g)
    assert before.max() / before.min() > 2  # a badly conditioned start
    assert singular.min() > 0.5 and singular.max() < 1.3  # Muon's quintic lands every value near 1
    tall = orthogonalize(g.T)
    torch.testing.assert_close(tall, orthogonalize(g).T)


def test_muon_steps_conv_filters_by_the_orthogonalized_momentum_and_the_rest_by_sgd():
    config = load_config(overrides=["optim.name=muon", "optim.lr=0.1", "optim.muon_lr=0.02", "optim.momentum=0.9",
                                    "optim.nesterov=true"])
    model, reference = small_net(), small_net()
    optimizer = make_optimizer(config.optim, model)
    assert isinstance(optimizer, Muon) and [g["muon"] for g in optimizer.param_groups] == [False, True]
    sgd = torch.optim.SGD([p for p in reference.parameters() if p.dim() != 4], lr=0.1, momentum=0.9, nesterov=True)
    w = reference[0].weight.detach().clone()
    buffer = None
    for seed in range(3):
        x = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
        for net, opt in ((model, optimizer), (reference, sgd)):
            opt.zero_grad()
            net(x).square().sum().backward()
            opt.step()
        g, reference[0].weight.grad = reference[0].weight.grad, None  # no optimizer of the reference zeroes it
        buffer = g.clone() if buffer is None else 0.9 * buffer + g
        direction = (g + 0.9 * buffer).reshape(4, -1)
        w = w * (2.0 / w.norm()) - 0.02 * orthogonalize(direction).view(w.shape)  # sqrt(4 filters) = 2
        with torch.no_grad():
            reference[0].weight.copy_(w)
    torch.testing.assert_close(model[0].weight, w)
    for name in ("1.weight", "1.bias", "3.weight", "3.bias"):  # (0.bias: before batch norm its gradient is ~0 noise)
        # torch's SGD rounds its nesterov step in another order: equal up to float32 rounding, amplified by 3 steps
        torch.testing.assert_close(dict(model.named_parameters())[name], dict(reference.named_parameters())[name],
                                   rtol=2e-4, atol=1e-5)
    # after the steps the filters' norm is about sqrt(filters): the rescale holds it there
    assert abs(model[0].weight.norm().item() - 2.0) < 0.1


# ---------------------------------------------------------------- alternating flips


def test_alternate_flip_mirrors_each_image_every_other_epoch():
    images = torch.arange(1000 * 4, dtype=torch.float32).view(1000, 1, 1, 4)
    index = torch.arange(1000)
    one, two, three = (alternate_flip(images, Batch(index, epoch, 7)) for epoch in (1, 2, 3))
    flipped = [(out != images).any(3).view(-1) for out in (one, two, three)]
    assert torch.equal(flipped[0], ~flipped[1]) and torch.equal(flipped[0], flipped[2])
    assert 450 < int(flipped[0].sum()) < 550  # about half in each epoch
    # decided per image, whatever batch it comes in; another seed gives another pattern
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(alternate_flip(images[order], Batch(order, 1, 7)), one[order])
    assert not torch.equal(flip_phase(index, 7), flip_phase(index, 8))
    # it draws nothing: the generator's next draws are the same with or without it
    config = load_config(overrides=["augment.crop=2", "augment.flip=alternate"]).augment
    augment = build_augment(config, seed=7)
    generator = torch.Generator().manual_seed(3)
    uint8 = (torch.arange(2 * 3 * 8 * 8) % 256).to(torch.uint8).view(2, 3, 8, 8)
    augment(uint8, generator, torch.tensor([0, 1]), 1)
    crop_only = build_augment(load_config(overrides=["augment.crop=2"]).augment)
    generator_b = torch.Generator().manual_seed(3)
    crop_only(uint8, generator_b)
    assert torch.equal(generator.get_state(), generator_b.get_state())
    assert_error(lambda: load_config(overrides=["augment.flip=sometimes"]), "augment.flip")


# ---------------------------------------------------------------- lookahead


def test_lookahead_pulls_the_weights_to_their_average():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    trainer = SimpleNamespace(model=model, device=torch.device("cpu"), step=0, steps_per_epoch=10,
                              config=SimpleNamespace(train=SimpleNamespace(epochs=1)))
    look = Lookahead(every=5, decay=0.5, power=1.0)
    look.on_fit_start(trainer)
    expected_ema = 0.0
    for step in range(1, 11):
        with torch.no_grad():
            model.weight.add_(1.0)  # an optimizer step of +1
        trainer.step = step
        weight = model.weight.item()
        look.on_step_end(trainer, step, None)
        if step % 5 == 0:
            decay = 0.5 * step / 10
            expected_ema = expected_ema + (1 - decay) * (weight - expected_ema)
            assert model.weight.item() == pytest.approx(expected_ema)
        else:
            assert model.weight.item() == weight
    # by hand: step 5: decay 0.25, ema 0 + 0.75 x 5 = 3.75; step 10: weights 8.75, decay 0.5, ema 3.75 + 0.5 x 5 = 6.25
    assert model.weight.item() == pytest.approx(6.25)
    assert torch.equal(look.state_dict()["ema"]["weight"], model.weight.detach())
    assert_error(lambda: load_config(overrides=["train.lookahead.every=5", "train.devices=2"]), "train.lookahead.every")


# ---------------------------------------------------------------- all of them, resumed


class StopAfter(cifarlab.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, trainer, record):
        if record["epoch"] == self.epoch:
            trainer.stop("test: stop here")


def without_time(run):
    return [{k: v for k, v in row.items() if k != "time"} for row in runs.read_jsonl(run / "metrics.jsonl")
            if row["kind"] != "test"]


def test_every_ingredient_together_resumes_bit_exactly(cifar10_head, tmp_path):
    overrides = [f"data.root={cifar10_head}", "data.train_limit=400", "data.test_limit=200", "data.val_size=0",
                 "model.preset=cnn3-fast", "model.widths=[8,16,16]", "model.fc=32", "model.whiten=true",
                 "model.dirac=true", "model.bn_scale=false", "model.bn_momentum=0.4", "model.logit_scale=0.2",
                 "optim.name=muon", "optim.lr=0.05", "optim.momentum=0.9", "optim.nesterov=true",
                 "optim.bias_lr_scale=4", "optim.weight_decay=5e-4", "schedule.name=onecycle",
                 "augment.crop=2", "augment.flip=alternate", "train.label_smoothing=0.2", "train.lookahead.every=3",
                 "train.epochs=4", "train.log_every=5", "train.early_stopping.enabled=false", "analysis.report=false"]
    straight = fit(load_config(overrides=[*overrides, f"train.out_dir={tmp_path / 'a'}"]))
    half = fit(load_config(overrides=[*overrides, f"train.out_dir={tmp_path / 'b'}"]), callbacks=[StopAfter(2)])
    assert runs.read_summary(half)["epochs_run"] == 2
    resumed = resume(half)
    assert without_time(straight) == without_time(resumed)
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert runs.read_summary(straight)["test_acc"] == runs.read_summary(resumed)["test_acc"]
    with pytest.raises(ConfigError, match=r"optim.bias_lr_scale cannot change when resuming"):
        resume(half, ["optim.bias_lr_scale=2"])  # other parameter groups could not take the saved state
    # the tested weights are the lookahead's average, which last.pt holds: eval scores them again
    assert evaluate_run(straight, "test")["acc"] == pytest.approx(runs.read_summary(straight)["test_acc"])
