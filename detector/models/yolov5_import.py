"""Import of YOLOv5's own checkpoints (``yolov5s.pt`` release files and its training ``last.pt``/``best.pt``).

Those files are torch zip pickles whose ``model``/``ema`` entries are pickled YOLOv5 module objects
(``models.yolo.Model`` holding ``models.common.Conv``...), which a normal ``torch.load`` can only read by importing
YOLOv5's code and running whatever the pickle names. Here a restricted unpickler reads them instead:

- it never imports YOLOv5 code: each YOLOv5 (and torch.nn) module class on an allow-list becomes an inert
  :class:`StandIn` that only records the state the pickle gives it (parameters, buffers, child modules, attributes);
- every other global must be on a short allow-list of harmless constructors (tensor rebuild helpers,
  ``collections.OrderedDict``, ``set``, NumPy scalars/arrays, ...); anything else (``os.system``,
  ``builtins.eval``, ``subprocess.Popen``...) stops the load with a CheckpointError naming the file and the global,
  before anything it names is called.

Our model is then rebuilt from the YAML dict embedded in the checkpoint (``model.yaml``) and its weights copied by
name from the stand-in module tree (our blocks use YOLOv5's submodule names), converted from fp16 to fp32.
"""

from __future__ import annotations

import logging
import pickle
import types
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from detector.errors import CheckpointError, ConfigError
from detector.models.yolo import DetectionModel

LOGGER = logging.getLogger(__name__)


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


# YOLOv5 module classes that may appear in its checkpoints (models/common.py, models/yolo.py, models/experimental.py).
# They are never imported: each becomes a StandIn recording its pickled state.
_YOLOV5_CLASSES = {
    "models.common": _names(
        "Conv DWConv DWConvTranspose2d TransformerLayer TransformerBlock Bottleneck BottleneckCSP CrossConv C3 C3x "
        "C3TR C3SPP C3Ghost SPP SPPF Focus GhostConv GhostBottleneck Contract Expand Concat Proto Classify AutoShape "
        "DetectMultiBackend Detections"
    ),
    "models.yolo": _names("Model DetectionModel BaseModel Detect Segment SegmentationModel ClassificationModel"),
    "models.experimental": _names("CrossConv Sum MixConv2d Ensemble"),
}

# torch.nn module classes used by YOLOv5 models; also StandIns (nothing of torch.nn is instantiated from the pickle).
_TORCH_NN_CLASSES = {
    "torch.nn.modules.conv": _names("Conv2d ConvTranspose2d"),
    "torch.nn.modules.batchnorm": _names("BatchNorm2d SyncBatchNorm"),
    "torch.nn.modules.activation": _names(
        "SiLU ReLU ReLU6 LeakyReLU Hardswish Sigmoid Tanh Mish GELU MultiheadAttention"
    ),
    "torch.nn.modules.linear": _names("Linear Identity NonDynamicallyQuantizableLinear"),
    "torch.nn.modules.container": _names("Sequential ModuleList ModuleDict"),
    "torch.nn.modules.pooling": _names("MaxPool2d AvgPool2d AdaptiveAvgPool2d"),
    "torch.nn.modules.upsampling": _names("Upsample"),
    "torch.nn.modules.dropout": _names("Dropout"),
    "torch.nn.modules.flatten": _names("Flatten"),
    "argparse": _names("Namespace"),  # YOLOv5 training checkpoints may hold their options as a Namespace
}

_TORCH_DTYPES = _names(
    "float16 float32 float64 bfloat16 half float double int8 int16 int32 int64 uint8 bool long int short"
)

# Real functions and classes the pickle may call: each only builds data (tensors, containers, NumPy values).
_ALLOWED_CALLABLES: dict[tuple[str, str], Any] = {}


def _allowed_callables() -> dict[tuple[str, str], Any]:
    if _ALLOWED_CALLABLES:
        return _ALLOWED_CALLABLES
    import _codecs
    import collections
    import pathlib

    import numpy as np

    table: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
        ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch", "Tensor"): torch.Tensor,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("__builtin__", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("__builtin__", "frozenset"): frozenset,
        ("builtins", "slice"): slice,
        ("_codecs", "encode"): _codecs.encode,  # NumPy scalars pickled by Python 3 store their bytes through it
        ("numpy", "dtype"): np.dtype,
        ("numpy", "ndarray"): np.ndarray,
        ("pathlib", "PosixPath"): pathlib.PurePosixPath,  # path-valued options: kept as inert pure paths
        ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
        ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
        ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
    }
    for name in _TORCH_DTYPES:
        table[("torch", name)] = getattr(torch, name)
    for numpy_core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(numpy_core, "scalar")] = _numpy_scalar
        table[(numpy_core, "_reconstruct")] = _numpy_reconstruct
    _ALLOWED_CALLABLES.update(table)
    return _ALLOWED_CALLABLES


