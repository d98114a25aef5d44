"""The registry of layer types that model YAML files may name, so building a model never needs ``eval()``.

A block joins the registry with ``@register`` on its class; the YAML parser (:mod:`detector.models.yolo`) looks
each row's module name up here. How the parser fills in a block's channel arguments is stated by the block
itself through class attributes (read with defaults, so plain ``torch.nn`` classes need none):

``scales_width``          args[0] is the output channel count: multiplied by ``width_multiple``, rounded up to a
                          multiple of 8, and the input channel count is put before it (``[c_in, c_out, *rest]``).
                          A list ``[c_out, *inner]`` instead gives exact widths (pruned models); ``inner`` goes to
                          the block as the keyword ``hidden_channels`` (see :mod:`detector.models.yolo`).
``takes_repeats``         the row's (depth-scaled) repeat count goes in as the third argument and the block is built
                          once, instead of the parser stacking ``repeats`` copies in an ``nn.Sequential``.
``concatenates_inputs``   output channels are the sum of the inputs' channels (``Concat``).
``takes_input_channels``  the list of the inputs' channel counts is appended to the args (``Detect``).
``accepts_strings``       string arguments that are not symbols (``'nearest'``) are passed through as literals;
                          for every other block an unknown string is an error.
``takes_activation``      the block accepts an ``activation=`` keyword (a factory of ``nn.Module``) that the
                          parser fills from the YAML's optional ``activation`` key.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import TypeVar

from torch import nn

ModuleType = TypeVar("ModuleType", bound=type[nn.Module])

LAYERS: dict[str, type[nn.Module]] = {}


def register(cls: ModuleType | None = None, *, names: tuple[str, ...] = ()) -> ModuleType | Callable[..., ModuleType]:
    """Class decorator adding a layer type under its class name (and any extra ``names``, e.g. ``"nn.Upsample"``).

    Usable bare (``@register``) or with aliases (``@register(names=("nn.Upsample",))``). Registering a name
    twice is a programming error and raises ValueError.
    """

    def add(layer_cls: ModuleType) -> ModuleType:
        for name in (layer_cls.__name__, *names):
            if name in LAYERS:
                raise ValueError(f"layer {name!r} is registered twice ({LAYERS[name]!r} and {layer_cls!r})")
            LAYERS[name] = layer_cls
        return layer_cls

    return add(cls) if cls is not None else add


def get_layer(name: str) -> type[nn.Module]:
    """The layer class registered as ``name``; KeyError with the closest names when there is none."""
    _import_builtin_layers()
    if name not in LAYERS:
        hint = difflib.get_close_matches(name, LAYERS, n=3, cutoff=0.5)  # YAML names are short
        suggestion = f"did you mean {' or '.join(repr(h) for h in hint)}? " if hint else ""
        raise KeyError(f"unknown layer {name!r}; {suggestion}known: {', '.join(sorted(LAYERS))}")
    return LAYERS[name]


def layer_rule(layer_cls: type[nn.Module], rule: str) -> bool:
    """A block's channel/argument rule (see the module docstring); False when the class does not state it."""
    return bool(getattr(layer_cls, rule, False))


def _import_builtin_layers() -> None:
    # Importing the modules runs their @register decorators; done lazily to avoid an import cycle
    # (blocks.py and head.py import this module for the decorator).
    from detector.models import blocks, head  # noqa: F401
