"""The CBAM paper's published figures (REFERENCE.md section 4), for "paper" columns."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperResult:
    """One cell of the paper's ImageNet-1K table: 1000-class head, 224x224 input."""

    params_m: float
    gflops: float  # multiply-accumulates, the authors' counting convention
    top1_err: float
    top5_err: float


def config_label(model: str, model_kwargs: dict[str, object] | None = None) -> str:
    """A model name with the arguments that make the variant: wide_resnet18(widen=1.5)."""
    if not model_kwargs:
        return model
    args = ", ".join(f"{k}={v}" for k, v in sorted(model_kwargs.items()))
    return f"{model}({args})"


def _row(none: str, se: str, cbam: str) -> dict[str, PaperResult]:
    def cell(text: str) -> PaperResult:
        params, gflops, top1, top5 = (float(v.rstrip("M")) for v in text.split(" / "))
        return PaperResult(params, gflops, top1, top5)

    return {"none": cell(none), "se": cell(se), "cbam": cell(cbam)}


# Keyed by config_label(); columns by attention ("none" = baseline).
IMAGENET_CLASSIFICATION: dict[str, dict[str, PaperResult]] = {
    "resnet18": _row(
        "11.69M / 1.814 / 29.60 / 10.55",
        "11.78M / 1.814 / 29.41 / 10.22",
        "11.78M / 1.815 / 29.27 / 10.09",
    ),
    "resnet34": _row(
        "21.80M / 3.664 / 26.69 / 8.60",
        "21.96M / 3.664 / 26.13 / 8.35",
        "21.96M / 3.665 / 25.99 / 8.24",
    ),
    "resnet50": _row(
        "25.56M / 3.858 / 24.56 / 7.50",
        "28.09M / 3.860 / 23.14 / 6.70",
        "28.09M / 3.864 / 22.66 / 6.31",
    ),
    "resnet101": _row(
        "44.55M / 7.570 / 23.38 / 6.88",
        "49.33M / 7.575 / 22.35 / 6.19",
        "49.33M / 7.581 / 21.51 / 5.69",
    ),
    "wide_resnet18(widen=1.5)": _row(
        "25.88M / 3.866 / 26.85 / 8.88",
        "26.07M / 3.867 / 26.21 / 8.47",
        "26.08M / 3.868 / 26.10 / 8.43",
    ),
    "resnext50_32x4d": _row(
        "25.03M / 3.768 / 22.85 / 6.48",
        "27.56M / 3.771 / 21.91 / 6.04",
        "27.56M / 3.774 / 21.92 / 5.91",
    ),
    "mobilenet_v1(width_mult=0.7)": _row(
        "2.30M / 0.283 / 34.86 / 13.69",
        "2.71M / 0.283 / 32.50 / 12.49",
        "2.71M / 0.289 / 31.51 / 11.48",
    ),
}


def paper_result(label: str, attention: str | None) -> PaperResult | None:
    """The paper's figure for a config label and attention, or None where it has none."""
    return IMAGENET_CLASSIFICATION.get(label, {}).get(attention or "none")
