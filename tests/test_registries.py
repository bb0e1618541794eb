"""Every entry of every registry works: layer kinds, optimizers, schedules, augmentations, datasets.

Each test walks its registry, so a new entry is tested as soon as it is added; one that needs
arguments or config keys to be switched on must also get them in the tables below.
"""

import math

import pytest
import torch
from torch import nn

from cifarlab import config as config_module
from cifarlab.config import load_config
from cifarlab.data import sources
from cifarlab.data.augment import AUGMENTATIONS, Batch, build_augment
from cifarlab.data.downloads import ARCHIVES
from cifarlab.errors import ConfigError, DataError
from cifarlab.models.build import build_layers
from cifarlab.models.layers import LAYER_KINDS, parse_layer
from cifarlab.train.optim import OPTIMIZERS, make_optimizer
from cifarlab.train.schedules import SCHEDULES, LRSchedule

IMAGE = (3, 8, 8)

# Arguments for the kinds that cannot be built from their defaults alone.
LAYER_ARGS = {"conv": {"filters": 4}, "dense": {"units": 5}, "residual": {"layers": [{"conv": IMAGE[0]}, "relu"]},
              "scale": {"factor": 0.5}}
# The overrides that switch each augmentation on, alone.
AUGMENT_ON = {"crop": ["augment.crop=2"], "flip": ["augment.flip=true"], "vflip": ["augment.vflip=true"],
              "affine": ["augment.rotation=20"], "channel_shift": ["augment.channel_shift=40"],
              "color": ["augment.brightness=0.3", "augment.saturation=0.3"],
              "cutout": ["augment.cutout=3"], "erasing": ["augment.erasing=1.0"]}


def layer_item(kind):
    return {kind: LAYER_ARGS[kind]} if kind in LAYER_ARGS else kind


def input_shape(kind):
    """A flat input for the kinds that need one (the image flattened), else the image."""
    return (math.prod(IMAGE),) if LAYER_KINDS[kind].needs == "flat" else IMAGE


# ---------------------------------------------------------------- layer kinds


@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_every_layer_kind_builds_to_its_inferred_shape_and_backpropagates(kind):
    _, args = parse_layer(layer_item(kind), kind)
    shape = input_shape(kind)
    torch.manual_seed(0)
    module, out_shape = LAYER_KINDS[kind].build(args, shape, kind)
    x = torch.randn(4, *shape, requires_grad=True)
    y = module.train()(x)
    assert tuple(y.shape) == (4, *out_shape)
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_every_layer_kind_builds_in_a_network_under_its_name_prefix(kind):
    items = [layer_item(kind)]
    if LAYER_KINDS[kind].needs == "flat":
        items = ["flatten", *items]
    model = build_layers(items, IMAGE)
    prefix = LAYER_KINDS[kind].prefix or kind
    assert list(model._modules)[-1] == (prefix if prefix == "flatten" else f"{prefix}1")
    assert model.eval()(torch.rand(2, *IMAGE)).shape[0] == 2


@pytest.mark.parametrize("kind", [k for k, entry in LAYER_KINDS.items() if entry.needs != "any"])
def test_layer_kinds_refuse_the_input_they_cannot_take(kind):
    needs_image = LAYER_KINDS[kind].needs == "image"
    items = ["flatten", layer_item(kind)] if needs_image else [layer_item(kind)]
    message = "needs an image input" if needs_image else "needs a flat input"
    with pytest.raises(ConfigError, match=message):
        build_layers(items, IMAGE)


def test_unknown_layer_kind_lists_the_registry():
    with pytest.raises(ConfigError) as info:
        parse_layer("swish", "layer 0")
    assert f"known: {', '.join(LAYER_KINDS)})" in str(info.value)


# ---------------------------------------------------------------- optimizers


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_steps_and_changes_the_weights(name):
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = make_optimizer(load_config(overrides=[f"optim.name={name}", "optim.lr=0.01"]).optim, model)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    model(x).square().sum().backward()
    optimizer.step()
    for old, new in zip(before, model.parameters()):
        assert torch.isfinite(new).all()
        assert not torch.equal(old, new.detach())