def _numpy_scalar(*args: Any) -> Any:
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return core.multiarray.scalar(*args)


def _numpy_reconstruct(*args: Any) -> Any:
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return core.multiarray._reconstruct(*args)


class StandIn:
    """An inert record of a pickled object of an allowed class: ``qualified_name`` and the pickled ``state`` dict.

    It has no behaviour: creating it or giving it state runs none of the original class's code.
    """

    qualified_name: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> StandIn:
        obj = super().__new__(cls)
        obj.args = args
        obj.state = {}
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # called by pickle's REDUCE; the state comes later
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.state = state if isinstance(state, dict) else {"__state__": state}

    def __repr__(self) -> str:
        return f"StandIn({self.qualified_name})"


_STAND_IN_TYPES: dict[str, type[StandIn]] = {}


def _stand_in_type(module: str, name: str) -> type[StandIn]:
    qualified = f"{module}.{name}"
    if qualified not in _STAND_IN_TYPES:
        _STAND_IN_TYPES[qualified] = type(name, (StandIn,), {"qualified_name": qualified})
    return _STAND_IN_TYPES[qualified]


class RefusedGlobalError(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list; nothing it names has been called."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"refused to load global {module}.{name}")
        self.global_name = f"{module}.{name}"


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves globals only from the allow-lists above (YOLOv5/torch.nn classes -> StandIns)."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _YOLOV5_CLASSES.get(module, ()) or name in _TORCH_NN_CLASSES.get(module, ()):
            return _stand_in_type(module, name)
        allowed = _allowed_callables()
        if (module, name) in allowed:
            return allowed[(module, name)]
        if module == "torch" and name.endswith("Storage"):  # typed storages (torch maps most of these itself)
            return getattr(torch, name)
        if module == "numpy.dtypes" and name.endswith("DType"):  # NumPy 2 pickles dtypes by their class
            import numpy as np

            return getattr(np.dtypes, name)
        raise RefusedGlobalError(module, name)


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


# torch.load(pickle_module=...) needs a module-like object with Unpickler and load.
restricted_pickle = types.SimpleNamespace(
    __name__="detector_restricted_pickle", Unpickler=RestrictedUnpickler, load=_restricted_load
)


def read_yolov5_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict of a YOLOv5 ``.pt`` file, module objects as StandIns; refuses unknown globals."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", pickle_module=restricted_pickle, weights_only=False)
    except RefusedGlobalError as e:
        raise CheckpointError(
            f"{path}: refused to load: the pickle names {e.global_name}, which is not on the allow-list of "
            "YOLOv5 checkpoint contents (nothing was executed)"
        ) from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch/YOLOv5 checkpoint ({first_line})") from e
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, found {type(checkpoint).__name__}")
    return checkpoint


def is_yolov5_model(obj: Any) -> bool:
    """Whether ``obj`` is a stand-in of a YOLOv5 detection model (``Model``/``DetectionModel``)."""
    return isinstance(obj, StandIn) and obj.qualified_name in ("models.yolo.Model", "models.yolo.DetectionModel")


def stand_in_state_dict(root: StandIn) -> dict[str, Tensor]:
    """Walk a stand-in module tree like ``nn.Module.state_dict``: parameters, persistent buffers, then children."""
    state_dict: dict[str, Tensor] = {}

    def walk(module: StandIn, prefix: str) -> None:
        state = module.state
        for name, parameter in (state.get("_parameters") or {}).items():
            if parameter is not None:
                state_dict[prefix + name] = parameter
        non_persistent = state.get("_non_persistent_buffers_set") or set()
        for name, buffer in (state.get("_buffers") or {}).items():
            if buffer is not None and name not in non_persistent:
                state_dict[prefix + name] = buffer
        for name, child in (state.get("_modules") or {}).items():
            if isinstance(child, StandIn):
                walk(child, f"{prefix}{name}.")

    walk(root, "")
    return state_dict


def _stand_in_modules(root: StandIn, prefix: str = "") -> list[tuple[str, StandIn]]:
    """(dotted name, stand-in) of every module in the tree, parents first (like ``nn.Module.named_modules``)."""
    found = [(prefix, root)]
    for name, child in (root.state.get("_modules") or {}).items():
        if isinstance(child, StandIn):
            found += _stand_in_modules(child, f"{prefix}.{name}" if prefix else name)
    return found


