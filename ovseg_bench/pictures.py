"""Pictures: colour overlays, saved label maps and image | GT | prediction panels.

(Being written for issue 3; the signatures below are the contract the CLI and the run plan use.)
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .errors import ConfigError


def make_image_hook(output: Path, method: str, card: Any, samples: list[Any], *,
                    save_predictions: bool, visualize: int) -> Any:
    """An ``ImageHook`` for ``engine.runner.evaluate`` that writes what the run asked for."""
    raise ConfigError("--save-predictions and --visualize are not available yet")


def predict_command(args: argparse.Namespace) -> int:
    raise ConfigError("`ovseg-bench predict` is not available yet")
