import pytest

from cifarlab.config import config_from_dict, load_config, write_config
from cifarlab.yamlfiles import read_yaml
from cifarlab.errors import ConfigError


def test_defaults_then_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {epochs: 7, batch_size: 32}\noptim: {name: sgd, momentum: 0.9}\n")
    config = load_config(path, ["train.epochs=3", "optim.nesterov=true", "data.val_size=5000"])
    assert config.train.epochs == 3 and config.train.batch_size == 32
    assert config.optim.name == "sgd" and config.optim.nesterov is True
    assert config.data.val_size == 5000


def test_augment_preset_fills_its_keys_and_explicit_keys_win():
    config = load_config(overrides=["augment.preset=crop-flip", "augment.flip=false"])
    assert config.augment.crop == 4 and config.augment.flip is False


def test_resolved_config_round_trips(tmp_path):
    config = load_config(overrides=["model.preset=cnn3", "model.dropout=0.2", "augment.preset=crop-flip"])
    write_config(config, tmp_path / "config.yaml")
    again = config_from_dict(read_yaml(tmp_path / "config.yaml"))
    assert again == config
    assert again.model.params() == {"dropout": 0.2}


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "train.epoch: unknown key, did you mean train.epochs? (allowed: epochs, batch_size"),
    ("optim.name=adamx", "optim.name: Input should be 'sgd', 'adam', 'adamw', 'adagrad', 'rmsprop', 'adadelta', "
                         "'proximal-adagrad' or 'muon' (got 'adamx')"),
    ("model.dropuot=0.1", "model.dropuot: unknown key for preset cnn3-avg"),
    ("model.preset=resnet999", "no such preset"),
    ("model.batchnorm=maybe", "model.batchnorm='maybe': expected bool"),
    ("data.dataset=imagenet", "data.dataset: Input should be 'cifar10'"),
    ("train.epochs", "expected key.path=value"),
    ("optim.nesterov=true", "optim.nesterov=true needs optim.name=sgd"),
])
def test_bad_overrides_name_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert message in str(info.value)


def test_validation_monitor_needs_a_validation_split():
    with pytest.raises(ConfigError, match="needs data.val_size > 0"):
        load_config(overrides=["data.val_size=0"])
    assert load_config(overrides=["data.val_size=0", "train.early_stopping.monitor=train_loss"])


def test_bad_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: line"):
        load_config(path)


@pytest.mark.parametrize("override, suggested", [
    # Keras / TensorFlow names: the cifarlab key or value that does the same
    ("augment.horizontal_flip=true", "augment.horizontal_flip: unknown key, did you mean augment.flip? (allowed: "),
    ("augment.width_shift_range=0.1", "did you mean augment.width_shift?"),
    ("augment.channel_shift_range=20", "did you mean augment.channel_shift?"),
    ("augment.featurewise_center=true", "augment.featurewise_center: unknown key, did you mean data.normalize=center?"),
    ("data.samplewise_std_normalization=true", "did you mean data.samplewise=std?"),
    ("optim.learning_rate=0.1", "optim.learning_rate: unknown key, did you mean optim.lr?"),
    ("train.early_stopping.restore_best_weights=false", "did you mean train.early_stopping.restore_best?"),
    ("optim.name=gd", "optim.name: Input should be 'sgd', 'adam', 'adamw', 'adagrad', 'rmsprop', 'adadelta', "
                      "'proximal-adagrad' or 'muon' (got 'gd'), did you mean 'sgd'?"),
    ("optim.name=GradientDescentOptimizer", "(got 'GradientDescentOptimizer'), did you mean 'sgd'?"),
    ("optim.name=RMSprop", "(got 'RMSprop'), did you mean 'rmsprop'?"),
    ("schedule.name=ReduceLROnPlateau", "(got 'ReduceLROnPlateau'), did you mean 'plateau'?"),
    ("data.dataset=cifar-10", "(got 'cifar-10'), did you mean 'cifar10'?"),
    ("augment.crop_fill=replicate", "(got 'replicate'), did you mean 'edge'?"),
    # no framework name: the closest allowed one
    ("augment.fill_mode=wrapp", "(got 'wrapp'), did you mean 'wrap'?"),
    ("augment.zooom=0.1", "augment.zooom: unknown key, did you mean augment.zoom?"),
])
def test_refused_keras_names_suggest_the_cifarlab_name(override, suggested):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    message = str(info.value)
    assert suggested in message and "\n" not in message and info.value.exit_code == 2


