"""cifarlab against a real peer: Keras 3 on its torch backend (a test-only dependency, no TensorFlow).

Same inputs and the same weights into both, then the outputs compared: every preset's network, even
kernels and stride 2 under 'same' padding, the ImageDataGenerator affine warp in every fill mode (exact
90-degree rotations included), its channel shift, zoom ranges, samplewise / featurewise standardization,
the distributions of the random augmentation draws, the optimizers of the keras flavor step by step and
their defaults against Keras' signatures, BatchNorm in training and inference, and ZCA whitening against
ImageDataGenerator.fit.
"""

import inspect
import math
import os

import numpy as np
import pytest
import torch

from cifarlab.config import load_config
from cifarlab.data.augment import affine_matrices, build_augment, draw_affine, shift_channels, warp
from cifarlab.data.prepare import eval_loader, prepare_data
from cifarlab.data.splits import zca_matrix
from cifarlab.errors import ConfigError
from cifarlab.models.build import FLAVOR_LAYER_DEFAULTS, build_layers, build_model, preset_names, resolve_layers
from cifarlab.models.layers import BiasedBatchNorm1d, BiasedBatchNorm2d, parse_layer
from cifarlab.models.summary import count_params
from cifarlab.train.formulas import ARGUMENT_KEYS, KERAS_OPTIMIZERS, TF1_OPTIMIZERS
from cifarlab.train.optim import make_optimizer


# Keras' legacy ImageDataGenerator and its torch backend warn about deprecated numpy / scipy calls.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
keras = layers = legacy_image = stats = None  # imported by `peer` in the one worker that runs this file


@pytest.fixture(scope="module", autouse=True)
def peer():
    """Keras on its torch backend, imported when these tests run rather than when every worker collects
    them (about 5 s): being module-scoped, the fixture also keeps this file's tests on one worker."""
    global keras, layers, legacy_image, stats
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":  # keras came in earlier with another backend
        pytest.skip("keras is loaded with another backend")
    pytest.importorskip("scipy")  # the legacy ImageDataGenerator warps with scipy.ndimage
    legacy_image = pytest.importorskip("keras.src.legacy.preprocessing.image")
    from keras import layers
    from scipy import stats


# ---------------------------------------------------------------- networks

class KerasTwin:
    """A Keras functional model built from the same layer items as a cifarlab network, with the
    cifarlab weights copied in (conv (O, I, kh, kw) -> (kh, kw, I, O); a dense layer after flatten
    gets its input rows reordered from (C, H, W) to Keras' (H, W, C) order)."""

    def __init__(self, items, net, shape):
        self.modules = dict(net.named_modules())
        inputs = keras.Input((shape[1], shape[2], shape[0]))
        self.copies = []
        out, _ = self._apply(items, inputs, tuple(shape), "", None)
        self.model = keras.Model(inputs, out)
        for copy in self.copies:
            copy()

    def _apply(self, items, x, shape, prefix, order):
        counts = {}
        from cifarlab.models.layers import LAYER_KINDS

        for index, item in enumerate(items):
            kind, a = parse_layer(item, f"item {index}")
            p = LAYER_KINDS[kind].prefix or kind
            counts[p] = counts.get(p, 0) + 1
            name = p if p == "flatten" and counts[p] == 1 else f"{p}{counts[p]}"
            module = self.modules[prefix + name]
            x, shape, order = self._layer(kind, a, module, x, shape, prefix + name, order)
        return x, order

    def _layer(self, kind, a, module, x, shape, name, order):
        if kind == "conv":
            if a["padding"] in ("same", "valid"):
                padding = a["padding"]
            else:
                x = layers.ZeroPadding2D(int(a["padding"]))(x)
                padding = "valid"
            layer = layers.Conv2D(a["filters"], a["kernel"], strides=a["stride"], padding=padding, use_bias=a["bias"])
            x = layer(x)

            def copy(layer=layer, m=module):
                weights = [m.weight.detach().permute(2, 3, 1, 0).numpy()]
                if m.bias is not None:
                    weights.append(m.bias.detach().numpy())
                layer.set_weights(weights)

            self.copies.append(copy)
            return x, (a["filters"], *x.shape[1:3]), None
        if kind == "whiten":  # a conv of fixed filters (fitted on the training split) and a bias, no padding
            layer = layers.Conv2D(module.weight.shape[0], a["kernel"], padding="valid")
            x = layer(x)
            self.copies.append(lambda layer=layer, m=module: layer.set_weights(
                [m.weight.detach().permute(2, 3, 1, 0).numpy(), m.bias.detach().numpy()]))
            return x, (module.weight.shape[0], *x.shape[1:3]), None
        if kind == "dense":
            layer = layers.Dense(a["units"], use_bias=a["bias"])
            x = layer(x)

            def copy(layer=layer, m=module, order=order):
                w = m.weight.detach()
                if order is not None:  # rows of a flattened (C, H, W) input, in Keras' (H, W, C) order
                    c, h, wd = order
                    w = w.reshape(-1, c, h, wd).permute(0, 2, 3, 1).reshape(len(w), -1)
                weights = [w.T.numpy()]
                if m.bias is not None:
                    weights.append(m.bias.detach().numpy())
                layer.set_weights(weights)

            self.copies.append(copy)
            return x, (a["units"],), None
        if kind == "batchnorm":
            layer = layers.BatchNormalization(momentum=1 - a["momentum"], epsilon=a["eps"], scale=a["scale"],
                                              center=a["center"])
            x = layer(x)

            def copy(layer=layer, m=module, order=order):
                def keras_order(v):
                    v = v.detach()
                    if order is not None:
                        v = v.reshape(order).permute(1, 2, 0).reshape(-1)
                    return v.numpy()

                layer.set_weights([keras_order(t) for t in (m.weight, m.bias, m.running_mean, m.running_var)
                                   if t is not None])

            self.copies.append(copy)
            return x, shape, order
        simple = {
            "relu": lambda: layers.ReLU(), "gelu": lambda: layers.Activation(lambda t: keras.activations.gelu(t, False)),
            "elu": lambda: layers.ELU(), "tanh": lambda: layers.Activation("tanh"),
            "sigmoid": lambda: layers.Activation("sigmoid"),
            "leaky_relu": lambda: layers.LeakyReLU(negative_slope=a["slope"]),
            "dropout": lambda: layers.Dropout(a["p"]), "dropout2d": lambda: layers.SpatialDropout2D(a["p"]),
            "scale": lambda: layers.Rescaling(float(a["factor"])),
            "global_avgpool": lambda: layers.GlobalAveragePooling2D(), "global_maxpool": lambda: layers.GlobalMaxPooling2D(),
        }
        if kind in simple:
            x = simple[kind]()(x)
            flat = kind.startswith("global")
            return x, ((shape[0],) if flat else shape), (None if flat else order)
        if kind in ("maxpool", "avgpool", "pool"):
            pool_type = {"maxpool": "max", "avgpool": "avg"}.get(kind, a.get("type"))
            pool = layers.MaxPooling2D if pool_type == "max" else layers.AveragePooling2D
            x = pool(a["size"], strides=a.get("stride") or a["size"])(x)
            return x, (shape[0], *x.shape[1:3]), None
        if kind == "flatten":
            return layers.Flatten()(x), (int(np.prod(shape)),), shape
        if kind == "residual":
            body, _ = self._apply(a["layers"], x, shape, name + ".", order)
            return layers.Add()([x, body]), shape, order
        raise AssertionError(f"no Keras twin for layer kind {kind}")


