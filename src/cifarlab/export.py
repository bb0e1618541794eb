"""Export the weights a run tested (train.test_weights) for use outside cifarlab.

- onnx: one graph from NHWC images (uint8 in [0, 255], or float32 in [0, 1] with `input_dtype="float"`)
  to softmax probabilities, with the run's normalization, ZCA and (optionally) test-time
  augmentation (flip, flip-shift) inside; dynamic batch; class names, the resolved config, the input layout and the
  normalization in the model's metadata_props.
- safetensors: the model's state_dict, the ZCA matrix (if any) as one more tensor, and a JSON
  string in the file's metadata with everything `load_safetensors` needs to rebuild the model.
- torch: `torch.save` of a dict of plain data and tensors (state_dict, config, classes, input
  shape, normalization), loadable with `torch.load(..., weights_only=True)`; `load_torch` rebuilds it.

The optional packages (onnx, onnxscript, safetensors) come with `pip install "cifarlab[export]"`.
The export reads the run's config and its tested weights (best.pt or last.pt) only; the dataset does
not have to be present.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Optional, Union

import torch
import yaml
from torch import nn

from .config import TTA_MODES, Config, ModelConfig
from .errors import ConfigError, DataError
from .data.loader import samplewise_standardize
from .evaluation import tta_logits
from .files import atomic_write
from .models.build import build_model
from .models.own import OwnModel
from .optional import optional_modules
from .runs import LoadedRun, load_checkpoint, load_weights

FORMATS = {"onnx": ".onnx", "safetensors": ".safetensors", "torch": ".pt"}
INPUT_DTYPES = ("uint8", "float")
EXPORT_DIR = "export"
# The JSON in a safetensors file's metadata, and the "format" key of a torch export.
METADATA_KEY = "cifarlab"
FORMAT_NAME = "cifarlab-export"
FORMAT_VERSION = 1
# The ZCA matrix's tensor name in a safetensors file: not a state_dict key (module names have no '/').
ZCA_TENSOR = "cifarlab/zca"
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"

PathLike = Union[str, Path]


@dataclass
class ExportSource:
    """What an export needs of a run: its config, the tested weights' model (CPU, float32, eval mode,
    contiguous layout), class names, input shape (C, H, W), normalization and epoch."""

    path: Path
    config: Config
    model: nn.Module
    classes: list[str]
    input_shape: tuple[int, int, int]
    mean: list[float]
    std: list[float]
    zca: Optional[torch.Tensor]
    epoch: int
    tta: str
    samplewise: str = "none"  # data.samplewise: none, center or std

    def normalization(self, zca: Any) -> dict[str, Any]:
        """The normalization as metadata: `zca` is what stands for the matrix (a tensor name, a bool, the tensor)."""
        return {"mean": [float(m) for m in self.mean], "std": [float(s) for s in self.std], "zca": zca,
                "samplewise": self.samplewise, "formula": NORMALIZATION_FORMULA}


NORMALIZATION_FORMULA = ("x = pixels / 255 on (N, C, H, W); samplewise center: x -= each image's mean over C, H, W; "
                         "samplewise std: then x /= each image's std (ddof 0) + 1e-6; x = (x - mean) / std per channel; "
                         "with a ZCA matrix (D, D), D = C * H * W: x = (x.reshape(N, D) @ zca).reshape(N, C, H, W)")


def read_source(run_dir: PathLike, tta: Optional[str] = None, model: Optional[OwnModel] = None) -> ExportSource:
    """A run's config and tested weights (best.pt or last.pt), the model on the CPU (LoadedRun reads
    no data for this: the checkpoint holds the normalization). `tta`: "flip-shift" / "flip" / "none",
    or None for the run's own train.tta."""
    if tta is not None and tta not in TTA_MODES:
        raise ConfigError(f"--tta={tta}: use {' or '.join(TTA_MODES)}")
    loaded = LoadedRun(run_dir, device="cpu", model=model)
    stored = loaded.checkpoint["normalization"]
    zca = stored.get("zca")
    return ExportSource(loaded.path, loaded.config, loaded.model.to(memory_format=torch.contiguous_format),
                        [str(c) for c in loaded.classes], tuple(int(n) for n in loaded.input_shape),
                        list(stored["mean"]), list(stored["std"]),
                        zca.float().contiguous() if zca is not None else None, int(loaded.checkpoint["epoch"]),
                        tta if tta is not None else (loaded.config.train.tta or "none"), stored.get("samplewise", "none"))


def default_output(run_dir: Path, format: str) -> Path:
    """RUN/export/model.onnx (.safetensors, .pt)."""
    return run_dir / EXPORT_DIR / f"model{FORMATS[format]}"


