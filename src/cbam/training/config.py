"""Training configuration: a recipe (YAML) plus command-line overrides, validated up front."""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cbam._device import resolve_device
from cbam._errors import unknown_choice
from cbam._paths import check_output_folder

RECIPES = ("small", "imagenet")
DATA_PATHS = ("auto", "tensor", "per-sample")  # as cbam.data.DATA_PATHS (this file stays light)
ConfigT = TypeVar("ConfigT")


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as config.yaml in the run folder."""

    # model
    model: str = "resnet20"
    attention: str | None = "cbam"
    attention_kwargs: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # torchvision:NAME / timm:NAME models (cbam.interop.external): `attention` is not used;
    # `attach` is inserted with identity init at `attach_placement`, after the weights in
    # `pretrained` (a local .safetensors/.pth file of the network as published) are loaded.
    attach: str | None = None
    attach_placement: str = "auto"
    pretrained: str | None = None
    # data
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    augment: str = "small"  # "small" (pad-crop + flip) or "imagenet" (RandomResizedCrop)
    image_size: int | None = None  # None: the data set's own size (imagenet recipe: 224)
    train_subset: int | None = None
    test_subset: int | None = None
    workers: int = 0
    strict_data: bool = False
    # "auto" | "tensor" | "per-sample" (cbam.data.DATA_PATHS): auto keeps a small-recipe data
    # set as one tensor on the training device when it fits resident_limit_mb
    data_path: str = "auto"
    resident_limit_mb: float = 2048
    # optimisation
    epochs: int = 4
    batch_size: int = 128
    lr: float = 0.1  # for base_batch_size images per step; scaled linearly with the batch
    base_batch_size: int = 128
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | step | constant
    step_epochs: int | list[int] = 30  # step: decay every N epochs, or at these epochs
    step_gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    accumulate: int = 1
    ema_decay: float | None = None
    # execution
    seed: int = 0
    device: str = "auto"
    amp: str | None = None  # None | "bf16" | "fp16"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    deterministic: bool = False
    # Flush subnormal floats to zero on CPU: CBAM's saturated gates produce them, and x86
    # arithmetic on them is slow (8.5x slower CBAM training measured on Fashion-MNIST).
    flush_denormal: bool = True
    output: str = "runs/train"
    log_every: int = 50
    # Checkpoints inside an epoch as well as at its end: every N optimizer steps and/or every
    # M minutes (None: only at epoch ends and on Ctrl-C/SIGTERM). A kill -9 loses at most that.
    checkpoint_every: int | None = None
    checkpoint_minutes: float | None = None
    # How long a process waits on the others under torchrun before it gives up (a peer died).
    dist_timeout_minutes: float = 15.0

    @property
    def scaled_lr(self) -> float:
        """lr x (effective batch / base batch): the linear scaling rule of Goyal et al."""
        return self.lr * self.batch_size * self.accumulate / self.base_batch_size

    def validate(self) -> TrainConfig:
        checks = {
            "optimizer": (self.optimizer, ("sgd", "adamw")),
            "schedule": (self.schedule, ("cosine", "step", "constant")),
            "augment": (self.augment, ("small", "imagenet")),
            "amp": (self.amp, (None, "bf16", "fp16")),
            "data_path": (self.data_path, DATA_PATHS),
        }
        for name, (value, choices) in checks.items():
            if value not in choices:
                raise unknown_choice(name, value, [str(c) for c in choices])
        positive = ("epochs", "batch_size", "base_batch_size", "accumulate", "log_every")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("train_subset", "test_subset", "image_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or null, got {value!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        check_step_epochs(self.step_epochs)
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.checkpoint_every is not None and (
            not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 1
        ):
            raise ValueError(
                f"checkpoint_every must be a positive number of steps or null, got "
                f"{self.checkpoint_every!r}"
            )
        for name, value in (
            ("checkpoint_minutes", self.checkpoint_minutes),
            ("dist_timeout_minutes", self.dist_timeout_minutes),
        ):
            if value is None and name == "checkpoint_minutes":  # null: none by time
                continue
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive number of minutes, got {value!r}")
        limit = self.resident_limit_mb
        if not isinstance(limit, int | float) or isinstance(limit, bool) or limit < 0:
            raise ValueError(f"resident_limit_mb must be a number of MiB >= 0, got {limit!r}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        resolve_device(self.device)
        check_output_folder(self.output, "output")
        self._validate_external()
        return self

    def _validate_external(self) -> None:
        from cbam.interop.external import is_external
        from cbam.interop.placements import PLACEMENTS

        if self.attach_placement not in PLACEMENTS:
            raise unknown_choice("attach_placement", self.attach_placement, PLACEMENTS)
        if (self.attach or self.pretrained) and not is_external(self.model):
            raise ValueError(
                f"attach and pretrained are for torchvision:NAME / timm:NAME models; "
                f"{self.model!r} is cbam's own: use attention= and a weights file instead"
            )
        if not is_external(self.model):  # names checked here, before any data is read
            from cbam.layers import get_attention
            from cbam.models._registry import model_entry

            model_entry(self.model)
            get_attention(self.attention)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_step_epochs(value: object) -> None:
    """step_epochs is a positive integer (decay every N epochs) or a list of them (decay at
    each listed epoch, as detection schedules do)."""
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(
            f"step_epochs must be a positive integer or a list of them (e.g. [8, 11]), "
            f"got {value!r}"
        )


def recipe_path(name: str) -> Path:
    return Path(str(resources.files("cbam.training") / "recipes" / f"{name}.yaml"))


def read_yaml(path: str | os.PathLike[str], recipes: Sequence[str] = RECIPES) -> dict[str, Any]:
    """A YAML mapping of config keys; `recipes` are the names the error suggests instead."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ValueError(
            f"config file {path} does not exist; pass a path or one of the recipes: "
            f"{', '.join(recipes)}"
        ) from None
    except yaml.YAMLError as error:
        raise ValueError(f"config file {path} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of options, got {type(data)}")
    return data


