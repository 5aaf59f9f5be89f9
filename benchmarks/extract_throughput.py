"""Feature-extraction throughput: `landlens features extract` against a naive loop, and where the
end-to-end time goes.

All in this one process run, on the same images, the same model and the same weights:

- naive: PIL open + torchvision transforms (Resize, CenterCrop, ToTensor, Normalize), batches
  of 32, default (NCHW) memory format, eager model under ``torch.no_grad``, one process. Its
  features are the eager reference every other path is compared with (max abs difference,
  min cosine);
- landlens: the ``landlens features extract --optimize MODE`` command (worker-process decoding,
  channels-last, inference mode; ``jit`` traced and frozen, ``compile`` torch.compile, ``onnx``
  ONNX Runtime), timed end to end as a subprocess, model loading included, and its own
  extraction-loop rate as recorded in the store (a mode named twice in ``--optimize`` runs twice);
- the breakdown: decode and resize+crop alone (the one decode path, one process), the
  normalisation of a batch, the model alone on a decoded batch of ``--batch-size`` in every
  form (eager NCHW and channels-last, each ``--optimize`` mode), and, with the fastest mode
  (``onnx`` when asked for), normalisation + model on a batch already in memory and the
  extraction loop in this process with 0, 1 and the default number of decode workers;
- ``--int8``: static post-training int8 quantisation of the exported ONNX graph
  (``onnxruntime.quantization``, QDQ and QOperator, per-channel weights, min-max calibration on
  a seeded sample of the *training* part of the UC Merced 70/10/20 seed-0 split), the model alone
  and the extraction loop (the engine's decode workers), and the UC Merced archive mAP of its
  features beside the fp32 ONNX Runtime and eager ones (``landlens.retrieval.evaluate``, cosine,
  every image querying the other 2,099).

The share of the machine's compute used is model FLOPs x images/s over the GFLOP/s of a large
dense 3x3 convolution measured here with torch (the best torch does on the operation CNNs are
made of; another runtime can exceed it).

Usage:
    python benchmarks/extract_throughput.py [--data ../shared/data/UCMerced_LandUse] [--dataset ucmerced]
        [--backbone tf_efficientnet_lite0] [--limit N | --sample N [--seed S]] [--batch-size 64]
        [--optimize jit compile onnx [onnx]] [--int8] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def cpu_mark() -> tuple[float, float]:
    """(CPU-seconds every process of the machine has used, CPU-seconds this process and its
    finished children have used): two marks tell how much other work shared the cores between them."""
    import resource

    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    own = sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))
    return busy, own


def others_since(mark: tuple[float, float]) -> float:
    """CPU-seconds other processes used since ``mark`` (:func:`cpu_mark`)."""
    busy, own = cpu_mark()
    return round(max(0.0, (busy - mark[0]) - (own - mark[1])), 1)


def conv_gflops(seconds: float = 3.0) -> float:
    """GFLOP/s of a 3x3, 128->128 convolution on a 32x128x56x56 batch (channels-last, fp32)."""
    conv = torch.nn.Conv2d(128, 128, 3, padding=1, bias=False).eval().to(memory_format=torch.channels_last)
    x = torch.randn(32, 128, 56, 56).contiguous(memory_format=torch.channels_last)
    flops = 2 * 32 * 128 * 128 * 9 * 56 * 56
    best = 0.0
    with torch.inference_mode():
        conv(x)
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            conv(x)
            best = max(best, flops / (time.perf_counter() - t0) / 1e9)
    return best


def model_gflops(model: torch.nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model(torch.randn(1, 3, size, size))
    return fc.get_total_flops() / 1e9


def naive_loop(paths: list[Path], model: torch.nn.Module, pre) -> tuple[float, np.ndarray]:
    from torchvision import transforms as T

    interp = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[pre.interpolation]
    if pre.resize_mode == "crop":
        steps = [T.Resize(pre.resize_size, interpolation=interp), T.CenterCrop(pre.input_size)]
    else:
        steps = [T.Resize((pre.input_size, pre.input_size), interpolation=interp)]
    tf = T.Compose([*steps, T.ToTensor(), T.Normalize(pre.mean, pre.std)])
    model = model.eval()
    out = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(paths), 32):
            batch = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[s:s + 32]])
            out.append(model(batch).numpy())
    return time.perf_counter() - t0, np.concatenate(out)


def agreement(feats: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Max abs difference and min cosine (over images) of ``feats`` against ``ref``."""
    cos = (feats * ref).sum(1) / (np.linalg.norm(feats, axis=1) * np.linalg.norm(ref, axis=1))
    return {"max_abs_diff": float(np.abs(feats - ref).max()), "min_cosine": round(float(cos.min()), 6)}