def export_run(run_dir: PathLike, format: str, output: Optional[PathLike] = None, tta: Optional[str] = None,
               input_dtype: str = "uint8", model: Optional[OwnModel] = None) -> Path:
    """Export the tested weights of a run to `format` (onnx, safetensors, torch) at `output`
    (default RUN/export/model.<ext>); returns the path written.

    `tta`: "flip" bakes the average of the logits of each image and its mirror into the ONNX graph,
    "flip-shift" that of its six views (evaluation.tta_views), "none" leaves it out; None follows
    the run's train.tta (recorded in the metadata of every format).
    `input_dtype` (onnx only): "uint8" (pixels 0..255) or "float" (float32 in [0, 1]), NHWC either way.
    `model`: your own network, for a run that recorded it as model.given (default: a Run's own).
    """
    if format not in FORMATS:
        raise ConfigError(f"--format={format}: use one of {', '.join(FORMATS)}")
    if input_dtype not in INPUT_DTYPES:
        raise ConfigError(f"--input={input_dtype}: use {' or '.join(INPUT_DTYPES)}")
    if input_dtype != "uint8" and format != "onnx":
        raise ConfigError(f"--input={input_dtype} applies to --format onnx only")
    # Check for the optional packages before any work.
    needed = ("onnx", "onnxscript") if format == "onnx" else ("safetensors",) if format == "safetensors" else ()
    modules = optional_modules({name: name for name in needed}, f"--format {format}", "export")
    source = read_source(run_dir, tta, model)
    path = Path(output) if output is not None else default_output(source.path, format)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{path.parent}: cannot create the folder ({e.strerror or e})") from None
    if format == "onnx":
        content = onnx_bytes(source, input_dtype, modules["onnx"])
    elif format == "safetensors":
        content = safetensors_bytes(source)
    else:
        content = torch_bytes(source)
    return atomic_write(path, content)


# ---------------------------------------------------------------- optional packages


# ---------------------------------------------------------------- onnx


