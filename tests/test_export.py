"""`cifarlab export`: the ONNX graph (run with onnxruntime) gives the probabilities `Run.predict` gives;
safetensors and torch exports rebuild the same model."""

import json
import sys

import numpy as np
import pytest
import torch
import yaml

import cifarlab
from cifarlab.errors import ConfigError, DataError
from cifarlab.evaluation import predict_logits
from cifarlab.export import export_run, load_safetensors, load_torch, read_safetensors, read_source
from conftest import copy_run
from helpers import invoke

ATOL = 1e-5


def train(root, out, name, **settings):
    config = {"name": name, "data": {"root": str(root), "train_limit": 300, "test_limit": 64},
              "model": {"preset": "cnn3"}, "train": {"epochs": 1, "out_dir": str(out)}, "analysis": {"report": False}}
    for key, value in settings.items():
        section, field = key.split("__")
        config[section][field] = value
    return cifarlab.fit(config, progress=False)


@pytest.fixture(scope="module")
def runs(cifar10_head, small_run, zca_run, tmp_path_factory):
    """Three tiny real runs: plain (a copy of conftest's small_run), flip test-time augmentation, and
    ZCA whitening with flip (a copy of conftest's zca_run). Exports without -o write into the run."""
    out = tmp_path_factory.mktemp("runs")
    return {"plain": cifarlab.load_run(copy_run(small_run, out / "plain")),
            "flip": train(cifar10_head, out / "flip", "flip", train__tta="flip"),
            "zca": cifarlab.load_run(copy_run(zca_run, out / "zca"))}


def run_images(run, count=64):
    """uint8 (N, C, H, W) test images of the run's own test split."""
    images = run.loaded.split("test")[0][:count]
    assert images.dtype == np.uint8 and len(images) == count
    return images


def nhwc(images):
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1))


def session(path):
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def needs_onnx():
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)


@pytest.fixture(scope="module")
def plain_onnx(runs, tmp_path_factory):
    """The plain run exported through the command line."""
    needs_onnx()
    path = tmp_path_factory.mktemp("export") / "plain.onnx"
    result = invoke("export", runs["plain"].path, "--format", "onnx", "-o", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {path}"
    return path


def test_onnx_matches_predict_on_test_images(runs, plain_onnx):
    run = runs["plain"]
    images = run_images(run)
    graph = session(plain_onnx)
    (graph_input,), (graph_output,) = graph.get_inputs(), graph.get_outputs()
    assert graph_input.name == "images" and graph_input.type == "tensor(uint8)"
    assert graph_input.shape[1:] == [32, 32, 3] and not isinstance(graph_input.shape[0], int)
    assert graph_output.name == "probabilities" and graph_output.shape[1:] == [10]
    probabilities = graph.run(None, {"images": nhwc(images)})[0]
    expected = run.predict(images)
    assert probabilities.shape == expected.shape == (64, 10)
    np.testing.assert_allclose(probabilities, expected, rtol=0, atol=ATOL)
    np.testing.assert_allclose(probabilities.sum(1), 1, atol=1e-5)
    # the comparison can fail: the same images without the run's normalization give other probabilities
    unnormalized = graph.run(None, {"images": nhwc(np.full_like(images, 128))})[0]
    assert np.abs(unnormalized - expected).max() > 1e-3


def test_onnx_batch_is_dynamic(runs, plain_onnx):
    run = runs["plain"]
    images = nhwc(run_images(run))
    graph = session(plain_onnx)
    one = graph.run(None, {"images": images[:1]})[0]
    some = graph.run(None, {"images": images[:7]})[0]
    many = graph.run(None, {"images": images})[0]
    assert one.shape == (1, 10) and some.shape == (7, 10) and many.shape == (64, 10)
    np.testing.assert_allclose(one[0], many[0], rtol=0, atol=ATOL)
    np.testing.assert_allclose(some, many[:7], rtol=0, atol=ATOL)


def test_onnx_metadata_has_classes_config_and_layout(runs, plain_onnx):
    onnx = pytest.importorskip("onnx")
    run = runs["plain"]
    model = onnx.load(str(plain_onnx))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["classes"]) == run.classes
    assert json.loads(meta["classes"])[:3] == ["airplane", "automobile", "bird"]
    assert yaml.safe_load(meta["config"]) == run.loaded.config.to_dict()
    layout = json.loads(meta["input"])
    assert layout["layout"] == "NHWC" and layout["dtype"] == "uint8" and layout["shape"][1:] == [32, 32, 3]
    normalization = json.loads(meta["normalization"])
    assert normalization["mean"] == pytest.approx(run.loaded.splits.mean) and normalization["zca"] is False
    assert meta["tta"] == "none"
    # the same metadata as onnxruntime reads it
    assert json.loads(session(plain_onnx).get_modelmeta().custom_metadata_map["classes"]) == run.classes