def decode_costs(paths: list[Path], pre, n: int = 300) -> dict[str, float]:
    """Milliseconds per image, one process, of the one decode path's two steps on ``n`` images
    (after a warm-up pass, so the files are in the page cache)."""
    from landlens.models.preprocessing import decode_image, resize_and_crop, to_uint8_array

    sample = paths[:n]
    for p in sample:
        decode_image(p, pre)
    t0 = time.perf_counter()
    imgs = [decode_image(p, pre) for p in sample]
    t1 = time.perf_counter()
    arrays = [to_uint8_array(resize_and_crop(im, pre)) for im in imgs]
    t2 = time.perf_counter()
    return {"images": len(sample), "decoded_size": list(imgs[0].size), "decode_ms": 1e3 * (t1 - t0) / len(sample),
            "resize_crop_ms": 1e3 * (t2 - t1) / len(sample), "input_shape": list(arrays[0].shape)}


def best_rate(forward: Callable, x: torch.Tensor, reps: int = 5) -> dict[str, float]:
    """Images/s of ``forward`` on the batch ``x`` after one warm-up call: best and median of ``reps``."""
    times = []
    with torch.inference_mode():
        forward(x)
        for _ in range(reps):
            t0 = time.perf_counter()
            forward(x)
            times.append(time.perf_counter() - t0)
    return {"best": len(x) / min(times), "median": len(x) / float(np.median(times))}


def model_rates(bb, batch: torch.Tensor, modes: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, Callable]]:
    """The model alone on one decoded, normalised batch: eager NCHW, eager channels-last, and each
    ``--optimize`` mode (prepared, and checked against eager, by ``optimize_for_inference``).
    Returns the rates and the prepared forward passes."""
    from landlens.features.inference import optimize_for_inference

    out: dict[str, dict[str, Any]] = {}
    prepared: dict[str, Callable] = {}
    eager = bb.eval()
    out["eager NCHW"] = best_rate(eager, batch.contiguous())
    out["eager channels-last"] = best_rate(eager.to(memory_format=torch.channels_last), batch)
    for mode in dict.fromkeys(modes):
        if mode in ("none", "auto"):
            continue
        t0 = time.perf_counter()
        prepared[mode] = optimize_for_inference(bb, batch, mode)  # type: ignore[arg-type]
        out[mode] = {**best_rate(prepared[mode], batch), "prepare_seconds": time.perf_counter() - t0}
    bb.to(memory_format=torch.contiguous_format)  # as it was: the naive loop runs it after this
    return out, prepared


def loop_study(ds, pre, forward: Callable, u8: torch.Tensor, batch_size: int,
               workers: list[int]) -> dict[str, Any]:
    """What the extraction loop adds to the model: ``forward`` after normalising the decoded
    batch ``u8`` each time (no decoding), then the loop over ``ds`` with each number of decode
    worker processes (0: decoding in the main process, between batches)."""
    from landlens.models.preprocessing import normalize_batch

    out: dict[str, Any] = {"in_memory": best_rate(lambda b: forward(normalize_batch(b, pre)).numpy(), u8)}
    for w in dict.fromkeys(workers):
        seconds, feats = loop_features(ds.root, list(ds.paths), pre, forward, batch_size, w)
        out[f"workers {w}"] = len(feats) / seconds
    return out


def loop_features(root: Path, rel_paths: list[str], pre, forward: Callable, batch_size: int,
                  workers: int) -> tuple[float, np.ndarray]:
    """The extraction loop of the local engine with another forward pass: worker processes decode
    (:class:`~landlens.features.extract.DecodeDataset`), the main process normalises and runs
    ``forward``. Returns seconds and features (images that cannot be read are an error here)."""
    from torch.utils.data import DataLoader

    from landlens.features.extract import DecodeDataset
    from landlens.models.preprocessing import normalize_batch

    def collate(items):
        for a, i, reason in items:
            if a is None:
                raise RuntimeError(f"{rel_paths[i]}: {reason}")
        return torch.from_numpy(np.stack([a for a, _, _ in items]))

    loader = DataLoader(DecodeDataset(root, rel_paths, pre), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate, prefetch_factor=4 if workers > 0 else None)
    out = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x in loader:
            out.append(forward(normalize_batch(x, pre)).float().flatten(1).numpy())
    return time.perf_counter() - t0, np.concatenate(out)