def randomize_batchnorm(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def compare_with_keras(items, shape, seed=0):
    torch.manual_seed(seed)
    net = build_layers(items, shape).eval()
    randomize_batchnorm(net, seed)
    twin = KerasTwin(items, net, shape)
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        ours = net(x)
    theirs = twin.model(x.permute(0, 2, 3, 1), training=False)
    theirs = theirs.detach().cpu() if isinstance(theirs, torch.Tensor) else torch.as_tensor(np.asarray(theirs))
    if ours.dim() == 4:
        theirs = theirs.permute(0, 3, 1, 2)
    trainable, frozen = count_params(net)
    return net, twin.model, ours, theirs, trainable + frozen


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_matches_its_keras_twin(preset):
    config = load_config(overrides=[f"model.preset={preset}"])
    items = resolve_layers(config.model.preset, None, config.model.params(), 3, 10)
    net, model, ours, theirs, params = compare_with_keras(items, (3, 32, 32))
    assert model.count_params() == params
    assert tuple(model.output_shape[1:]) == tuple(ours.shape[1:])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * max(1.0, float(ours.abs().max())))


SAME_CASES = [  # (kernel, stride, input size): even kernels, stride 2, odd sizes
    (2, 1, 32), (4, 1, 32), (4, 1, 15), (6, 1, 9), (3, 2, 32), (3, 2, 15), (4, 2, 32), (4, 2, 15), (5, 2, 16),
    (2, 2, 7), (1, 2, 8), (5, 3, 17), (3, 1, 32), (5, 1, 15),
]


@pytest.mark.parametrize("kernel, stride, size", SAME_CASES)
def test_same_padding_matches_keras_shape_and_sampling_grid(kernel, stride, size):
    items = [{"conv": {"filters": 4, "kernel": kernel, "stride": stride, "padding": "same"}}, "flatten", {"dense": 3}]
    net, model, ours, theirs, params = compare_with_keras(items, (2, size, size), seed=kernel * 10 + stride)
    conv_shape = model.layers[1].output.shape[1:3]
    assert tuple(conv_shape) == (math.ceil(size / stride),) * 2
    assert model.count_params() == params
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_odd_kernels_at_stride_one_keep_the_plain_conv():
    net = build_layers([{"conv": {"filters": 4, "kernel": 5}}, {"conv": {"filters": 4, "kernel": 4}}], (3, 16, 16))
    assert type(net.conv1) is torch.nn.Conv2d and net.conv1.padding == (2, 2)
    assert type(net.conv2) is not torch.nn.Conv2d and net.conv2.pad == (1, 2, 1, 2)  # extra pixel after
    assert sorted(dict(net.named_parameters())) == ["conv1.bias", "conv1.weight", "conv2.bias", "conv2.weight"]