def _activation_spec(root: StandIn) -> str | None:
    """The YAML ``activation`` matching the checkpoint's Conv activations when they are not SiLU (older releases)."""
    for _, module in _stand_in_modules(root):
        if module.qualified_name != "models.common.Conv":
            continue
        act = (module.state.get("_modules") or {}).get("act")
        if not isinstance(act, StandIn):
            return None
        kind = act.qualified_name.rsplit(".", 1)[-1]
        if kind == "SiLU":
            return None
        if kind == "LeakyReLU":
            return f"nn.LeakyReLU({act.state.get('negative_slope', 0.01)})"
        return f"nn.{kind}()"
    return None


def _class_names(names: Any, nc: int) -> list[str]:
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    if isinstance(names, (list, tuple)) and len(names) == nc:
        return [str(n) for n in names]
    return [str(i) for i in range(nc)]


def model_from_yolov5_checkpoint(checkpoint: dict[str, Any], source: str = "YOLOv5 checkpoint") -> DetectionModel:
    """Our DetectionModel with the weights of a YOLOv5 checkpoint dict read by :func:`read_yolov5_checkpoint`."""
    yolov5_model = checkpoint.get("ema") if is_yolov5_model(checkpoint.get("ema")) else checkpoint.get("model")
    if not is_yolov5_model(yolov5_model):
        found = type(yolov5_model).__name__ if not isinstance(yolov5_model, StandIn) else yolov5_model.qualified_name
        raise CheckpointError(f"{source}: expected a YOLOv5 detection model under 'model' or 'ema', found {found}")
    attributes = yolov5_model.state
    model_yaml = attributes.get("yaml")
    if not isinstance(model_yaml, dict):
        raise CheckpointError(f"{source}: the YOLOv5 model carries no architecture YAML ('yaml' attribute)")
    model_yaml = {k: v for k, v in model_yaml.items() if k != "yaml_file"}
    if "activation" not in model_yaml and (activation := _activation_spec(yolov5_model)):
        model_yaml["activation"] = activation
    try:
        model = DetectionModel(model_yaml)
    except ConfigError as e:
        raise CheckpointError(f"{source}: cannot rebuild the YOLOv5 architecture: {e}") from e

    weights = {
        k: v.detach().float() if v.is_floating_point() else v for k, v in stand_in_state_dict(yolov5_model).items()
    }
    detect_prefix = f"model.{len(model.model) - 1}."
    weights.pop(f"{detect_prefix}anchor_grid", None)  # a buffer in YOLOv5 v5.0, recomputed by our Detect
    stride_key = f"{detect_prefix}stride"
    yolov5_stride = attributes.get("stride")
    if isinstance(yolov5_stride, Tensor) and not torch.equal(yolov5_stride.float().cpu(), model.stride):
        raise CheckpointError(f"{source}: strides {yolov5_stride.tolist()} differ from the rebuilt model's")
    weights.setdefault(stride_key, model.stride.clone())
    _load_weights(model, weights, source)
    _copy_batchnorm_settings(model, yolov5_model)
    model.names = _class_names(attributes.get("names"), model.nc)
    return model


def _load_weights(model: nn.Module, weights: dict[str, Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the architecture (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    mismatched = [k for k, v in weights.items() if v.shape != expected[k].shape]
    if mismatched:
        key = mismatched[0]
        raise CheckpointError(
            f"{source}: {key} has shape {list(weights[key].shape)}, the architecture needs {list(expected[key].shape)}"
        )
    model.load_state_dict(weights, strict=True)


def _copy_batchnorm_settings(model: nn.Module, yolov5_model: StandIn) -> None:
    """Take eps/momentum of each BatchNorm from the checkpoint (they affect inference; ours default to YOLOv5's)."""
    ours = dict(model.named_modules())
    for name, module in _stand_in_modules(yolov5_model):
        if module.qualified_name.endswith(".BatchNorm2d") and isinstance(ours.get(name), nn.BatchNorm2d):
            for attribute in ("eps", "momentum"):
                if isinstance(value := module.state.get(attribute), float):
                    setattr(ours[name], attribute, value)


def load_yolov5_checkpoint(path: str | Path) -> DetectionModel:
    """Our DetectionModel (fp32, training mode as built) from a YOLOv5 ``.pt`` file, read without YOLOv5's code."""
    model = model_from_yolov5_checkpoint(read_yolov5_checkpoint(path), source=str(path))
    LOGGER.info("Imported YOLOv5 checkpoint %s (%d classes)", path, model.nc)
    return model
