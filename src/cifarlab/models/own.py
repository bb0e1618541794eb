"""Your own network: any torch.nn.Module, named in a config (`model.module: "package.module:Factory"`
or `"path/to/file.py:Factory"` with `model.args`) or passed to `cifarlab.fit(model=...)`.

`model.module` is the one key of a config that imports code: the module it names, nothing else. The
factory (a class or a function) is called with `model.args` as keywords; a factory with exactly two
other required positional parameters is called as `factory(input_shape, num_classes, **args)`, any
other gets `input_shape` (C, H, W) and `num_classes` by name when its signature names them.

A model passed in Python is recorded by reference when it is a class or function that can be imported
again (from a package, or from a script guarded by `if __name__ == "__main__":`; not from a notebook or
a function body); anything else (an instance, a lambda) is recorded as `model.given`, and loading that
run needs the model passed again (`model=`).
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..errors import ConfigError, first_line
from .summary import device_of

Factory = Callable[..., nn.Module]
OwnModel = Union[nn.Module, Factory]


def split_reference(reference: str, key: str = "model.module") -> tuple[str, str]:
    """("package.module" or "/abs/file.py", "Attribute.path") of "module:Attribute"; a ValueError
    naming `key` when it is not of that form."""
    module, sep, attribute = str(reference).rpartition(":")
    if not sep or not module or not attribute or not all(part.isidentifier() for part in attribute.split(".")):
        raise ValueError(f"{key}={reference!r}: use 'package.module:Factory' or 'path/to/file.py:Factory'")
    if not module.endswith(".py") and not all(part.isidentifier() for part in module.split(".")):
        raise ValueError(f"{key}={reference!r}: {module!r} is neither a module name nor a .py file")
    return module, attribute


def absolute_reference(reference: str) -> str:
    """The reference with a .py file's path made absolute (from the current directory), so the run's
    config.yaml rebuilds the model from any directory."""
    module, attribute = split_reference(reference)
    return f"{Path(module).resolve()}:{attribute}" if module.endswith(".py") else reference


def import_factory(reference: str) -> Factory:
    """The class or function a reference names, imported now (a ConfigError, one line, when it cannot be)."""
    module_name, attribute = split_reference(reference)
    try:
        module = import_file(Path(module_name)) if module_name.endswith(".py") else import_module(module_name)
        found: Any = module
        for part in attribute.split("."):
            found = getattr(found, part)
    except ConfigError:
        raise
    except AttributeError as e:
        raise ConfigError(f"model.module={reference!r}: {module_name} has no {attribute!r} ({e})") from None
    except Exception as e:  # the user's module raised while importing: say so in one line
        raise ConfigError(f"model.module={reference!r}: importing {module_name} failed: "
                          f"{type(e).__name__}: {first_line(e)}") from None
    if not callable(found):
        raise ConfigError(f"model.module={reference!r}: {attribute} is a {type(found).__name__}, not a class or function")
    return found


def import_module(name: str):
    """A module from sys.path, or else from the current directory (as `python -m` would find it)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        top = name.split(".")[0]
        if e.name not in (name, top):  # the user's module imports something that is missing
            raise
        here = str(Path.cwd())
        if here in sys.path or not (Path(top).is_dir() or Path(f"{top}.py").is_file()):
            raise ConfigError(f"model.module: no module named {e.name!r} on sys.path or in the current "
                              "directory") from None
        sys.path.insert(0, here)
        return importlib.import_module(name)


def import_file(path: Path):
    """A .py file imported as a module of its own (named after the file and its folder, kept in
    sys.modules so its classes pickle and compare as the same classes)."""
    if not path.is_file():
        raise ConfigError(f"model.module: {path}: file not found")
    name = f"cifarlab_own_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    folder = str(path.resolve().parent)
    added = folder not in sys.path
    if added:  # its sibling files import as they do under `python file.py`
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        if added:
            sys.path.remove(folder)
        raise
    return module


def guarded_script(file: str) -> bool:
    """Whether importing a script again leaves its work undone: it has an `if __name__ == ...:` guard
    and no bare top-level call (such as `main()`) outside it."""
    try:
        tree = ast.parse(Path(file).read_text(errors="replace"))
    except (OSError, SyntaxError, ValueError):
        return False
    guarded = False
    for node in tree.body:
        if isinstance(node, ast.If):
            test = node.test
            guarded = guarded or (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
                                  and test.left.id == "__name__")
            if not guarded:
                return False
        elif isinstance(node, ast.Expr) and not isinstance(node.value, ast.Constant):
            return False  # a bare call at the top: the script does its work when imported
    return guarded