def test_summary_of_cnn_5x5_with_kernel_4_has_keras_count():
    config = load_config(overrides=["model.preset=cnn-5x5", "model.kernel=4"])
    items = resolve_layers("cnn-5x5", None, config.model.params(), 3, 10)
    net, model, ours, theirs, params = compare_with_keras(items, (3, 32, 32))
    assert params == model.count_params() == 2_219_978


def test_keras_flavor_layers_have_keras_init_and_batchnorm():
    config = load_config(overrides=["defaults=keras", "model.preset=cnn-5x5"])
    torch.manual_seed(0)
    net = build_model(config.model, (3, 32, 32), 10)
    conv, fc = net.conv3, net.fc1
    for m in (conv, fc):
        fan_in, fan_out = m.weight[0].numel(), m.weight.shape[0] * m.weight[0, 0].numel()
        limit = math.sqrt(6 / (fan_in + fan_out))
        assert float(m.weight.abs().max()) <= limit
        assert float(m.weight.std()) == pytest.approx(limit / math.sqrt(3), rel=0.05)  # uniform on [-l, l]
        assert float(m.bias.abs().max()) == 0.0
    keras_bn = layers.BatchNormalization()
    assert isinstance(net.bn1, BiasedBatchNorm2d)
    assert (net.bn1.momentum, net.bn1.eps) == pytest.approx((1 - keras_bn.momentum, keras_bn.epsilon))
    torch_net = build_model(load_config(overrides=["model.preset=cnn-5x5"]).model, (3, 32, 32), 10)
    assert type(torch_net.bn1) is torch.nn.BatchNorm2d and torch_net.bn1.eps == 1e-5
    assert float(torch_net.fc1.bias.abs().max()) > 0  # torch's own init: not zero biases


# ---------------------------------------------------------------- affine warp

WARPS = [dict(angle=0.0, shear=0.0, zoom_x=1.0, zoom_y=1.0, shift_x=3.0, shift_y=-2.0),
         dict(angle=0.0, shear=0.0, zoom_x=1.0, zoom_y=1.0, shift_x=1.37, shift_y=0.61),
         dict(angle=27.0, shear=0.0, zoom_x=1.0, zoom_y=1.0, shift_x=0.0, shift_y=0.0),
         dict(angle=-12.5, shear=9.0, zoom_x=0.8, zoom_y=1.15, shift_x=2.3, shift_y=-1.4),
         dict(angle=15.0, shear=-11.0, zoom_x=1.2, zoom_y=0.85, shift_x=-3.1, shift_y=2.6)]


def keras_warp(image: np.ndarray, p: dict, fill: str, cval: float) -> np.ndarray:
    """Keras' ImageDataGenerator warp of a (C, H, W) image. Its tx / ty move the sampling point, so
    they are minus cifarlab's content shifts; after its x/y swap tx acts on the columns (x)."""
    return legacy_image.apply_affine_transform(
        image.astype(np.float64), theta=p["angle"], tx=-p["shift_x"], ty=-p["shift_y"], shear=p["shear"],
        zx=p["zoom_x"], zy=p["zoom_y"], row_axis=1, col_axis=2, channel_axis=0, fill_mode=fill, cval=cval, order=1)


@pytest.mark.parametrize("fill", ["nearest", "constant", "reflect", "wrap"])
@pytest.mark.parametrize("index", range(len(WARPS)))
def test_affine_warp_matches_image_data_generator_pixel_for_pixel(fill, index):
    params = WARPS[index]
    images = np.random.default_rng(index).random((2, 3, 16, 16)).astype(np.float32)
    cval = 0.3
    matrices = affine_matrices(16, 16, **{k: torch.full((2,), v) for k, v in params.items()})
    ours = warp(torch.from_numpy(images), matrices, fill, cval).numpy()
    for i in range(2):
        theirs = keras_warp(images[i], params, fill, cval)
        np.testing.assert_allclose(ours[i], theirs, atol=2e-5, rtol=0)
    if fill == "constant" and (params["shift_x"] or params["angle"]):
        assert (np.abs(ours - cval) < 1e-7).mean() > 0.02  # the case exercises the fill


def test_constant_fill_does_not_blend_into_the_fill_color():
    image = torch.ones(1, 1, 8, 8)
    m = affine_matrices(8, 8, *(torch.zeros(1),) * 2, torch.ones(1), torch.ones(1), torch.tensor([0.5]), torch.zeros(1))
    out = warp(image, m, "constant", 0.0)[0, 0]
    assert out[:, 0].tolist() == [0.0] * 8  # x = -0.5: outside, cval
    assert out[:, 1:].min() == 1.0  # inside: pure image, never a blend with the fill


