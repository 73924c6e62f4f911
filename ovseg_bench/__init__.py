"""ovseg-bench: one exact, reproducible harness for zero-shot semantic segmentation."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # ``ovseg_bench.load_results`` imports pandas on first use only: ``import ovseg_bench`` (and the
    # CLI's start-up) stays light.
    if name == "load_results":
        from .api import load_results

        return load_results
    raise AttributeError(f"module 'ovseg_bench' has no attribute {name!r}")