def test_a_name_close_to_nothing_gets_no_suggestion():
    for override in ("optim.name=xyzzy", "augment.qqq=1"):
        with pytest.raises(ConfigError) as info:
            load_config(overrides=[override])
        assert "did you mean" not in str(info.value)


def test_suggested_framework_names_are_allowed():
    from cifarlab.config import Config
    from cifarlab.models.layers import LAYER_KINDS
    from cifarlab.validation import FRAMEWORK_KEYS, FRAMEWORK_VALUES, LAYER_NAMES

    for target in FRAMEWORK_KEYS.values():  # every suggested key exists, with its suggested value
        key, _, value = target.partition("=")
        model = Config
        for part in key.split("."):
            assert part in model.model_fields, target
            model = model.model_fields[part].annotation
        if value:
            load_config(overrides=[target])
    for key, names in FRAMEWORK_VALUES.items():
        for value in set(names.values()):
            load_config(overrides=[f"{key}={value}"])
    assert set(LAYER_NAMES.values()) <= set(LAYER_KINDS)


@pytest.mark.parametrize("override", ["data.normalize=center", "data.normalize=false", "data.samplewise=std",
                                      "augment.zoom=[0.8,1.3]", "augment.zoom=0.2", "augment.fill_mode=wrap",
                                      "augment.channel_shift=30"])
def test_keras_image_data_generator_keys_round_trip(override, tmp_path):
    config = load_config(overrides=[override])
    write_config(config, tmp_path / "config.yaml")
    assert config_from_dict(read_yaml(tmp_path / "config.yaml")) == config


@pytest.mark.parametrize("override, message", [
    ("augment.zoom=1.0", "augment.zoom: must be a number z in [0, 1)"),
    ("augment.zoom=[1.2,0.8]", "or a pair [lo, hi] with 0 < lo <= hi (Keras zoom_range)"),
    ("augment.zoom=[0,1]", "or a pair [lo, hi] with 0 < lo <= hi"),
    ("augment.zoom=[0.5,1,2]", "augment.zoom: must be"),
    ("augment.channel_shift=-1", "augment.channel_shift: Input should be greater than or equal to 0"),
    ("data.normalize=centre", "data.normalize: must be true, false or center"),
    ("data.samplewise=yes", "data.samplewise: Input should be 'none', 'center' or 'std'"),
])
def test_bad_image_data_generator_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert message in str(info.value) and "\n" not in str(info.value) and str(info.value).count(";") == 0


@pytest.mark.parametrize("item, message", [
    ("Conv2D", "unknown layer kind 'Conv2D', did you mean 'conv'? (known: conv, dense"),
    ("BatchNormalization", "unknown layer kind 'BatchNormalization', did you mean 'batchnorm'?"),
    ("MaxPooling2D", "did you mean 'maxpool'?"),
    ({"conv": {"filters": 8, "kernel_size": 5}}, "conv has no argument 'kernel_size', did you mean kernel? (allowed: "),
    ({"dropout": {"rate": 0.3}}, "dropout has no argument 'rate', did you mean p?"),
    ({"maxpool": {"pool_size": 2}}, "maxpool has no argument 'pool_size', did you mean size?"),
])
def test_keras_layer_names_suggest_the_layer_kind(item, message):
    from cifarlab.models.layers import parse_layer

    with pytest.raises(ConfigError) as info:
        parse_layer(item, "model.layers[0]")
    assert message in str(info.value)