def generator_transform(image: np.ndarray, params: dict, fill: str = "nearest", cval: float = 0.0, **kwargs):
    """Keras' own ImageDataGenerator(...).apply_transform of a (C, H, W) image with fixed parameters."""
    gen = legacy_image.ImageDataGenerator(fill_mode=fill, cval=cval, data_format="channels_first", dtype="float64",
                                          **kwargs)
    return gen.apply_transform(image.astype(np.float64), params)


@pytest.mark.parametrize("fill", ["constant", "wrap"])
@pytest.mark.parametrize("size", [8, 9, 32])
@pytest.mark.parametrize("angle", [90, -90, 180, -180])
def test_exact_right_angle_rotations_match_keras_at_the_border(angle, size, fill):
    # Keras' cos 90 degrees is 6e-17: border points land a rounding away from the outer pixel centers,
    # outside (constant: filled; wrap: taken from the other side) or inside, as its float64 arithmetic decides
    images = np.random.default_rng(size).random((2, 3, size, size)).astype(np.float32) + 0.5
    full = lambda v: torch.full((2,), float(v))  # noqa: E731
    ours = warp(torch.from_numpy(images), affine_matrices(size, size, full(angle), full(0), full(1), full(1),
                                                          full(0), full(0)), fill, 0.0).numpy()
    for i in range(2):
        np.testing.assert_allclose(ours[i], generator_transform(images[i], {"theta": angle}, fill), atol=2e-5, rtol=0)
    if (angle, size, fill) == (180, 8, "constant"):
        assert (ours == 0).sum() == 2 * 3 * 8  # the case the old tolerance got wrong: Keras fills a whole edge


@pytest.mark.parametrize("intensity", [-60.0, -7.5, 0.0, 33.3, 200.0])
def test_channel_shift_matches_keras_apply_transform(intensity):
    images = np.random.default_rng(3).integers(20, 230, size=(2, 3, 6, 6)).astype(np.float32)
    ours = shift_channels(torch.from_numpy(images) / 255, torch.full((2,), intensity / 255)).numpy() * 255
    for i in range(2):
        theirs = generator_transform(images[i], {"channel_shift_intensity": intensity}, channel_shift_range=1.0)
        np.testing.assert_allclose(ours[i], theirs, atol=1e-3, rtol=0)
        if intensity == 200.0:  # clipped to the image's own maximum, over all channels
            assert ours[i].max() == images[i].max() and (ours[i] == images[i].max()).mean() > 0.9


def test_augment_keys_match_keras_apply_transform_with_the_same_draws():
    # the whole augmentation of a config (warp with zoom [lo, hi] and wrap fill, then the channel shift)
    # against Keras' apply_transform given the parameters cifarlab drew
    c = load_config(overrides=["augment.rotation=30", "augment.shear=10", "augment.zoom=[0.7,1.3]",
                               "augment.width_shift=2.5", "augment.height_shift=1.5", "augment.channel_shift=40",
                               "augment.fill_mode=wrap"]).augment
    images = np.random.default_rng(4).integers(0, 256, size=(4, 3, 12, 12)).astype(np.uint8)
    out = build_augment(c)(torch.from_numpy(images), torch.Generator().manual_seed(5)).numpy()
    replay = torch.Generator().manual_seed(5)
    p = draw_affine(4, 12, 12, c, replay, "cpu")
    limit = 40 / 255
    intensity = (torch.rand(4, generator=replay) * (2 * limit) - limit).numpy() * 255
    assert np.abs(intensity).max() > 5
    for i in range(4):
        params = {"theta": float(p["angle"][i]), "tx": -float(p["shift_x"][i]), "ty": -float(p["shift_y"][i]),
                  "shear": float(p["shear"][i]), "zx": float(p["zoom_x"][i]), "zy": float(p["zoom_y"][i]),
                  "channel_shift_intensity": float(intensity[i])}
        theirs = generator_transform(images[i], params, "wrap", channel_shift_range=40.0) / 255
        np.testing.assert_allclose(out[i], theirs, atol=5e-5, rtol=0)


# ---------------------------------------------------------------- standardization


@pytest.mark.parametrize("normalize, samplewise, keras_args", [
    ("center", "none", dict(featurewise_center=True)),  # featurewise_center alone
    ("center", "std", dict(featurewise_center=True, samplewise_std_normalization=True)),
    ("false", "center", dict(samplewise_center=True)),
    ("false", "std", dict(samplewise_std_normalization=True)),  # Keras turns samplewise_center on with it
    ("true", "center", dict(featurewise_center=True, featurewise_std_normalization=True, samplewise_center=True)),
])
def test_standardization_matches_image_data_generator(normalize, samplewise, keras_args):
    config = load_config(overrides=["data.dataset=synthetic", "data.train_limit=200", "data.val_size=20",
                                    "data.test_limit=6", f"data.normalize={normalize}", f"data.samplewise={samplewise}"])
    splits = prepare_data(config)
    x_train, (x_test, y_test) = splits.train[0], splits.test
    gen = legacy_image.ImageDataGenerator(rescale=1 / 255, data_format="channels_first", dtype="float64", **keras_args)
    gen.fit(x_train.astype(np.float64))
    theirs = np.stack([gen.standardize(image.astype(np.float64)) for image in x_test])  # one image at a time, as flow
    ours = next(iter(eval_loader((x_test, y_test), splits, config, torch.device("cpu"))))[0].contiguous().numpy()
    # Keras divides by std + 1e-6 (featurewise), cifarlab by std: 1e-5 of a value near 3 at most
    np.testing.assert_allclose(ours, theirs, atol=5e-5, rtol=0)
    assert np.abs(theirs - x_test / 255).max() > 0.05  # the standardization changes the images