def make_module(factory: Factory, args: dict[str, Any], input_shape: tuple[int, int, int], classes: int,
                name: str) -> nn.Module:
    """Call a factory the way the module docstring says, and check what it returns."""
    kwargs = dict(args)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}

    def required() -> list[str]:
        return [p.name for p in params.values() if p.default is p.empty and p.name not in kwargs
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    positional = (tuple(input_shape), classes) if len(required()) == 2 else ()
    if not positional:
        for key, value in (("input_shape", tuple(input_shape)), ("num_classes", classes)):
            if key in params and key not in kwargs:
                kwargs[key] = value
    if required() and not positional:
        raise ConfigError(f"{name}: needs {', '.join(required())}; give {'it' if len(required()) == 1 else 'them'} "
                          "in model.args")
    try:
        model = factory(*positional, **kwargs)
    except TypeError as e:
        raise ConfigError(f"{name}: calling it failed: {first_line(e)} (check model.args)") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{name}: returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def check_output(model: nn.Module, input_shape: tuple[int, int, int], classes: int, name: str) -> None:
    """One forward pass of a zero image in eval mode: the model runs on this input shape and gives one
    logit per class (else a one-line ConfigError)."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()
            out = model(torch.zeros(2, *input_shape, device=device_of(model)))
    except Exception as e:
        raise ConfigError(f"{name}: a forward pass of images {tuple(input_shape)} failed: {type(e).__name__}: "
                          f"{first_line(e)}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{name}: outputs {shape} for 2 images of {tuple(input_shape)}; it must output "
                          f"(2, {classes}): one logit per class")


def build_own(model_config, input_shape: tuple[int, int, int], classes: int,
              given: Optional[OwnModel] = None) -> nn.Module:
    """The network of `model.module` (or `given`, passed in Python), checked against the class count."""
    if given is not None:
        name = f"model={describe(given)}"
        model = given if isinstance(given, nn.Module) else make_module(given, model_config.args, input_shape, classes,
                                                                        name)
    elif model_config.module:
        name = f"model.module={model_config.module!r}"
        model = make_module(import_factory(model_config.module), model_config.args, input_shape, classes, name)
    else:
        raise ConfigError(f"the run's model was passed in Python ({model_config.given}) and cannot be rebuilt from "
                          "its config: pass it again (cifarlab.load_run(run, model=...), cifarlab.resume(run, "
                          "model=...)), or train it from a .py file with model.module")
    check_output(model, input_shape, classes, name)
    return model


def describe(obj: Any) -> str:
    """"module.Qualname" of a class or function, or "an instance of module.Qualname"."""
    if isinstance(obj, nn.Module):
        return f"an instance of {type(obj).__module__}.{type(obj).__qualname__}"
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def reference_of(obj: Any) -> Optional[str]:
    """"module:Qualname" (or "/abs/file.py:Qualname") when `obj` is a class or function that importing
    that module gives back, so another process can rebuild the model. A script's own classes count when
    the script guards its work with `if __name__ == "__main__":` (importing it again must not rerun it).
    None for instances, lambdas, local classes and a notebook's classes."""
    if isinstance(obj, nn.Module) or not callable(obj):
        return None
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if not module or "<" in qualname or module not in sys.modules:
        return None
    found: Any = sys.modules[module]
    file = getattr(found, "__file__", None)
    try:
        for part in qualname.split("."):
            found = getattr(found, part)
    except AttributeError:
        return None
    if found is not obj:
        return None
    if module == "__main__" or module.startswith("cifarlab_own_"):  # a script, or a file import_file imported
        if not file or not file.endswith(".py") or not guarded_script(file):
            return None
        return f"{Path(file).resolve()}:{qualname}"
    return f"{module}:{qualname}"


def own_settings(given: OwnModel) -> dict[str, Any]:
    """The model section's keys that record a model passed in Python: {"module": reference} when it
    can be imported again, else {"given": what it is}."""
    reference = reference_of(given)
    return {"module": reference} if reference is not None else {"given": describe(given)}
