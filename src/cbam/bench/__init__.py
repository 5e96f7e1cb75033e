"""Benchmarks: what attention costs in time and memory, measured side by side in one process.

`cbam bench` or `python -m cbam.bench.overhead` on the command line; `run_overhead` and
`format_report` from `cbam.bench.overhead` in Python.
"""

from cbam.bench.memory import peak_memory_bytes, tensor_bytes
from cbam.bench.stats import Summary, paired_ratios, quantile, summarize

__all__ = ["Summary", "paired_ratios", "peak_memory_bytes", "quantile", "summarize", "tensor_bytes"]