# ---------------------------------------------------------------- random draws

def draws(n, **augment):
    c = load_config(overrides=[f"augment.{k}={v}" for k, v in augment.items()]).augment
    return draw_affine(n, 32, 32, c, torch.Generator().manual_seed(7), "cpu")


def keras_draws(n, **kwargs):
    gen = legacy_image.ImageDataGenerator(**kwargs)
    np.random.seed(7)
    return [gen.get_random_transform((32, 32, 3)) for _ in range(n)]


def test_int_shift_range_draws_keras_integers():
    n = 30000
    ours = draws(n, width_shift=3)["shift_x"].numpy()
    theirs = np.array([t["ty"] for t in keras_draws(3000, width_shift_range=3)])  # Keras: width -> ty
    assert set(np.unique(ours)) == set(np.unique(theirs)) == {-2.0, -1.0, 0.0, 1.0, 2.0}
    # a magnitude from {0, 1, 2} and a random sign: P(0) = 1/3, P(+-1) = P(+-2) = 1/6
    observed = [np.sum(ours == v) for v in (-2, -1, 0, 1, 2)]
    expected = np.array([1, 1, 2, 1, 1]) / 6 * n
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    theirs_counts = [np.sum(theirs == v) for v in (-2, -1, 0, 1, 2)]
    assert stats.chisquare(theirs_counts, expected / 10).pvalue > 1e-3  # the same law in Keras


@pytest.mark.parametrize("value, low, high", [("3.0", -3.0, 3.0), ("0.1", -3.2, 3.2), ("1.5", -1.5, 1.5)])
def test_float_shift_ranges_draw_uniform_pixels(value, low, high):
    ours = draws(20000, height_shift=value)["shift_y"].numpy()
    assert ours.min() >= low and ours.max() <= high
    assert np.mean(ours != np.round(ours)) > 0.99  # continuous, not whole pixels
    assert stats.kstest(ours, stats.uniform(low, high - low).cdf).pvalue > 1e-3
    theirs = np.array([t["tx"] for t in keras_draws(2000, height_shift_range=float(value))])  # height -> tx
    assert stats.ks_2samp(ours, theirs).pvalue > 1e-3


def test_rotation_shear_and_zoom_draws_follow_keras_ranges():
    ours = draws(20000, rotation=15, shear=0.2, zoom=0.2)
    theirs = keras_draws(2000, rotation_range=15, shear_range=0.2, zoom_range=0.2)
    for key, keras_key in (("angle", "theta"), ("shear", "shear"), ("zoom_x", "zx"), ("zoom_y", "zy")):
        assert stats.ks_2samp(ours[key].numpy(), np.array([t[keras_key] for t in theirs])).pvalue > 1e-3


def test_zoom_pair_draws_follow_keras_zoom_range():
    ours = draws(20000, zoom="[0.6,0.9]")
    theirs = keras_draws(2000, zoom_range=[0.6, 0.9])
    for key, keras_key in (("zoom_x", "zx"), ("zoom_y", "zy")):
        values = ours[key].numpy()
        assert 0.6 <= values.min() and values.max() <= 0.9
        assert stats.ks_2samp(values, np.array([t[keras_key] for t in theirs])).pvalue > 1e-3
    assert stats.ks_2samp(ours["zoom_x"].numpy(), draws(20000, zoom=0.15)["zoom_x"].numpy()).pvalue < 1e-6


def test_channel_shift_draws_follow_keras():
    c = load_config(overrides=["augment.channel_shift=30"]).augment
    images = torch.full((20000, 1, 2, 2), 127, dtype=torch.uint8)
    images[:, :, 0, 0], images[:, :, 1, 1] = 0, 255  # an image spanning 0..255: the middle pixel is never clipped
    shifted = build_augment(c)(images, torch.Generator().manual_seed(2))
    ours = (shifted[:, 0, 0, 1] * 255 - 127).numpy()
    theirs = np.array([t["channel_shift_intensity"] for t in keras_draws(2000, channel_shift_range=30.0)])
    assert np.abs(ours).max() <= 30 + 1e-3 and stats.ks_2samp(ours, theirs).pvalue > 1e-3


def test_shift_draws_can_fail_the_law():
    # the statistical checks above distinguish the laws: a uniform integer draw in [-2, 2] (the old rule)
    old = np.random.default_rng(0).integers(-2, 3, 30000)
    observed = [np.sum(old == v) for v in (-2, -1, 0, 1, 2)]
    assert stats.chisquare(observed, np.array([1, 1, 2, 1, 1]) / 6 * 30000).pvalue < 1e-6