def test_make_optimizer_refuses_an_unknown_name():
    c = load_config().optim.model_copy(update={"name": "lion"})  # model_copy skips validation, as a stale config would
    with pytest.raises(ConfigError, match="optim.name=lion: unknown optimizer") as info:
        make_optimizer(c, tiny_model())
    assert all(name in str(info.value) for name in OPTIMIZERS)


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("warmup", [0, 1])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_schedule_gives_finite_positive_factors(name, warmup):
    epochs, steps = 5, 4
    c = load_config(overrides=[f"schedule.name={name}", f"schedule.warmup_epochs={warmup}", "schedule.step_size=2",
                               "schedule.milestones=[1,3]", "schedule.patience=0", "optim.lr=0.1"]).schedule
    schedule = LRSchedule(c, 0.1, epochs, steps)
    record = {f"{split}_{metric}": 1.0 for split in ("train", "val", "test") for metric in ("acc", "loss")}
    factors = []
    for step in range(epochs * steps):
        factors.append(schedule.factor(step))
        if step % steps == steps - 1:
            schedule.epoch_end(record)
    assert all(math.isfinite(f) and f > 0 for f in factors), factors
    assert max(factors) <= 1.0 + 1e-12


def test_lr_schedule_refuses_an_unknown_name():
    c = load_config().schedule.model_copy(update={"name": "linear"})
    with pytest.raises(ConfigError, match="schedule.name=linear: unknown schedule"):
        LRSchedule(c, 0.1, 5, 4)


# ---------------------------------------------------------------- augmentations


def uint8_images(n=8):
    return torch.randint(0, 256, (n, *IMAGE), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_every_augmentation_alone_keeps_the_shape_and_range(name):
    c = load_config(overrides=AUGMENT_ON[name]).augment
    assert [n for n, step in AUGMENTATIONS.items() if step.enabled(c)] == [name]
    images = uint8_images()
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    out = build_augment(c, [0.5, 0.4, 0.3])(images, generator)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, images.float() / 255)
    assert not torch.equal(generator.get_state(), state)  # it drew its randomness from the generator


def test_augmentations_run_in_registry_order():
    c = load_config(overrides=[o for overrides in AUGMENT_ON.values() for o in overrides]).augment
    images = uint8_images()
    expected = images.float() / 255
    fill = torch.tensor([0.5, 0.4, 0.3])
    by_hand = torch.Generator().manual_seed(0)
    at = Batch(torch.arange(len(images)), 1, 0)  # where the images come from: indices, epoch, seed
    for step in AUGMENTATIONS.values():
        expected = step.apply(expected, c, by_hand, fill, at)
    out = build_augment(c, [0.5, 0.4, 0.3])(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, expected)


def test_no_augmentation_enabled_builds_none():
    assert build_augment(load_config().augment) is None


# ---------------------------------------------------------------- datasets


@pytest.mark.parametrize("name", list(sources.DATASETS))
def test_every_dataset_loads_with_its_shape_or_says_it_is_missing(name):
    entry = sources.DATASETS[name]
    try:
        dataset = sources.load_dataset(name)
    except DataError as e:
        assert entry.generate is None
        expected = f"{name}: reads only data.root" if entry.needs_root else f"{name}: not found in "
        assert str(e).startswith(expected)
        return
    assert dataset.name == name
    assert dataset.image_shape == entry.shape and len(dataset.classes) == entry.classes
    assert sources.SHAPES[name] == (entry.shape, entry.classes)


@pytest.mark.parametrize("name", list(sources.DATASETS))
def test_every_dataset_is_readable_from_a_folder_or_generated(name):
    entry = sources.DATASETS[name]
    assert (entry.generate is None) == (entry.read is not None)
    assert (entry.has_data is not None) == (entry.read is not None and not entry.needs_root)  # nothing to search for
    for key in (entry.archive, entry.binary_archive):
        assert key is None or key in ARCHIVES


def test_unknown_dataset_lists_the_registry():
    with pytest.raises(DataError, match="imagenet: unknown dataset") as info:
        sources.load_dataset("imagenet")
    assert all(name in str(info.value) for name in sources.DATASETS)


# ---------------------------------------------------------------- the config takes its names from the registries


@pytest.mark.parametrize("key, registry", [("data.dataset", sources.DATASETS), ("optim.name", OPTIMIZERS),
                                           ("schedule.name", SCHEDULES)])
def test_config_accepts_every_registry_name_and_lists_them_for_an_unknown_one(key, registry):
    section, field = key.split(".")
    for name in registry:
        assert getattr(getattr(load_config(overrides=[f"{key}={name}"]), section), field) == name
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[f"{key}=nosuchname"])
    message = str(info.value)
    assert message.startswith(f"config: {key}: Input should be ") and message.endswith("(got 'nosuchname')")
    assert all(repr(name) in message for name in registry)


def test_config_datasets_are_the_registry():
    assert config_module.DATASETS == tuple(sources.DATASETS)
