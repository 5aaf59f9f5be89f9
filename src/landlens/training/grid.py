"""A hyper-parameter grid: every combination of some config keys, one run each, one table.

``--grid optim.lr=0.03,0.003 --grid trainer.epochs=5,10 --grid data.batch_size=64,256`` runs
2 x 2 x 2 = 8 runs under ``OUT/<combination>/`` and writes ``OUT/grid.{md,json,csv}``. A
combination whose run already finished is read back, not trained again, so an interrupted
grid continues where it stopped.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from pathlib import Path
from typing import Any, Callable, Sequence

from landlens.errors import ConfigError
from landlens.features.store import atomic_write_bytes, atomic_write_json
from landlens.training.config import TrainConfig, config_from_dict, parse_override


def parse_grid(specs: Sequence[str]) -> dict[str, list[Any]]:
    """``['optim.lr=0.1,0.01', ...]`` -> ``{'optim.lr': [0.1, 0.01], ...}`` (each value read by the key's type)."""
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        if "=" not in spec:
            raise ConfigError(f"grid axis {spec!r} must look like section.key=v1,v2,...")
        key, _, values = spec.partition("=")
        key = key.strip()
        if key in grid:
            raise ConfigError(f"grid axis {key!r} given twice")
        vals = [parse_override(f"{key}={v.strip()}")[1] for v in values.split(",") if v.strip()]
        if not vals:
            raise ConfigError(f"grid axis {key!r} has no values")
        grid[key] = vals
    if not grid:
        raise ConfigError("a grid needs at least one --grid section.key=v1,v2 axis")
    return grid


def _slug(combo: dict[str, Any]) -> str:
    parts = [f"{k.split('.')[-1]}={v}" for k, v in combo.items()]
    return "_".join("".join(c if c.isalnum() or c in "-=.+" else "-" for c in p) for p in parts)


def grid_configs(base: dict[str, Any], grid: dict[str, list[Any]], out: str | Path) -> list[tuple[dict[str, Any], TrainConfig]]:
    """One validated config per combination, each with its own run directory under ``out``."""
    keys = list(grid)
    runs = []
    for values in itertools.product(*(grid[k] for k in keys)):
        combo = dict(zip(keys, values))
        raw = TrainConfig.with_values(base, {**combo, "out": str(Path(out) / _slug(combo))})
        runs.append((combo, config_from_dict(raw, "grid").validate()))
    return runs


def run_grid(base: dict[str, Any], grid: dict[str, list[Any]], out: str | Path, *,
             train_fn: Callable[..., Any] | None = None, progress: bool = True,
             command: str | None = None) -> list[dict[str, Any]]:
    """Train every combination (skipping finished ones) and write the grid table."""
    from landlens.training.engine import RESULTS_FILE, train

    train_fn = train_fn or train
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for combo, cfg in grid_configs(base, grid, out):
        done = Path(cfg.out) / RESULTS_FILE
        if done.is_file():
            results = json.loads(done.read_text())
        else:
            results = train_fn(cfg, resume=(Path(cfg.out) / "checkpoints" / "last.ckpt").is_file(),
                               progress=progress, command=command).results
        test = results.get("test") or {}
        ci = test.get("ci") or {}
        rows.append({**combo, "accuracy": test.get("accuracy"), "ci_low": ci.get("low"), "ci_high": ci.get("high"),
                     "macro_f1": test.get("macro_f1"), "epochs_run": results.get("epochs_run"),
                     "fit_s": (results.get("timing_s") or {}).get("fit"), "run": str(cfg.out)})
        write_grid_table(rows, list(grid), out)
    return rows


def write_grid_table(rows: list[dict[str, Any]], keys: list[str], out: Path) -> None:
    """``grid.json``, ``grid.csv`` and ``grid.md`` (accuracy in percent with its 95% interval)."""
    cols = [*keys, "accuracy", "ci_low", "ci_high", "macro_f1", "epochs_run", "fit_s", "run"]
    atomic_write_json(out / "grid.json", rows)
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(out / "grid.csv", text.getvalue().encode())
    lines = ["| " + " | ".join([*keys, "OA %", "95% CI", "macro F1", "epochs", "fit s"]) + " |",
             "|" + "---|" * (len(keys) + 5)]
    for r in rows:
        pct = (lambda v: f"{100 * v:.2f}" if isinstance(v, (int, float)) else "-")
        ci = f"{pct(r['ci_low'])}-{pct(r['ci_high'])}" if r.get("ci_low") is not None else "-"
        lines.append("| " + " | ".join([*(str(r[k]) for k in keys), pct(r.get("accuracy")), ci,
                                         pct(r.get("macro_f1")), str(r.get("epochs_run")), str(r.get("fit_s"))]) + " |")
    atomic_write_bytes(out / "grid.md", ("\n".join(lines) + "\n").encode())


__all__ = ["grid_configs", "parse_grid", "run_grid", "write_grid_table"]