# ---------------------------------------------------------------- optimizers

def problem(seed=0, dim=12, scale=1e-3):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(32, dim, generator=g)
    b = torch.randn(32, generator=g)
    w0 = torch.randn(dim, generator=g) * 0.5

    def loss(w):  # small gradients, where eps placement matters
        return scale * torch.nn.functional.softplus(a @ w - b).sum() + scale * 0.1 * (w ** 2).sum()

    return w0, loss


def run_cifarlab(overrides, steps, w0, loss):
    config = load_config(overrides=overrides)
    model = torch.nn.Linear(len(w0), 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w0[None])
    opt = make_optimizer(config.optim, model)
    path = []
    for _ in range(steps):
        opt.zero_grad()
        loss(model.weight[0]).backward()
        opt.step()
        path.append(model.weight[0].detach().clone())
    return torch.stack(path)


def run_keras(optimizer, steps, w0, loss):
    v = keras.Variable(w0.numpy().copy())
    path = []
    for _ in range(steps):
        w = torch.tensor(np.asarray(keras.ops.convert_to_numpy(v)), requires_grad=True)
        loss(w).backward()
        optimizer.apply_gradients([(w.grad.detach(), v)])
        path.append(torch.from_numpy(np.asarray(keras.ops.convert_to_numpy(v))).clone())
    return torch.stack(path)


OPTIMIZER_CASES = [
    (["optim.name=rmsprop", "optim.lr=0.01"], lambda: keras.optimizers.RMSprop(learning_rate=0.01)),
    (["optim.name=rmsprop", "optim.lr=0.01", "optim.momentum=0.9"],
     lambda: keras.optimizers.RMSprop(learning_rate=0.01, momentum=0.9)),
    (["optim.name=adagrad", "optim.lr=0.05"], lambda: keras.optimizers.Adagrad(learning_rate=0.05)),
    (["optim.name=adadelta", "optim.lr=1.0"], lambda: keras.optimizers.Adadelta(learning_rate=1.0)),
    (["optim.name=adam", "optim.lr=0.01"], lambda: keras.optimizers.Adam(learning_rate=0.01)),
    (["optim.name=adam", "optim.lr=0.01", "optim.weight_decay=0.05"],
     lambda: keras.optimizers.Adam(learning_rate=0.01, weight_decay=0.05)),
    (["optim.name=adamw", "optim.lr=0.01", "optim.weight_decay=0.05"],
     lambda: keras.optimizers.AdamW(learning_rate=0.01, weight_decay=0.05)),
    (["optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.9", "optim.nesterov=true"],
     lambda: keras.optimizers.SGD(learning_rate=0.1, momentum=0.9, nesterov=True)),
]


@pytest.mark.parametrize("case", range(len(OPTIMIZER_CASES)))
def test_keras_flavor_optimizers_follow_keras_trajectories(case):
    overrides, make = OPTIMIZER_CASES[case]
    w0, loss = problem(case)
    ours = run_cifarlab(["defaults=keras", *overrides], 40, w0, loss)
    theirs = run_keras(make(), 40, w0, loss)
    moved = float((theirs[-1] - w0).abs().max())
    assert moved > 1e-3  # the problem moves the weights
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * max(moved, 1e-2))


def test_torch_rmsprop_with_keras_numbers_is_not_keras():
    # eps outside the root (torch) vs inside (Keras): the test above could tell them apart
    w0, loss = problem(0, scale=1e-6)
    torch_path = run_cifarlab(["optim.name=rmsprop", "optim.lr=0.01", "optim.alpha=0.9", "optim.eps=1e-7"], 20, w0, loss)
    keras_path = run_keras(keras.optimizers.RMSprop(learning_rate=0.01), 20, w0, loss)
    ours = run_cifarlab(["defaults=keras", "optim.name=rmsprop", "optim.lr=0.01"], 20, w0, loss)
    torch.testing.assert_close(ours, keras_path, rtol=1e-5, atol=1e-7)
    assert float((torch_path - keras_path).abs().max()) > 10 * float((keras_path[-1] - w0).abs().max()) / 20


def test_keras_flavor_fills_keras_defaults_and_explicit_values_win():
    c = load_config(overrides=["defaults=keras", "optim.name=rmsprop"]).optim
    k = keras.optimizers.RMSprop()
    assert (c.alpha, c.eps, c.initial_accumulator) == (k.rho, k.epsilon, 0.0)
    c = load_config(overrides=["defaults=keras", "optim.name=adadelta", "optim.rho=0.8"]).optim
    assert (c.rho, c.eps) == (0.8, keras.optimizers.Adadelta().epsilon)
    c = load_config(overrides=["defaults=keras", "optim.name=adagrad"]).optim
    assert (c.initial_accumulator, c.eps) == (keras.optimizers.Adagrad().initial_accumulator_value, 1e-7)
    assert load_config(overrides=["defaults=keras", "optim.name=adam"]).optim.eps == keras.optimizers.Adam().epsilon