def merge(config: ConfigT, values: dict[str, Any], source: str) -> ConfigT:
    """Apply `values` on top of `config` (any config dataclass); unknown keys, and values
    of the wrong type (a string for a number, NaN for a rate, ...), are an error naming the
    key and what it takes."""
    known = [f.name for f in fields(config)]  # type: ignore[arg-type]
    hints = typing.get_type_hints(type(config))
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"{source}: {unknown_choice('config key', key, known)}")
        if not _fits(value, hints[key]):
            raise ValueError(f"{source}: {key} takes {_describe(hints[key])}, got {value!r}")
    return dataclasses.replace(config, **values)  # type: ignore[type-var]


def _fits(value: Any, hint: Any) -> bool:
    """Whether `value` (as YAML reads it) is of the type `hint` (a config field's)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return number and math.isfinite(value)
    if origin in (list, tuple):
        item = typing.get_args(hint)[0] if typing.get_args(hint) else Any
        return isinstance(value, list | tuple) and all(_fits(v, item) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arm) for arm in typing.get_args(hint))
    names = {type(None): "null", bool: "true/false", int: "an integer", float: "a finite number",
             str: "a string"}  # fmt: skip
    if hint in names:
        return names[hint]
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        args = typing.get_args(hint)
        item = _describe(args[0]).removeprefix("an ").removeprefix("a ") if args else ""
        return f"a list of {item}s" if item else "a list"
    if origin is dict or hint is dict:
        return "a mapping ({key: value})"
    return getattr(hint, "__name__", str(hint))


def parse_value(text: str, key: str = "--set") -> Any:
    """A command-line value as YAML would read it: 3 -> int, null -> None, {a: 1} -> dict."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        where = f" ({error.problem})" if getattr(error, "problem", None) else ""
        raise ValueError(
            f"{key}: {text!r} is not a YAML value{where}; quote it for the shell, e.g. "
            f"--set 'step_epochs=[8, 11]'"
        ) from None


def load_config(
    recipe: str | os.PathLike[str] | None = "small",
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """Defaults <- recipe (a name from RECIPES or a YAML path) <- overrides, validated."""
    config = TrainConfig()
    if recipe is not None:
        path = recipe_path(str(recipe)) if str(recipe) in RECIPES else Path(recipe)
        config = merge(config, read_yaml(path), str(path))
    if overrides:
        config = merge(config, overrides, "overrides")
    return config.validate()


def save_config(config: Any, path: str | os.PathLike[str]) -> None:
    """Write a config dataclass (anything with `to_dict()`) as YAML."""
    with open(path, "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
