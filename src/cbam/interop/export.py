"""Export to ONNX or TorchScript, and check the result against PyTorch.

CBAM's pooling is written as reductions (`amax`/`mean`), so in ONNX the channel attention's
global max pool is a ReduceMax, not the MaxPool that `AdaptiveMaxPool2d(1)` becomes, and no
shape in the graph depends on the batch size: the batch axis is exported as dynamic.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from cbam._errors import unknown_choice
from cbam._paths import check_output_folder
from cbam.interop.attach import detector_parts

FORMATS = ("onnx", "torchscript")
INPUT_NAME, OUTPUT_NAME, BATCH_AXIS = "input", "output", "batch"

Size = int | tuple[int, ...]  # an int: H = W; a tuple: the spatial sizes (L; H, W; D, H, W)
Runner = Callable[[torch.Tensor], torch.Tensor]


def export_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    format: str = "onnx",
    *,
    input_size: Size = 224,
    in_chans: int = 3,
    batch_size: int = 2,
    opset: int = 18,
    dynamo: bool = True,
) -> Path:
    """Write `model` (in eval mode) to `path` as ONNX or TorchScript; returns the path.

    ONNX: one self-contained file with a dynamic batch axis ("batch"), input "input",
    output "output". `dynamo=True` uses torch.export (PyTorch's default exporter);
    `dynamo=False` the older TorchScript-based one, which is faster and gives the same ops.
    TorchScript: traced (our models' forward is not scriptable), then frozen with
    torch.jit.freeze: weights become constants, BN folds into convs, so the file is for
    inference only. (Unfrozen traces of these models fail on their second call with grad
    enabled: TorchScript's optimiser trips over the in-place ReLU in the channel MLP.)
    Traced graphs keep the batch axis free: nothing in the models reshapes by batch size.
    The example input is `batch_size` x `in_chans` x `input_size` (an int: a square image; a
    tuple: every spatial size, e.g. (L,) for a 1-D or (D, H, W) for a 3-D network).
    """
    if format not in FORMATS:
        raise unknown_choice("export format", format, FORMATS)
    if format == "onnx":
        _check_opset(opset, dynamo)
    example = _example(model, batch_size, in_chans, input_size)
    model = one_output(model, example)
    path = Path(path)
    check_output_folder(path.parent, "the export's folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside `path` and moved there once whole and checked: a failed export leaves
    # neither a broken file nor a half-written one in its place.
    partial = path.with_name(f".{path.name}.partial")
    try:
        _write(model, example, partial, format, opset, dynamo)
        if format == "onnx":
            import onnx

            onnx.checker.check_model(str(partial))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


# ONNX opsets each exporter writes: torch.export's from 18 (lower ones go through ONNX's
# version converter, which fails on these models' reductions), TorchScript's 9 to 20.
DYNAMO_MIN_OPSET, LEGACY_OPSETS = 18, (9, 20)


def _check_opset(opset: int, dynamo: bool) -> None:
    import onnx

    low, high = (DYNAMO_MIN_OPSET, onnx.defs.onnx_opset_version()) if dynamo else LEGACY_OPSETS
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
        hint = "; for opsets 9 to 17 use the legacy exporter (dynamo=False)" if dynamo else ""
        raise ValueError(f"opset must be an integer from {low} to {high}, got {opset!r}{hint}")


def _write(
    model: nn.Module, example: torch.Tensor, path: Path, format: str, opset: int, dynamo: bool
) -> None:
    with _eval_mode(model), torch.no_grad(), _quiet():
        if format == "torchscript":
            traced = torch.jit.trace(model, example, check_trace=False)
            torch.jit.freeze(traced).save(str(path))
        elif dynamo:
            torch.onnx.export(
                model, (example,), str(path), dynamo=True, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim(BATCH_AXIS)},),
                external_data=False, verbose=False,
            )  # fmt: skip
        else:
            torch.onnx.export(
                model, (example,), str(path), dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}},
            )  # fmt: skip


def verify_export(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    batch_sizes: Sequence[int] = (1, 3),
    input_size: Size = 224,
    in_chans: int = 3,
    seed: int = 0,
) -> dict[int, float]:
    """Max |exported - PyTorch| of the outputs on random inputs, for each batch size.

    ONNX files run in onnxruntime (CPU); `.pt` files are reloaded with torch.jit.load.
    """
    path = Path(path)
    generator = torch.Generator().manual_seed(seed)
    model = one_output(model, _example(model, 1, in_chans, input_size))
    diffs: dict[int, float] = {}
    run = _onnx_runner(path) if path.suffix == ".onnx" else _torchscript_runner(path)
    for batch in batch_sizes:
        x = _example(model, batch, in_chans, input_size, generator)
        with _eval_mode(model), torch.no_grad():
            expected = model(x).float().cpu()
        got = run(x)
        if got.shape != expected.shape:
            raise ValueError(
                f"{path} gave shape {list(got.shape)} for batch {batch}, PyTorch "
                f"{list(expected.shape)}"
            )
        diffs[batch] = float((got - expected).abs().max())
    return diffs


class MainOutput(nn.Module):
    """A segmentation model's {"out": ..., "aux": ...} as its "out" tensor, the one output an
    export and its parity check take."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def one_output(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """`model` as a tensor-in, tensor-out module (segmenters: their "out"), or a clear error
    for what cbam exports cannot check: detectors take a list of images and return boxes."""
    detector = detector_parts(model)
    if detector:
        raise ValueError(
            f"{type(model).__name__} is a detector ({detector[0]}): it takes a list of images "
            f"and returns boxes per image, which cbam's export and its onnxruntime parity "
            f"check do not cover; export its backbone (model.backbone) instead"
        )
    if isinstance(model, MainOutput):
        return model
    with _eval_mode(model), torch.no_grad():
        output = model(example[:1])
    if isinstance(output, torch.Tensor):
        return model
    if isinstance(output, dict) and isinstance(output.get("out"), torch.Tensor):
        return MainOutput(model)
    raise ValueError(
        f"{type(model).__name__} returns {type(output).__name__}, not a tensor (or a "
        f"segmenter's {{'out': tensor}}); export a module that returns one tensor"
    )


def onnx_op_types(path: str | os.PathLike[str], scope: str | None = None) -> Counter[str]:
    """How many nodes of each op type the ONNX graph at `path` has; with `scope`, only
    nodes that come from a module of that name (e.g. "attention": every block's attention
    layer). Works for graphs from both exporters."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return Counter(n.op_type for n in graph.node if scope is None or scope in _scopes(n))


def onnx_batch_axis(path: str | os.PathLike[str]) -> str | int:
    """The first axis of the graph's input: a name when it is dynamic, else its size."""
    import onnx

    dim = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type
    first = dim.shape.dim[0]
    return first.dim_param or first.dim_value


def _scopes(node: object) -> set[str]:
    """Module names a node came from: dynamo graphs record them in metadata
    ("layer1.0.attention"), TorchScript-based ones in the node name ("/layer1.0/attention/")."""
    names = set(node.name.split("/"))  # type: ignore[attr-defined]
    for prop in node.metadata_props:  # type: ignore[attr-defined]
        if prop.key == "pkg.torch.onnx.name_scopes":
            names.update(s for scope in _literal_list(prop.value) for s in scope.split("."))
    return names


def _literal_list(text: str) -> list[str]:
    """Parse the repr of a list of strings, as the exporter writes name scopes."""
    import ast

    value = ast.literal_eval(text)
    return [str(v) for v in value] if isinstance(value, list) else []


def _onnx_runner(path: Path) -> Runner:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.float().cpu().numpy()})[0])

    return run


def _torchscript_runner(path: Path) -> Runner:
    with _quiet():
        loaded = torch.jit.load(str(path), map_location="cpu")

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return loaded(x.cpu()).float()

    return run


def _example(
    model: nn.Module,
    batch: int,
    in_chans: int,
    input_size: Size,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    sizes = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    x = torch.randn(batch, in_chans, *sizes, generator=generator)
    weight = next(model.parameters(), None)
    return x if weight is None else x.to(device=weight.device, dtype=weight.dtype)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence exporter chatter that is expected here: tracer warnings about the models'
    static input checks, and the legacy exporter's deprecation notice."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated.*")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        yield