@pytest.mark.parametrize("name", list(KERAS_OPTIMIZERS))
def test_keras_flavor_optimizer_defaults_are_keras_signatures(name):
    cls, table = KERAS_OPTIMIZERS[name]
    params = inspect.signature(getattr(keras.optimizers, cls)).parameters
    assert {argument: params[argument].default for argument in table} == table
    # every constructor argument with an OptimConfig key is in the table
    assert {a for a in params if a in ARGUMENT_KEYS or a in ("rho", "beta_1", "beta_2")} == set(table)
    c = load_config(overrides=["defaults=keras", f"optim.name={name}"]).optim  # every key left out
    for argument, key in ARGUMENT_KEYS.items():
        if argument in params:
            assert getattr(c, key) == (params[argument].default or 0.0), (argument, key)  # Keras: weight_decay None
    if "rho" in params:
        assert getattr(c, "alpha" if name == "rmsprop" else "rho") == params["rho"].default
    if "beta_1" in params:
        assert tuple(c.betas) == (params["beta_1"].default, params["beta_2"].default)


@pytest.mark.parametrize("name, cls", [("sgd", "SGD"), ("adam", "Adam"), ("adamw", "AdamW"), ("adagrad", "Adagrad"),
                                       ("rmsprop", "RMSprop")])
def test_keras_flavor_without_settings_trains_as_keras_defaults(name, cls):
    # optim.name alone under defaults: keras is Keras' optimizer with no argument (SGD at 0.01, AdamW's 0.004 decay)
    w0, loss = problem(len(name), scale=1.0)
    ours = run_cifarlab(["defaults=keras", f"optim.name={name}"], 30, w0, loss)
    theirs = run_keras(getattr(keras.optimizers, cls)(), 30, w0, loss)
    moved = float((theirs[-1] - w0).abs().max())
    assert moved > 5e-3
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * moved)


@pytest.mark.parametrize("name", list(TF1_OPTIMIZERS))
def test_tf1_flavor_takes_tensorflow_1_defaults_and_asks_for_required_ones(name):
    cls, table = TF1_OPTIMIZERS[name]
    required = [argument for argument, value in table.items() if value == "required"]
    settings = {"learning_rate": "optim.lr=0.05", "weight_decay": "optim.weight_decay=0.01"}
    base = ["defaults=tf1", f"optim.name={name}"]
    for argument in required:  # TensorFlow 1 raises without it: so does the config, naming the key
        key = ARGUMENT_KEYS[argument]
        with pytest.raises(ConfigError, match=rf"^config: optim\.{key}: TensorFlow 1's {cls} has no default "
                                              rf"{argument} \(defaults: tf1\); set optim\.{key}$"):
            load_config(overrides=base + [settings[a] for a in required if a != argument])
    c = load_config(overrides=base + [settings[a] for a in required]).optim
    keys = {**ARGUMENT_KEYS, "rho": "rho", "decay": "alpha"}
    for argument, value in table.items():
        if argument in ("beta1", "beta2"):
            assert c.betas[argument == "beta2"] == value
        elif value != "required":
            assert getattr(c, keys[argument]) == value, argument


# ---------------------------------------------------------------- BatchNorm

