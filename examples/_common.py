"""What the demo and the experiment share that needs no torch: arm names, means, table cells.

The command lines import only this module before they check their arguments, so that
``--help`` and a mistyped ``--arms`` answer at once instead of after torch and Megatron load.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

DEMO_ARMS = ("frozen", "conventional", "densemixer")
"""frozen: router weights never train; conventional: moe_dense_router_grad=False;
densemixer: moe_dense_router_grad=True. Same seeds, data and initial weights in all three."""

EXPERIMENT_ARMS = ("frozen", "conventional", "densemixer", "ema", "topm")
"""The demo's arms plus ``ema`` (the EMA estimator) and ``topm`` (exact on the top-M experts)."""

ARM_TITLES: Dict[str, str] = {
    "frozen": "frozen",
    "conventional": "conventional",
    "densemixer": "DenseMixer",
    "ema": "EMA",
    "topm": "top-M",
}
"""How tables, plots and the docs name each arm."""


def arm_list(known: Sequence[str]) -> Callable[[str], List[str]]:
    """An argparse ``type`` for a comma-separated list of arms, each one of ``known``.

    Args:
        known: The arms the command runs.

    Returns:
        A function from the argument's text to the list of arms; it raises
        ``argparse.ArgumentTypeError`` naming the unknown arms and the known ones.
    """

    def parse(text: str) -> List[str]:
        arms = [a.strip() for a in text.split(",") if a.strip()]
        unknown = [a for a in arms if a not in known]
        if not arms:
            raise argparse.ArgumentTypeError(f"no arm given; choose from {','.join(known)}.")
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown arm(s) {','.join(unknown)}; choose from {','.join(known)}."
            )
        return arms

    return parse


def seed_list(text: str) -> List[int]:
    """An argparse ``type`` for a comma-separated list of integer seeds."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seeds must be comma-separated integers, got {text!r}."
        ) from None
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed.")
    return seeds


def mean_or_none(values: List[Optional[float]]) -> Optional[float]:
    """The mean of the finite values, or None if there are none."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def format_value(value: Optional[float], digits: int = 3) -> str:
    """A table cell; '-' for a missing value."""
    return "-" if value is None else f"{value:.{digits}f}"


def write_record(
    out: str,
    name: str,
    record: Dict[str, Any],
    plot: Callable[[str], None],
    *,
    allow_nan: bool = True,
) -> Tuple[str, str]:
    """Writes ``record`` to ``<out>/<name>.json`` and has ``plot`` draw ``<out>/<name>.png``.

    Returns:
        The JSON and PNG paths.
    """
    os.makedirs(out, exist_ok=True)
    json_path = os.path.join(out, f"{name}.json")
    png_path = os.path.join(out, f"{name}.png")
    with open(json_path, "w") as f:
        json.dump(record, f, indent=1, allow_nan=allow_nan)
    plot(png_path)
    return json_path, png_path


def require_packages(command: str, packages: Sequence[str]) -> None:
    """Exits with one line naming the missing packages and how to install them, before any
    training starts (``make test`` builds ``.venv`` without the examples' extra packages).

    Raises:
        SystemExit: some of ``packages`` cannot be imported.
    """
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise SystemExit(
            f"{command} needs {', '.join(missing)}: run `make demo` once (it installs them into "
            f".venv) or `pip install {' '.join(missing)}`."
        )