class ExportedModel(nn.Module):
    """NHWC images -> softmax probabilities (N, classes): the run's normalization and ZCA, the
    model, and the test-time augmentation `tta` (evaluation.tta_views), computed as `Run.predict` computes them."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], zca: Optional[torch.Tensor],
                 tta: str, input_dtype: str = "uint8", samplewise: str = "none"):
        super().__init__()
        self.model = model
        self.tta = tta
        self.samplewise = samplewise
        self.pixels = input_dtype != "float"
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        # As DeviceLoader.normalize: x * scale + shift, scale = 1 / (255 std) for pixels, 1 / std for [0, 1].
        scale = 1.0 / (255.0 * std_t)
        self.register_buffer("scale", scale * 255.0 if input_dtype == "float" else scale)
        self.register_buffer("shift", -mean_t / std_t)
        self.register_buffer("zca", zca)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        if self.samplewise != "none":  # as DeviceLoader.normalize: per image first, in [0, 1] units
            x = samplewise_standardize(x / 255 if self.pixels else x, self.samplewise == "std")
            x = x * 255 if self.pixels else x
        x = x * self.scale + self.shift
        if self.zca is not None:
            x = (x.reshape(x.shape[0], -1) @ self.zca).reshape(x.shape)
        return torch.softmax(tta_logits(self.model, x, self.tta), dim=1)


def export_module(source: ExportSource, input_dtype: str = "uint8") -> ExportedModel:
    """The wrapper the ONNX graph is traced from (a copy of the model; the run's is left alone)."""
    model = copy.deepcopy(source.model).float().to(memory_format=torch.contiguous_format).eval()
    return ExportedModel(model, source.mean, source.std, source.zca, source.tta, input_dtype, source.samplewise).eval()


def onnx_metadata(source: ExportSource, input_dtype: str) -> dict[str, str]:
    """The ONNX model's metadata_props: strings, JSON where structured."""
    channels, height, width = source.input_shape
    return {
        "format": f"{FORMAT_NAME} {FORMAT_VERSION}",
        "classes": json.dumps(source.classes),
        "input": json.dumps({"name": INPUT_NAME, "layout": "NHWC", "shape": ["batch", height, width, channels],
                             "dtype": "uint8" if input_dtype == "uint8" else "float32",
                             "range": [0, 255] if input_dtype == "uint8" else [0.0, 1.0]}),
        "output": json.dumps({"name": OUTPUT_NAME, "shape": ["batch", len(source.classes)],
                              "meaning": "softmax probabilities, in the order of classes"}),
        "normalization": json.dumps(source.normalization(source.zca is not None)),
        "tta": source.tta,
        "config": yaml.safe_dump(source.config.to_dict(), sort_keys=False),
        "run": source.path.name,
        "epoch": str(source.epoch),
    }


@contextmanager
def quiet_exporter() -> Iterator[None]:
    """torch.onnx's exporter logs (missing torchvision ops) and warns about internals; an export
    command should print only its result."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def onnx_bytes(source: ExportSource, input_dtype: str, onnx: ModuleType) -> bytes:
    """The serialized ONNX model: exported with torch.onnx's torch.export-based exporter
    (dynamo=True), the batch dimension dynamic, metadata added, checked with onnx.checker."""
    wrapper = export_module(source, input_dtype)
    channels, height, width = source.input_shape
    # A batch of 2: torch.export specializes sizes 0 and 1, and the batch must stay symbolic.
    example = (torch.zeros(2, height, width, channels, dtype=torch.uint8) if input_dtype == "uint8"
               else torch.zeros(2, height, width, channels, dtype=torch.float32))
    with quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(wrapper, (example,), dynamo=True, verbose=False, external_data=False,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
    proto = program.model_proto
    onnx.helper.set_model_props(proto, onnx_metadata(source, input_dtype))
    proto.doc_string = (f"cifarlab export of {source.path.name} (the weights of epoch {source.epoch}): "
                        f"{INPUT_NAME} (batch, {height}, {width}, {channels}) "
                        f"{'uint8 0..255' if input_dtype == 'uint8' else 'float32 in [0, 1]'} NHWC -> "
                        f"{OUTPUT_NAME} (batch, {len(source.classes)}); see metadata_props")
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


# ---------------------------------------------------------------- safetensors and torch


def rebuild_info(source: ExportSource, zca: Any) -> dict[str, Any]:
    """Everything needed to rebuild and feed the model, as plain data (`zca`: what stands for the matrix)."""
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "run": source.path.name, "epoch": source.epoch,
            "config": source.config.to_dict(), "input_shape": list(source.input_shape), "classes": source.classes,
            "input_layout": "NCHW", "normalization": source.normalization(zca), "tta": source.tta,
            "output": "logits (apply softmax for probabilities)"}


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict as contiguous CPU tensors (safetensors stores no strides)."""
    return {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}


def safetensors_bytes(source: ExportSource) -> bytes:
    """The state_dict (plus the ZCA matrix under ZCA_TENSOR) and the rebuild JSON as metadata."""
    from safetensors.torch import save

    tensors = state_tensors(source.model)
    if source.zca is not None:
        tensors[ZCA_TENSOR] = source.zca.contiguous()
    info = rebuild_info(source, ZCA_TENSOR if source.zca is not None else None)
    return save(tensors, metadata={METADATA_KEY: json.dumps(info)})


def torch_bytes(source: ExportSource) -> bytes:
    """A torch.save of plain data and tensors only, so weights_only=True loads it."""
    info = rebuild_info(source, source.zca)
    info["model"] = state_tensors(source.model)
    buffer = io.BytesIO()
    torch.save(info, buffer)
    return buffer.getvalue()


def rebuild_model(info: dict[str, Any], state: dict[str, torch.Tensor], source: PathLike,
                  given: Optional[OwnModel] = None) -> nn.Module:
    """The network an export's info describes, with its weights, on the CPU in eval mode."""
    try:
        model_config = ModelConfig.model_validate(info["config"]["model"])
        input_shape = tuple(int(n) for n in info["input_shape"])
        classes = len(info["classes"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{source}: not a cifarlab export ({type(e).__name__}: {e})") from None
    model = build_model(model_config, input_shape, classes, given)
    load_weights(model, state, Path(source))
    return model.eval()


def read_safetensors(path: PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A safetensors export's info (normalization["zca"]: the matrix or None) and its model tensors."""
    optional_modules({"safetensors": "safetensors"}, "reading a safetensors export", "export")
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a safetensors file ({e})") from None
    try:
        info = json.loads(metadata[METADATA_KEY])
        if info.get("format") != FORMAT_NAME:
            raise ValueError(f"format {info.get('format')!r}")
    except (KeyError, ValueError, AttributeError) as e:
        raise DataError(f"{path}: not a cifarlab export (no {METADATA_KEY!r} metadata: {e})") from None
    zca_key = info["normalization"].get("zca")
    info["normalization"]["zca"] = tensors.pop(zca_key) if zca_key else None
    return info, tensors


def load_safetensors(path: PathLike, model: Optional[OwnModel] = None) -> nn.Module:
    """Rebuild the model of a safetensors export (CPU, eval mode). It takes normalized NCHW float
    input and returns logits; `read_safetensors(path)[0]["normalization"]` says how to normalize."""
    info, tensors = read_safetensors(path)
    return rebuild_model(info, tensors, path, model)


def load_torch(path: PathLike, model: Optional[OwnModel] = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a torch export (weights_only load) and return it with the export's info."""
    info = load_checkpoint(Path(path), "cpu")
    if info.get("format") != FORMAT_NAME or "model" not in info:
        raise DataError(f"{path}: not a cifarlab export")
    return rebuild_model(info, info.pop("model"), path, model), info
