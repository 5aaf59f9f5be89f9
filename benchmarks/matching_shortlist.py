"""What the Euclidean shortlist costs in retrieval quality (issue #5, fast archive scoring).

``--shortlist K`` re-ranks only each query's K Euclidean nearest neighbours with the matching
discriminator; the rest of the database keeps its Euclidean order after them. That is what
makes scoring 47-159x faster than the full pair path (``benchmarks/matching_scoring.md``). This
script measures the price in mAP/ANMRR/P@k: one trained discriminator, the same queries and
database, every K of ``--shortlist``, next to the full learned ranking and plain Euclidean.

Each row is ``landlens matching evaluate DML_RUN --database DB [--shortlist K]``, run as a
command; the default discriminator is the matching study's ResDyadDML on EfficientNet-Lite0
features at 80/20 (``benchmarks/matching_study.py``).

Usage::

    python benchmarks/matching_shortlist.py [--run runs/matching_study/dml-feat-...-r80-20-...]
        [--shortlist 10 20 50 100 200] [--database test] [--out benchmarks/results/matching_shortlist]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
KEYS = ("mAP", "ANMRR", "P@5", "P@10", "P@50", "P@100")


def _default_run() -> Path | None:
    found = sorted((REPO / "runs" / "matching_study").glob("dml-feat-tf_efficientnet_lite0-resdyad-r80-20-*"))
    return found[-1] if found else None


def _evaluate(run: Path, database: str, shortlist: int | None, tmp: Path) -> tuple[dict[str, Any], str, float]:
    out = tmp / f"eval-{shortlist or 'full'}.json"
    args = ["matching", "evaluate", str(run), "--database", database, "--out", str(out), "--no-progress"]
    if shortlist is not None:
        args += ["--shortlist", str(shortlist)]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "landlens.cli.main", *args], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    return json.loads(out.read_text()), "landlens " + " ".join(shlex.quote(a) for a in args[:-3]), wall


def _metrics(block: dict[str, Any]) -> dict[str, float]:
    m = block.get("metrics", block)
    return {k: float(m[k]) for k in KEYS}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=None, help="a discriminator run (landlens matching train-dml)")
    ap.add_argument("--shortlist", type=int, nargs="+", default=[10, 20, 50, 100, 200])
    ap.add_argument("--database", choices=["test", "archive-minus-query"], default="test")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "matching_shortlist")
    args = ap.parse_args(argv)
    run = args.run or _default_run()
    if run is None or not (run / "results.json").is_file():
        raise SystemExit("matching_shortlist: no discriminator run; give --run or run benchmarks/matching_study.py first")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        full, cmd, wall = _evaluate(run, args.database, None, Path(tmp))
        rows.append({"ranking": "Euclidean", "shortlist": None, "metrics": _metrics(full["baseline"]),
                     "command": cmd, "wall_s": None})
        rows.append({"ranking": "learned, every pair", "shortlist": None, "metrics": _metrics(full["learned"]),
                     "command": cmd, "wall_s": round(wall, 1)})
        for k in args.shortlist:
            res, cmd, wall = _evaluate(run, args.database, k, Path(tmp))
            rows.append({"ranking": f"learned, Euclidean shortlist of {k}", "shortlist": k,
                         "metrics": _metrics(res["learned"]), "command": cmd, "wall_s": round(wall, 1)})
            print(f"shortlist {k}: mAP {100 * rows[-1]['metrics']['mAP']:.2f}", flush=True)
    queries = ((full.get("learned") or {}).get("protocol") or {}).get("n_queries")
    doc = {"command": "python benchmarks/matching_shortlist.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
           "run": str(run.relative_to(REPO) if run.is_relative_to(REPO) else run), "database": args.database,
           "queries": queries, "features": (full.get("learned") or {}).get("features"), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    ref = rows[1]["metrics"]["mAP"]
    lines = ["# The Euclidean shortlist's cost in retrieval quality", "", f"`{doc['command']}`", "",
             f"Discriminator `{doc['run']}`; the test part of its split queries the {args.database} database "
             f"({queries} queries, the query itself excluded). A shortlist of K re-ranks each query's K Euclidean "
             "neighbours by match probability and leaves the rest in Euclidean order after them.", "",
             "| ranking | mAP | ANMRR | P@5 | P@10 | P@50 | P@100 | mAP vs every pair | command wall (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = r["metrics"]
        lines.append(f"| {r['ranking']} | {100 * m['mAP']:.2f} | {m['ANMRR']:.4f} | "
                     + " | ".join(f"{100 * m[k]:.2f}" for k in KEYS[2:])
                     + f" | {100 * (m['mAP'] - ref):+.2f} | {r['wall_s'] if r['wall_s'] is not None else '-'} |")
    lines += ["", "Wall time is the whole command (loading the run, the cached features, scoring, metrics); the "
              "scoring speed-ups themselves are in `matching_scoring.md`.", ""]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
