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
    ("train.epoch=3", "train.epoch: unknown key (allowed: epochs, batch_size"),
    ("optim.name=adamx", "optim.name: Input should be 'sgd', 'adam', 'adamw', 'adagrad', 'rmsprop', 'adadelta' or "
                         "'proximal-adagrad' (got 'adamx')"),
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