def archive_map(features: np.ndarray, ds) -> float:
    """UC Merced ``archive`` protocol mAP (%): every image queries all the others, cosine."""
    from landlens.features.store import FeatureSet
    from landlens.retrieval.evaluate import evaluate

    fs = FeatureSet(features.astype(np.float32), list(ds.paths), np.asarray(ds.labels), list(ds.classes),
                    {"dataset": {"name": "ucmerced"}}, np.ones(len(ds.paths), bool))
    return 100 * float(evaluate(fs, distance="cosine", protocol="archive").metrics["mAP"])


def int8_study(bb, ds, batch: torch.Tensor, work: Path, batch_size: int, workers: int,
               calibration: int) -> dict[str, Any]:
    """Static int8 quantisation of the exported graph (module docstring): for each format, the
    model alone, the extraction loop over ``ds`` and its features."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    from landlens.data.splits import make_split
    from landlens.features.inference import export_onnx, onnx_forward
    from landlens.models.preprocessing import load_resized, normalize_batch

    pre = bb.preprocessing
    fp32 = export_onnx(bb.eval(), batch, work / "fp32.onnx")
    whole = work / "fp32-whole.onnx"  # weights inside the file: the quantisation tools want one file
    onnx.save(onnx.load(str(fp32)), str(whole), save_as_external_data=False)
    prepped = work / "fp32-prep.onnx"
    quant_pre_process(str(whole), str(prepped), skip_symbolic_shape=True)
    split = make_split(ds.paths, ds.labels, ds.classes, ratios="70/10/20", seed=0, dataset="ucmerced")
    train = [p for p, _ in split.parts["train"]]
    chosen = sorted(random.Random(0).sample(train, calibration))

    class Reader(CalibrationDataReader):
        """Batches of 16 seeded training images, as the exported graph takes them (NHWC)."""

        def __init__(self) -> None:
            self.batches = iter(range(0, len(chosen), 16))

        def get_next(self):
            s = next(self.batches, None)
            if s is None:
                return None
            x = torch.from_numpy(np.stack([load_resized(ds.root / p, pre) for p in chosen[s:s + 16]]))
            return {"x": normalize_batch(x, pre).permute(0, 2, 3, 1).contiguous().numpy()}

    out: dict[str, Any] = {"calibration_images": len(chosen), "calibration_part": "train (UC Merced 70/10/20, seed 0)"}
    for fmt in ("QDQ", "QOperator"):
        path = work / f"int8-{fmt}.onnx"
        t0 = time.perf_counter()
        logging.disable(logging.WARNING)  # a warning per tensor it leaves in float (the input's transpose)
        try:
            quantize_static(str(prepped), str(path), Reader(), quant_format=getattr(QuantFormat, fmt),
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
        finally:
            logging.disable(logging.NOTSET)
        quant_s = time.perf_counter() - t0
        forward = onnx_forward(path)
        rate = best_rate(forward, batch)
        seconds, feats = loop_features(ds.root, list(ds.paths), pre, forward, batch_size, workers)
        out[fmt] = {"quantise_seconds": quant_s, "model": rate, "loop_seconds": seconds,
                    "loop_images_per_second": len(feats) / seconds, "features": feats}
    return out


def cli_run(mode: str, data_dir: Path, store: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One ``landlens features extract --optimize mode`` subprocess, timed end to end, run in
    ``work``: its ONNX cache (``runs/onnx``) starts empty, so a mode's first run exports and a
    second one loads the exported graph, as a user's first and later runs do."""
    cmd = [sys.executable, "-m", "landlens.cli.main", "features", "extract", str(Path(data_dir).resolve()),
           "--backbone", args.backbone, "--weights", args.weights, "--out", str(store), "--quiet",
           "--optimize", mode, "--batch-size", str(args.batch_size)]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    if data_dir == args.data:
        cmd += ["--dataset", args.dataset]
    # a cold compiler cache, so compilation time is counted as a first-time user pays it
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor-{store.name}")}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=work)
    cli_s = time.perf_counter() - t0
    last = json.loads((store / "meta.json").read_text())["last_run"]
    return {"cli_seconds": cli_s, "loop_rate": last["images_per_second"],
            "loop_seconds": last["seconds"] - last["prepare_seconds"], "prepare_seconds": last["prepare_seconds"],
            "features": np.load(store / "features.npy")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/UCMerced_LandUse")
    ap.add_argument("--dataset", default="ucmerced")
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--weights", default="auto")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N images")
    ap.add_argument("--sample", type=int, default=None, help="use a seeded random sample of N images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--optimize", nargs="+", default=["jit", "compile", "onnx"],
                    choices=["none", "jit", "compile", "onnx", "auto"], help="a mode named twice runs twice")
    ap.add_argument("--int8", action="store_true", help="int8 quantisation: speed and archive mAP (UC Merced)")
    ap.add_argument("--calibration", type=int, default=128, help="training images calibrating int8")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    args = ap.parse_args()

    from landlens import __version__
    from landlens.data.folder import scan_folder
    from landlens.features.extract import default_workers
    from landlens.models.preprocessing import load_resized, normalize_batch
    from landlens.models.registry import create_backbone

    ds = scan_folder(args.data, args.dataset)
    if args.int8 and (args.limit or args.sample or args.dataset != "ucmerced"):
        raise SystemExit("--int8 reports the UC Merced archive mAP: the whole UC Merced folder, no --limit/--sample")
    if args.limit:
        ds = ds.subset(range(min(args.limit, len(ds))))
    elif args.sample:
        ds = ds.subset(sorted(random.Random(args.seed).sample(range(len(ds)), min(args.sample, len(ds)))))
    paths = [ds.absolute_path(i) for i in range(len(ds))]
    bb = create_backbone(args.backbone, args.weights)
    pre = bb.preprocessing
    workers = default_workers() if args.workers is None else args.workers
    print(f"{len(paths)} images, {bb.name} ({bb.weights.source}), input {pre.input_size}, "
          f"{torch.get_num_threads()} threads, {workers} decode workers", flush=True)

    gflop_img = model_gflops(bb, pre.input_size)
    others: dict[str, float] = {}  # CPU-seconds other processes used during each part (a shared machine)
    mark = cpu_mark()
    peak = conv_gflops()
    others["conv peak"] = others_since(mark)
    print(f"model {gflop_img:.3f} GFLOP/image; dense conv {peak:.1f} GFLOP/s", flush=True)

    # the breakdown: decode alone, normalisation, the model alone on a batch of real images
    mark = cpu_mark()
    decode = decode_costs(paths, pre)
    u8 = torch.from_numpy(np.stack([load_resized(p, pre) for p in paths[:args.batch_size]]))
    with torch.inference_mode():
        batch = normalize_batch(u8, pre)
        t0 = time.perf_counter()
        for _ in range(10):
            normalize_batch(u8, pre)
        norm_ms = 1e3 * (time.perf_counter() - t0) / 10
    models, prepared = model_rates(bb, batch, list(args.optimize))
    fastest = "onnx" if "onnx" in prepared else next(iter(prepared), None)
    loops = (loop_study(ds, pre, prepared[fastest], u8, args.batch_size, [0, 1, workers])
             if fastest is not None else None)
    del prepared
    others["breakdown"] = others_since(mark)
    print(json.dumps({"decode": decode, "normalize_batch_ms": norm_ms, "model": models, "loops": loops,
                      "others_cpu_seconds": others}, indent=1), flush=True)

    work = Path(tempfile.mkdtemp(prefix="landlens-bench-"))
    try:
        # the same image list as the naive loop: a folder of links when a subset is used
        data_dir = args.data
        if args.limit or args.sample:
            data_dir = work / "data"
            for p, rel in zip(paths, ds.paths):
                (data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                os.symlink(p.resolve(), data_dir / rel)
        runs: dict[str, list[dict[str, Any]]] = {}
        for mode in args.optimize:
            r = len(runs.setdefault(mode, []))
            mark = cpu_mark()
            runs[mode].append(cli_run(mode, data_dir, work / f"store-{mode}-{r}", args, work))
            runs[mode][-1]["others_cpu_seconds"] = others_since(mark)
            print(f"{mode} run {r + 1}: {runs[mode][-1]['cli_seconds']:.1f} s end to end, "
                  f"{runs[mode][-1]['loop_rate']} img/s loop", flush=True)
        mark = cpu_mark()
        int8 = int8_study(bb, ds, batch, work, args.batch_size, workers, args.calibration) if args.int8 else None
        if int8 is not None:
            others["int8"] = others_since(mark)
        mark = cpu_mark()
        naive_s, naive_feats = naive_loop(paths, bb.body, pre)
        others["naive"] = others_since(mark)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = len(paths)
    naive_rate = n / naive_s

    def share(rate: float) -> float:
        return round(gflop_img * rate / peak, 3)

    result: dict[str, Any] = {
        "command": "python benchmarks/extract_throughput.py " + shlex.join(sys.argv[1:]),
        "landlens_version": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "cores": os.cpu_count(), "decode_workers": workers, "batch_size": args.batch_size, "images": n,
        "dataset": args.dataset, "backbone": bb.name, "weights": bb.weights.to_dict(), "input_size": pre.input_size,
        "model_gflop_per_image": round(gflop_img, 4), "dense_conv_gflops": round(peak, 2),
        "breakdown": {"decode": decode, "normalize_batch_ms": norm_ms,
                      "model_alone": {k: {**v, "compute_share": share(v["best"])} for k, v in models.items()},
                      "loop_mode": fastest, "loops": loops},
        "naive": {"seconds": round(naive_s, 2), "images_per_second": round(naive_rate, 2),
                  "compute_share": share(naive_rate)},
        "landlens": {}, "others_cpu_seconds": others,
    }
    try:
        import onnxruntime

        result["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    rows = [f"| naive loop (PIL + torchvision, batch 32, NCHW, eager, 1 process) | {naive_s:.1f} | {naive_rate:.1f} "
            f"| 1.00x | {100 * result['naive']['compute_share']:.0f}% | eager reference | {others['naive']} |"]
    for mode, mode_runs in runs.items():
        result["landlens"][mode] = []
        for r, run in enumerate(mode_runs):
            e2e = n / run["cli_seconds"]
            agree = agreement(run["features"], naive_feats)
            m = {"end_to_end_seconds": round(run["cli_seconds"], 2), "end_to_end_images_per_second": round(e2e, 2),
                 "prepare_seconds": run["prepare_seconds"], "loop_seconds": round(run["loop_seconds"], 2),
                 "loop_images_per_second": run["loop_rate"], "speedup_end_to_end": round(e2e / naive_rate, 2),
                 "speedup_loop": round(run["loop_rate"] / naive_rate, 2), "compute_share": share(run["loop_rate"]),
                 "other_seconds": round(run["cli_seconds"] - run["loop_seconds"] - run["prepare_seconds"], 2),
                 "vs_eager": agree, "others_cpu_seconds": run["others_cpu_seconds"]}
            result["landlens"][mode].append(m)
            prep = {"compile": "compilation", "onnx": "ONNX export" if r == 0 else "loading the exported ONNX graph"
                    }.get(mode, "tracing")
            label = f"`--optimize {mode}`" + (f" (run {r + 1})" if len(mode_runs) > 1 else "")
            vs = f"{agree['max_abs_diff']:.1e} / {agree['min_cosine']:.6f}"
            rows.append(f"| {label}, end to end (start-up, model load, {prep} included) | {run['cli_seconds']:.1f} "
                        f"| {e2e:.1f} | {m['speedup_end_to_end']:.2f}x | - | {vs} | {run['others_cpu_seconds']} |")
            rows.append(f"| {label}, extraction loop (after {run['prepare_seconds']:.1f} s {prep}) "
                        f"| {run['loop_seconds']:.1f} | {run['loop_rate']:.1f} | {m['speedup_loop']:.2f}x "
                        f"| {100 * m['compute_share']:.0f}% | {vs} | (same run) |")
    table = ("| method | seconds | images/s | vs naive | share of conv peak | vs eager: max abs diff / min cosine "
             "| CPU-s used by other processes meanwhile |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")

    d = result["breakdown"]["decode"]
    brows = [f"| decode (`decode_image`, {d['decoded_size'][0]}x{d['decoded_size'][1]} files) | {d['decode_ms']:.2f} ms "
             f"| {1e3 / d['decode_ms']:.0f} | - |",
             f"| resize + crop to {pre.input_size} (`resize_and_crop`, {pre.interpolation}) | {d['resize_crop_ms']:.2f} ms "
             f"| {1e3 / d['resize_crop_ms']:.0f} | - |",
             f"| normalise a batch (`normalize_batch`, uint8 NHWC -> float channels-last) | "
             f"{norm_ms / args.batch_size:.2f} ms | {1e3 * args.batch_size / norm_ms:.0f} | - |"]
    for name, v in result["breakdown"]["model_alone"].items():
        prep = f" (prepared in {v['prepare_seconds']:.1f} s)" if "prepare_seconds" in v else ""
        brows.append(f"| model alone, {name}{prep} | {1e3 / v['best']:.2f} ms | {v['best']:.1f} "
                     f"(median {v['median']:.1f}) | {100 * v['compute_share']:.0f}% |")
    if loops is not None:
        v = loops["in_memory"]
        brows.append(f"| {fastest}: normalise + model, batch already decoded in memory | {1e3 / v['best']:.2f} ms "
                     f"| {v['best']:.1f} (median {v['median']:.1f}) | {100 * share(v['best']):.0f}% |")
        for k, rate in loops.items():
            if k.startswith("workers"):
                where = "in the main process, between batches" if k == "workers 0" else f"in {k.split()[1]} process(es)"
                brows.append(f"| {fastest}: extraction loop, decoding {where} ({n} images) | {1e3 / rate:.2f} ms "
                             f"| {rate:.1f} | {100 * share(rate):.0f}% |")
    breakdown = ("| step (per image) | time | images/s | share of conv peak |\n|---|---|---|---|\n"
                 + "\n".join(brows) + "\n")

    int8_md = ""
    if int8 is not None:
        eager_map = archive_map(naive_feats, ds)
        fp32 = runs.get("onnx", [None])[0]
        result["int8"] = {"calibration_images": int8["calibration_images"], "calibration_part": int8["calibration_part"],
                          "eager_archive_map": round(eager_map, 2)}
        irows = [f"| eager torch (the naive loop's features) | - | - | {eager_map:.2f} | - |"]
        if fp32 is not None:
            fp32_map = archive_map(fp32["features"], ds)
            v = models["onnx"]
            result["int8"]["onnx_fp32_archive_map"] = round(fp32_map, 2)
            irows.append(f"| ONNX Runtime fp32 (`--optimize onnx` store) | {v['best']:.1f} ({100 * share(v['best']):.0f}%) "
                         f"| {fp32['loop_rate']:.1f} | {fp32_map:.2f} | {fp32_map - eager_map:+.2f} |")
        for fmt in ("QDQ", "QOperator"):
            q = int8[fmt]
            q_map = archive_map(q["features"], ds)
            agree = agreement(q["features"], naive_feats)
            result["int8"][fmt] = {"model_images_per_second": q["model"], "compute_share": share(q["model"]["best"]),
                                   "loop_images_per_second": round(q["loop_images_per_second"], 2),
                                   "quantise_seconds": round(q["quantise_seconds"], 1), "archive_map": round(q_map, 2),
                                   "vs_eager": agree}
            irows.append(f"| ONNX Runtime int8 {fmt} (U8 activations, S8 per-channel weights) | "
                         f"{q['model']['best']:.1f} ({100 * share(q['model']['best']):.0f}%) | "
                         f"{q['loop_images_per_second']:.1f} | {q_map:.2f} | {q_map - eager_map:+.2f} |")
        int8_md = (f"\n## int8 (static post-training quantisation, {int8['calibration_images']} calibration images "
                   f"from the {int8['calibration_part']})\n\n"
                   "| model | model alone, images/s (share of conv peak) | extraction loop, images/s | "
                   "UC Merced archive mAP | vs eager |\n|---|---|---|---|---|\n" + "\n".join(irows) + "\n")

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"extract_throughput_{bb.name}" + ("" if args.dataset == "ucmerced" else f"_{args.dataset}")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    during_int8 = f"{others['int8']} during the int8 study and " if "int8" in others else "and "
    header = (f"# Feature extraction throughput: {bb.name}, {args.dataset}\n\n"
              f"Command: `{result['command']}`  \n"
              f"Machine: {result['cores']} cores, torch {torch.__version__}, {result['threads']} threads, "
              f"onnxruntime {result.get('onnxruntime', '-')}; {workers} decode workers, batch {args.batch_size}; "
              f"model {gflop_img:.3f} GFLOP/image at {pre.input_size} px; dense 3x3 conv peak measured "
              f"{peak:.1f} GFLOP/s (torch).  \n"
              f"{n} images. Timings were taken on a machine that may have been shared with other work: other "
              f"processes used {others['conv peak']} CPU-s during the conv-peak measurement, {others['breakdown']} "
              f"during the breakdown, {during_int8}{others['naive']} during the "
              f"naive loop (the machine has {os.cpu_count()} CPU-s per second).\n\n")
    md = header + "## End to end\n\n" + table + "\n## Where the time goes\n\n" + breakdown + int8_md
    (args.out / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
