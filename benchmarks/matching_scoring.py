"""Pair-scoring benchmark of the residual-dyad matching discriminator (Khurshid et al.).

Scores one query against ``N`` archive items with the default ResDyadDML discriminator
(8x8x512 feature maps per image, width 128) in three ways:

- ``naive``: :meth:`PairScorer.score_naive`, the whole network on every pair, its first layer one
  convolution on ``cat(query, item)`` (8x8x1024);
- ``fast``: :meth:`PairScorer.score`, the first convolution factored as
  ``first_a(query) + first_b(item)`` with ``first_b`` applied once per archive item
  (:meth:`PairScorer.prepare_db`, a one-off cost per archive, timed separately) and only the
  rest of the network run per pair;
- ``shortlist``: :func:`match_distance` with a Euclidean shortlist of ``--shortlist`` items (only
  those are scored; see its docstring for what that costs in recall), timed three ways.

To keep the comparison fair on a shared machine, ``naive`` and ``fast`` are timed on the same
chunks of ``--chunk`` archive items, alternately, and their times summed. ``N`` is chosen so
that the naive path takes about ``--target-naive-s`` seconds (from a short calibration run)
unless ``--n`` is given. Weights are random (seeded) with random BN statistics, so the
probabilities vary between pairs and the max |diff| check means something; timings do not depend
on the weights. Features are seeded Gaussian maps.

Usage:
    python benchmarks/matching_scoring.py [--threads 2] [--n N] [--shortlist 100]
        [--out benchmarks/results/matching_scoring]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from landlens.matching.networks import DMLConfig, MatchingDiscriminator  # noqa: E402
from landlens.matching.scoring import PairScorer, _euclidean_shortlist, match_distance, squared_norms  # noqa: E402

MAX_DIFF = 1e-4
TARGET_SPEEDUP = 20.0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def make_model(seed: int) -> MatchingDiscriminator:
    torch.manual_seed(seed)
    d = MatchingDiscriminator(DMLConfig(kind="resdyad", in_channels=512, spatial=8, width=128))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in d.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        d.fc.weight.mul_(30.0)
    return d.eval()


def macs_per_pair(d: MatchingDiscriminator) -> dict[str, int]:
    """Multiply-adds of one pair, counted with forward hooks on every convolution and linear layer."""
    counts: dict[str, int] = {}

    def hook(name: str):
        def f(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            if isinstance(mod, nn.Conv2d):
                k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
                counts[name] = counts.get(name, 0) + out.numel() * k
            else:
                counts[name] = counts.get(name, 0) + out.numel() * mod.in_features
        return f

    handles = [m.register_forward_hook(hook(n)) for n, m in d.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.inference_mode():
        x = torch.zeros(1, *d.features_shape)
        d(x, x)
    for h in handles:
        h.remove()
    first = counts.get("first_a", 0) + counts.get("first_b", 0)
    return {"first_conv": first, "rest": sum(counts.values()) - first, "total": sum(counts.values())}


def timed(fn, *args, **kw) -> tuple[Any, float]:
    t = time.perf_counter()
    value = fn(*args, **kw)
    return value, time.perf_counter() - t


def median_time(fn, repeats: int) -> tuple[Any, float]:
    times, value = [], None
    for _ in range(repeats):
        value, t = timed(fn)
        times.append(t)
    times.sort()
    return value, times[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=0, help="archive items (0: calibrate to --target-naive-s)")
    ap.add_argument("--target-naive-s", type=float, default=25.0)
    ap.add_argument("--chunk", type=int, default=1024, help="archive items per alternately timed chunk")
    ap.add_argument("--shortlist", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "matching_scoring")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load_start = list(os.getloadavg())
    model = make_model(args.seed)
    scorer = PairScorer(model)
    macs = macs_per_pair(model)
    g = torch.Generator().manual_seed(args.seed + 2)
    q = torch.randn(1, 512, 8, 8, generator=g)

    # calibration: naive pairs/s on a warm-up chunk (also warms both paths up)
    warm = torch.randn(args.chunk, 512, 8, 8, generator=g)
    scorer.score(scorer.prepare_query(q), scorer.prepare_db(warm[:64]))
    _, t_cal = timed(scorer.score_naive, q, warm)
    naive_rate_cal = args.chunk / t_cal
    n = args.n or max(args.chunk, int(round(args.target_naive_s * naive_rate_cal / args.chunk)) * args.chunk)
    del warm
    print(f"{cpu_name()}; {args.threads} thread(s); calibration {naive_rate_cal:.0f} naive pairs/s -> N = {n}",
          flush=True)
    db = torch.randn(n, 512, 8, 8, generator=g)

    # one-off preparation of the archive and the query
    dbp, t_prep_db = timed(scorer.prepare_db, db)
    with torch.inference_mode():
        db_sq, t_prep_sq = timed(squared_norms, db.flatten(1))
    qp, t_prep_q = timed(scorer.prepare_query, q)

    # naive vs fast on the same chunks, alternately
    naive = torch.empty(1, n)
    fast = torch.empty(1, n)
    t_naive = t_fast = 0.0
    for s in range(0, n, args.chunk):
        e = min(n, s + args.chunk)
        v, t = timed(scorer.score_naive, q, db[s:e])
        naive[:, s:e] = v
        t_naive += t
        v, t = timed(scorer.score, qp, dbp[s:e])
        fast[:, s:e] = v
        t_fast += t
    max_diff = float((fast - naive).abs().max())
    print(f"naive {n / t_naive:.0f} pairs/s, fast {n / t_fast:.0f} pairs/s, x{t_naive / t_fast:.2f}, "
          f"max|diff| {max_diff:.2e}", flush=True)

    # Euclidean shortlist of k items
    k = args.shortlist
    q_flat, db_flat = q.flatten(1), db.flatten(1)
    repeats = 5
    dist, t_sl_raw = median_time(lambda: match_distance(q, db, scorer, shortlist=k), repeats)

    def shortlist_prepared() -> torch.Tensor:
        with torch.inference_mode():
            top, _ = _euclidean_shortlist(q_flat, db_flat, k, db_sq)
            return scorer.score_pairs(qp, dbp, torch.zeros(k, dtype=torch.long), top[0])

    def shortlist_naive() -> torch.Tensor:
        with torch.inference_mode():
            top, _ = _euclidean_shortlist(q_flat, db_flat, k, db_sq)
        return scorer.score_naive(q, db[top[0]])

    _, t_sl_prep = median_time(shortlist_prepared, repeats)
    _, t_sl_naive = median_time(shortlist_naive, repeats)
    with torch.inference_mode():
        top, _ = _euclidean_shortlist(q_flat, db_flat, k)
        _, t_euclid = median_time(lambda: _euclidean_shortlist(q_flat, db_flat, k, db_sq), repeats)
        _, t_euclid_norms = median_time(lambda: _euclidean_shortlist(q_flat, db_flat, k), repeats)
    sl_diff = float(((1.0 - dist[0, top[0]]) - naive[0, top[0]]).abs().max())
    load_end = list(os.getloadavg())
    wall = time.perf_counter() - t_start

    rows = [
        {"method": "naive: whole network on every pair", "pairs_scored": n, "seconds": t_naive},
        {"method": "fast: factored first conv, archive prepared", "pairs_scored": n, "seconds": t_fast},
        {"method": "fast incl. preparing the archive and query (1 query)", "pairs_scored": n,
         "seconds": t_fast + t_prep_db + t_prep_q},
        {"method": f"shortlist {k}: Euclidean (archive norms precomputed) + naive on the shortlist",
         "pairs_scored": k, "seconds": t_sl_naive},
        {"method": f"shortlist {k}: `match_distance` on raw features (computes the archive norms, "
                   f"prepares the {k} items)", "pairs_scored": k, "seconds": t_sl_raw},
        {"method": f"shortlist {k}: Euclidean + fast on the prepared archive (as `LearnedDistance`)",
         "pairs_scored": k,
         "seconds": t_sl_prep},
    ]
    for r in rows:
        r["archive_items_per_s"] = n / r["seconds"]
        r["speedup_vs_naive"] = t_naive / r["seconds"]
    result = {
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], "benchmarks/matching_scoring.py",
                               *(argv if argv is not None else sys.argv[1:])]),
        "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
        "threads": args.threads, "cpu_count": os.cpu_count(),
        "load_average_start": load_start, "load_average_end": load_end, "wall_s": wall,
        "model": {"kind": "resdyad", "features_shape": [512, 8, 8], "width": 128,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "macs_per_pair": macs,
        "flop_bound_speedup": macs["total"] / macs["rest"],
        "n": n, "chunk": args.chunk, "shortlist": k,
        "calibration_naive_pairs_per_s": naive_rate_cal,
        "prepare_db_s": t_prep_db, "prepare_query_s": t_prep_q, "archive_norms_s": t_prep_sq,
        "euclidean_shortlist_s": t_euclid, "euclidean_shortlist_with_norms_s": t_euclid_norms,
        "naive_pairs_per_s": n / t_naive, "fast_pairs_per_s": n / t_fast,
        "speedup_exact": t_naive / t_fast,
        "max_abs_diff": max_diff, "max_abs_diff_shortlist": sl_diff,
        "max_abs_diff_ok": max_diff < MAX_DIFF and sl_diff < MAX_DIFF,
        "probability_range": [float(naive.min()), float(naive.max())],
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render_md(result))
    print(args.out.with_suffix(".md").read_text())
    return 0 if result["max_abs_diff_ok"] else 1


def render_md(r: dict[str, Any]) -> str:
    m = r["macs_per_pair"]
    k = r["shortlist"]
    lines = [
        "# Matching discriminator: fast pair scoring vs the whole network on every pair",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {r['cpu']}, {r['cpu_count']} cores; torch {r['torch']} on {r['threads']} thread(s), "
        f"Python {r['python']}.  ",
        f"Load average (1/5/15 min) at start {', '.join(f'{x:.1f}' for x in r['load_average_start'])}, at end "
        f"{', '.join(f'{x:.1f}' for x in r['load_average_end'])}: a long training benchmark was running in the "
        "background on the same 2 cores, so absolute rates are low and noisy; naive and fast were timed "
        "alternately on the same chunks so that their ratio is fairer than either rate.  ",
        f"Total wall time {r['wall_s']:.0f} s.",
        "",
        f"Model: ResDyadDML, inputs 8x8x512 per image (concatenation 8x8x1024), width 128, random seeded "
        f"weights and BN statistics ({r['model']['parameters']:,} parameters), eval mode, `torch.inference_mode`. "
        f"One query against N = {r['n']:,} archive items (chosen so that the naive path takes about 25 s), "
        f"timed in chunks of {r['chunk']} items.",
        "",
        "| method | pairs scored | time s | archive items / s | speed-up vs naive |",
        "|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['method']} | {row['pairs_scored']:,} | {row['seconds']:.3f} | "
                     f"{row['archive_items_per_s']:,.0f} | {row['speedup_vs_naive']:.1f}x |")
    ok = "passes" if r["max_abs_diff_ok"] else "FAILS"
    lines += [
        "",
        f"One-off costs: `prepare_db` on the {r['n']:,} items {r['prepare_db_s']:.2f} s "
        f"({r['n'] / r['prepare_db_s']:,.0f} items/s, once per archive, reused by every query), "
        f"`prepare_query` {1000 * r['prepare_query_s']:.1f} ms; squared norms of the raw 32,768-d archive rows "
        f"{1000 * r['archive_norms_s']:.0f} ms (once per archive). Euclidean shortlist of {k} for one query: "
        f"{1000 * r['euclidean_shortlist_s']:.1f} ms with the archive norms precomputed (one matrix-vector "
        f"product over the archive, memory-bound), {1000 * r['euclidean_shortlist_with_norms_s']:.1f} ms "
        f"computing them.",
        "",
        f"Agreement: max |P_fast - P_naive| = {r['max_abs_diff']:.2e} over all {r['n']:,} pairs and "
        f"{r['max_abs_diff_shortlist']:.2e} on the shortlisted pairs (limit {MAX_DIFF:g}: {ok}); "
        f"probabilities ranged over [{r['probability_range'][0]:.3f}, {r['probability_range'][1]:.3f}].",
        "",
        "## Why exact scoring cannot gain 20x",
        "",
        f"Multiply-adds per pair (forward hooks on every convolution and linear layer): first convolution "
        f"{m['first_conv'] / 1e6:.1f} M, everything after it {m['rest'] / 1e6:.1f} M, total {m['total'] / 1e6:.1f} M. "
        f"Factoring the first convolution removes it from the per-pair work but leaves the residual dyad "
        f"(two 3x3 convolutions of 128 channels at 8x8, three at 4x4), the last convolution and the fully "
        f"connected layer, which are non-linear in the pair and must run on every pair. The exact speed-up is "
        f"therefore bounded by total / rest = {r['flop_bound_speedup']:.2f}x at equal arithmetic efficiency; "
        f"measured: {r['speedup_exact']:.2f}x ({100 * r['speedup_exact'] / r['flop_bound_speedup']:.0f} % of "
        f"that bound: the per-pair convolutions on small 8x8 and 4x4 maps of 128 channels are less efficient "
        f"per multiply-add than the first convolution on 1024 input channels, the prepared features' "
        f"channels-last layout offsets that, and the naive path also builds the 8x8x1024 concatenation per "
        f"pair, so the ratio can land on either side of the bound). The 20x aim is reached only with a "
        f"Euclidean shortlist, which "
        f"changes the ranking beyond its first {k} items (they keep their Euclidean order) and whose recall "
        f"bounds what the discriminator can find.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