@pytest.mark.parametrize("flavor, image", [("keras", True), ("keras", False), ("tf1", False)])
def test_flavor_batchnorm_matches_keras_in_training_and_inference(flavor, image):
    # tf1 after a dense layer: tf.layers' non-fused batch norm, whose biased moving variance is Keras 3's
    config = load_config(overrides=[f"defaults={flavor}", "model.layers=[batchnorm]"])
    shape = (5, 6, 6) if image else (7,)
    torch.manual_seed(0)
    net = build_model(config.model, shape, 10)
    assert isinstance(net.bn1, BiasedBatchNorm2d if image else BiasedBatchNorm1d)
    bn = layers.BatchNormalization()
    bn.build((None, *shape[1:], shape[0]) if image else (None, *shape))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        net.bn1.weight.copy_(torch.rand(shape[0], generator=g) + 0.5)
        net.bn1.bias.copy_(torch.randn(shape[0], generator=g))
    bn.set_weights([net.bn1.weight.detach().numpy(), net.bn1.bias.detach().numpy(),
                    net.bn1.running_mean.numpy(), net.bn1.running_var.numpy()])
    to_keras = (lambda t: t.permute(0, 2, 3, 1)) if image else (lambda t: t)
    net.train()
    for step in range(5):
        x = torch.randn(4, *shape, generator=g) * 3 + step
        ours = net(x).detach()
        theirs = torch.as_tensor(np.asarray(keras.ops.convert_to_numpy(bn(to_keras(x), training=True))))
        torch.testing.assert_close(to_keras(ours), theirs, rtol=1e-4, atol=1e-4)
    moving = [np.asarray(keras.ops.convert_to_numpy(v)) for v in (bn.moving_mean, bn.moving_variance)]
    np.testing.assert_allclose(net.bn1.running_mean.numpy(), moving[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.bn1.running_var.numpy(), moving[1], rtol=1e-5, atol=1e-6)
    net.eval()
    x = torch.randn(3, *shape, generator=g)
    theirs = torch.as_tensor(np.asarray(keras.ops.convert_to_numpy(bn(to_keras(x), training=False))))
    torch.testing.assert_close(to_keras(net(x).detach()), theirs, rtol=1e-4, atol=1e-4)


def test_flavor_layer_defaults_are_the_frameworks_signatures():
    conv, dense, bn = (inspect.signature(cls).parameters for cls in (layers.Conv2D, layers.Dense,
                                                                      layers.BatchNormalization))
    assert conv["kernel_initializer"].default == dense["kernel_initializer"].default == "glorot_uniform"
    assert conv["bias_initializer"].default == dense["bias_initializer"].default == "zeros"
    # TensorFlow 1.15's tf.layers (not installable here), from its documented signatures (r1.15 API reference,
    # tensorflow/python/layers/{convolutional,core,normalization}.py): conv2d and dense kernel_initializer=None,
    # i.e. tf.get_variable's glorot_uniform_initializer, bias_initializer=zeros_initializer();
    # batch_normalization momentum=0.99, epsilon=0.001, fused=None (the fused kernel on 4-D inputs)
    tf1 = {"kernel": "glorot_uniform", "bias": "zeros", "momentum": 0.99, "epsilon": 0.001}
    keras_values = {"kernel": "glorot_uniform", "bias": "zeros", "momentum": bn["momentum"].default,
                    "epsilon": bn["epsilon"].default}
    for flavor, framework in (("keras", keras_values), ("tf1", tf1)):
        ours = FLAVOR_LAYER_DEFAULTS[flavor]
        # init glorot = Glorot uniform kernel, zero bias (models/layers.py _init_glorot)
        assert ours["conv"]["init"] == ours["dense"]["init"] == "glorot"
        assert (framework["kernel"], framework["bias"]) == ("glorot_uniform", "zeros")
        assert ours["batchnorm"]["momentum"] == pytest.approx(1 - framework["momentum"])  # torch's convention
        assert ours["batchnorm"]["eps"] == framework["epsilon"]
    assert FLAVOR_LAYER_DEFAULTS["keras"]["batchnorm"]["variance"] == "biased"
    tf1_bn = load_config(overrides=["defaults=tf1", "model.layers=[batchnorm]"]).model
    assert type(build_model(tf1_bn, (5, 6, 6), 10).bn1) is torch.nn.BatchNorm2d  # fused: unbiased, as torch
    assert type(build_model(tf1_bn, (7,), 10).bn1) is BiasedBatchNorm1d


def test_torch_batchnorm_moving_variance_is_not_keras():
    # torch's unbiased moving variance differs from Keras 3's: the test above can fail
    torch_bn = torch.nn.BatchNorm1d(3, momentum=0.01, eps=1e-3).train()
    ours = build_model(load_config(overrides=["defaults=keras", "model.layers=[batchnorm]"]).model, (3,), 10).bn1.train()
    x = torch.randn(4, 3)
    torch_bn(x), ours(x)
    assert not torch.allclose(torch_bn.running_var, ours.running_var, rtol=1e-4)


# ---------------------------------------------------------------- ZCA

@pytest.mark.parametrize("n", [400, 60])  # more images than dimensions (108), and fewer
def test_zca_matches_image_data_generator_fit(n):
    rng = np.random.default_rng(n)
    base = rng.integers(0, 256, size=(n, 1, 1, 1))
    images = np.clip(base + rng.integers(-40, 41, size=(n, 3, 6, 6)), 0, 255).astype(np.uint8)
    nhwc = images.transpose(0, 2, 3, 1).astype(np.float64)
    gen = legacy_image.ImageDataGenerator(zca_whitening=True, rescale=1 / 255, dtype="float64")
    gen.fit(nhwc)
    mean = gen.mean.reshape(-1).tolist()  # Keras centers per channel and, with ZCA, does not divide by std
    ours = zca_matrix(images, mean, [1.0] * 3, epsilon=gen.zca_epsilon)
    # Keras' matrix acts on (H, W, C)-flattened images, ours on (C, H, W): reorder before comparing
    order = np.arange(108).reshape(3, 6, 6).transpose(1, 2, 0).reshape(-1)  # NHWC position -> NCHW index
    theirs = np.empty_like(gen.zca_whitening_matrix)
    theirs[np.ix_(order, order)] = gen.zca_whitening_matrix
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
    held_out = np.clip(rng.integers(0, 256, size=(5, 3, 6, 6)), 0, 255).astype(np.uint8)
    x = (held_out / 255 - np.array(mean).reshape(1, 3, 1, 1)).reshape(5, -1)
    ours_white = x @ ours
    keras_white = gen.standardize(held_out.transpose(0, 2, 3, 1).astype(np.float64)).transpose(0, 3, 1, 2).reshape(5, -1)
    assert np.linalg.norm(ours_white - keras_white) / np.linalg.norm(keras_white) < 1e-4