def test_onnx_with_flip_tta_matches_predict(runs, tmp_path):
    needs_onnx()
    run = runs["flip"]
    assert run.loaded.config.train.tta == "flip"
    images = run_images(run)
    expected = run.predict(images)
    baked = export_run(run.path, "onnx", tmp_path / "flip.onnx")  # the run's own tta: flip
    assert baked == tmp_path / "flip.onnx"
    probabilities = session(baked).run(None, {"images": nhwc(images)})[0]
    np.testing.assert_allclose(probabilities, expected, rtol=0, atol=ATOL)
    # --tta none leaves the mirror out: different probabilities, so the check above means something
    without = session(export_run(run.path, "onnx", tmp_path / "noflip.onnx", tta="none"))
    assert np.abs(without.run(None, {"images": nhwc(images)})[0] - expected).max() > 1e-4
    # --tta flip on a run trained without it: the flip average of that run's logits
    plain = runs["plain"]
    flipped = session(export_run(plain.path, "onnx", tmp_path / "plain-flip.onnx", tta="flip"))
    x = plain.loaded.normalize(torch.from_numpy(run_images(plain)))
    with torch.no_grad():
        reference = torch.softmax((plain.model()(x) + plain.model()(x.flip(3))) / 2, dim=1).numpy()
    np.testing.assert_allclose(flipped.run(None, {"images": nhwc(run_images(plain))})[0], reference, rtol=0, atol=ATOL)


def test_onnx_with_flip_shift_tta_averages_six_views(runs, tmp_path):
    needs_onnx()
    plain = runs["plain"]
    images = run_images(plain)
    x = plain.loaded.normalize(torch.from_numpy(images))
    # the six views written out here: the image and its mirror, each also moved 2 pixels down-right
    # and 2 up-left with the edges reflected
    mirrored = x.flip(3)
    padded = [torch.nn.functional.pad(v, (2, 2, 2, 2), mode="reflect") for v in (x, mirrored)]
    views = [x, mirrored, *[p[:, :, :32, :32] for p in padded], *[p[:, :, 4:, 4:] for p in padded]]
    assert torch.equal(views[2][:, :, 2:, 2:], x[:, :, :-2, :-2]) and torch.equal(views[4][:, :, :-2, :-2], x[:, :, 2:, 2:])
    with torch.no_grad():
        reference = torch.softmax(sum(plain.model()(v) for v in views) / 6, dim=1).numpy()
    baked = session(export_run(plain.path, "onnx", tmp_path / "shift.onnx", tta="flip-shift"))
    np.testing.assert_allclose(baked.run(None, {"images": nhwc(images)})[0], reference, rtol=0, atol=ATOL)
    # and what the run itself predicts with train.tta=flip-shift (eval, predict and training's scores)
    with torch.no_grad():
        ours = torch.softmax(predict_logits(plain.model(), x, plain.loaded.config.train.precision, "flip-shift"),
                             dim=1).numpy()
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5)


def test_onnx_with_zca_matches_predict(runs, tmp_path):
    needs_onnx()
    run = runs["zca"]
    assert run.loaded.splits.whiten is not None and run.loaded.splits.whiten.shape == (3072, 3072)
    images = run_images(run)
    path = export_run(run.path, "onnx")
    assert path == run.path / "export" / "model.onnx"
    graph = session(path)
    np.testing.assert_allclose(graph.run(None, {"images": nhwc(images)})[0], run.predict(images), rtol=0, atol=ATOL)
    assert json.loads(graph.get_modelmeta().custom_metadata_map["normalization"])["zca"] is True


def test_onnx_float_input(runs, tmp_path):
    needs_onnx()
    run = runs["zca"]
    images = run_images(run)
    graph = session(export_run(run.path, "onnx", tmp_path / "float.onnx", input_dtype="float"))
    assert graph.get_inputs()[0].type == "tensor(float)"
    scaled = images.astype(np.float32) / 255
    probabilities = graph.run(None, {"images": nhwc(scaled)})[0]
    np.testing.assert_allclose(probabilities, run.predict(scaled), rtol=0, atol=ATOL)
    np.testing.assert_allclose(probabilities, run.predict(images), rtol=0, atol=ATOL)


def test_safetensors_round_trip_gives_identical_outputs(runs, tmp_path):
    pytest.importorskip("safetensors")
    for name in ("plain", "zca"):
        run = runs[name]
        result = invoke("export", run.path, "--format", "safetensors")
        assert result.returncode == 0, result.stderr
        path = run.path / "export" / "model.safetensors"
        assert result.stdout.strip() == f"wrote {path}"
        rebuilt = load_safetensors(path)
        reference = read_source(run.path).model
        assert not rebuilt.training
        for key, value in reference.state_dict().items():
            assert torch.equal(rebuilt.state_dict()[key], value), key
        images = run_images(run)
        x = run.loaded.normalize(torch.from_numpy(images)).contiguous()
        with torch.no_grad():
            assert torch.equal(rebuilt(x), reference(x))
        # the metadata alone is enough to normalize as predict does
        info, tensors = read_safetensors(path)
        assert info["classes"] == run.classes and info["input_shape"] == [3, 32, 32]
        assert info["tta"] == ("flip" if name == "zca" else "none")
        assert set(tensors) == set(reference.state_dict())
        norm = info["normalization"]
        mean, std = (torch.tensor(norm[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
        manual = (torch.from_numpy(images).float() / 255 - mean) / std
        if name == "zca":
            assert torch.equal(norm["zca"], run.loaded.splits.whiten.cpu())
            manual = (manual.reshape(len(manual), -1) @ norm["zca"]).reshape(manual.shape)
        else:
            assert norm["zca"] is None
        with torch.no_grad():
            logits = rebuilt(manual)
            if info["tta"] == "flip":
                logits = (logits + rebuilt(manual.flip(3))) / 2
        np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), run.predict(images), rtol=0, atol=ATOL)


def test_torch_export_loads_with_weights_only(runs, tmp_path):
    run = runs["zca"]
    path = export_run(run.path, "torch", tmp_path / "model.pt")
    state = torch.load(path, weights_only=True)
    assert state["classes"] == run.classes and state["input_shape"] == [3, 32, 32]
    assert state["config"] == run.loaded.config.to_dict()
    assert torch.equal(state["normalization"]["zca"], run.loaded.splits.whiten.cpu())
    model, info = load_torch(path)
    reference = read_source(run.path).model
    x = run.loaded.normalize(torch.from_numpy(run_images(run))).contiguous()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert info["tta"] == "flip"


def test_missing_packages_name_the_extra(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors now raises ImportError
    with pytest.raises(ConfigError, match=r'safetensors.*pip install "cifarlab\[export\]"'):
        export_run(runs["plain"].path, "safetensors", tmp_path / "x.safetensors")
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ConfigError, match=r'onnxscript.*pip install "cifarlab\[export\]"'):
        export_run(runs["plain"].path, "onnx", tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())


def test_bad_arguments_are_one_line_errors(runs, tmp_path):
    result = invoke("export", runs["plain"].path, "--format", "tflite")
    assert result.returncode == 2 and result.stderr.strip() == "error: --format=tflite: use one of onnx, safetensors, torch"
    result = invoke("export", runs["plain"].path, "--format", "onnx", "--tta", "rotate")
    assert result.returncode == 2 and "--tta=rotate" in result.stderr and "Traceback" not in result.stderr
    result = invoke("export", tmp_path, "--format", "torch")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    with pytest.raises(DataError):
        load_torch(tmp_path / "missing.pt")


@pytest.mark.parametrize("input_dtype", ["uint8", "float"])
@pytest.mark.parametrize("samplewise", ["center", "std"])
def test_exported_model_standardizes_each_image_as_the_loader_does(samplewise, input_dtype):
    # data.samplewise (Keras samplewise_center / samplewise_std_normalization) is inside the exported graph
    from cifarlab.data.loader import DeviceLoader
    from cifarlab.export import ExportedModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5)).eval()
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    pixels = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    loader = DeviceLoader(pixels, torch.zeros(6, dtype=torch.long), 6, mean, std, channels_last=False,
                          samplewise=samplewise)
    with torch.no_grad():
        expected = torch.softmax(model(loader.normalize(pixels)), dim=1)
        images = pixels.permute(0, 2, 3, 1)
        exported = ExportedModel(model, mean, std, None, "none", input_dtype, samplewise)
        got = exported(images if input_dtype == "uint8" else images.float() / 255)
        plain = ExportedModel(model, mean, std, None, "none", input_dtype)(images if input_dtype == "uint8"
                                                                          else images.float() / 255)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (plain - expected).abs().max() > 1e-3  # without it, other probabilities
