"""Feature-extraction throughput: `landlens features extract` against a naive loop.

Both run in this one process run, on the same images, the same model and the same weights:

- naive: PIL open + torchvision transforms (Resize, CenterCrop, ToTensor, Normalize), batches
  of 32, default (NCHW) memory format, eager model under ``torch.no_grad``, one process;
- landlens: the ``landlens features extract`` command (worker-process decoding, channels-last,
  inference mode, traced and frozen graph), timed end to end as a subprocess, model loading
  included, and its own extraction-loop rate as recorded in the store.

The share of the machine's compute used is model FLOPs x images/s over the GFLOP/s of a large
dense 3x3 convolution measured here (the best this CPU does on the operation CNNs are made of).

Usage:
    python benchmarks/extract_throughput.py [--data ../shared/data/UCMerced_LandUse]
        [--backbone tf_efficientnet_lite0] [--limit N] [--optimize jit compile] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/UCMerced_LandUse")
    ap.add_argument("--dataset", default="ucmerced")
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--weights", default="auto")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N images")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--optimize", nargs="+", default=["jit", "compile"], choices=["none", "jit", "compile", "auto"])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    args = ap.parse_args()

    from landlens import __version__
    from landlens.data.folder import scan_folder
    from landlens.models.registry import create_backbone

    ds = scan_folder(args.data, args.dataset)
    if args.limit:
        ds = ds.subset(range(min(args.limit, len(ds))))
    paths = [ds.absolute_path(i) for i in range(len(ds))]
    bb = create_backbone(args.backbone, args.weights)
    pre = bb.preprocessing
    print(f"{len(paths)} images, {bb.name} ({bb.weights.source}), input {pre.input_size}, {torch.get_num_threads()} threads")

    gflop_img = model_gflops(bb, pre.input_size)
    peak = conv_gflops()
    print(f"model {gflop_img:.3f} GFLOP/image; dense conv {peak:.1f} GFLOP/s")

    work = Path(tempfile.mkdtemp(prefix="landlens-bench-"))
    try:
        # the same image list as the naive loop: a folder of links when --limit is used
        data_dir = args.data
        if args.limit:
            data_dir = work / "data"
            for p, rel in zip(paths, ds.paths):
                (data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                os.symlink(p, data_dir / rel)
        runs = {}
        for mode in args.optimize:
            store = work / f"store-{mode}"
            cmd = [sys.executable, "-m", "landlens.cli.main", "features", "extract", str(data_dir),
                   "--backbone", args.backbone, "--weights", args.weights, "--out", str(store), "--quiet",
                   "--optimize", mode]
            if args.workers is not None:
                cmd += ["--workers", str(args.workers)]
            if not args.limit:
                cmd += ["--dataset", args.dataset]
            # a cold compiler cache, so compilation time is counted as a first-time user pays it
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor-{mode}")}
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env)
            cli_s = time.perf_counter() - t0
            meta = json.loads((store / "meta.json").read_text())
            last = meta["last_run"]
            runs[mode] = {"cli_seconds": cli_s, "loop_rate": last["images_per_second"],
                          "loop_seconds": last["seconds"] - last["prepare_seconds"],
                          "prepare_seconds": last["prepare_seconds"], "features": np.load(store / "features.npy")}
        naive_s, naive_feats = naive_loop(paths, bb.body, pre)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = len(paths)
    naive_rate = n / naive_s
    result = {
        "command": "python benchmarks/extract_throughput.py " + " ".join(sys.argv[1:]),
        "landlens_version": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "cores": os.cpu_count(), "images": n, "backbone": bb.name, "weights": bb.weights.to_dict(),
        "input_size": pre.input_size, "model_gflop_per_image": round(gflop_img, 4),
        "dense_conv_gflops": round(peak, 2),
        "naive": {"seconds": round(naive_s, 2), "images_per_second": round(naive_rate, 2),
                  "compute_share": round(gflop_img * naive_rate / peak, 3)},
        "landlens": {},
    }
    rows = [f"| naive loop (PIL + torchvision, batch 32, NCHW, eager, 1 process) | {naive_s:.1f} | {naive_rate:.1f} "
            f"| 1.00x | {100 * result['naive']['compute_share']:.0f}% |"]
    for mode, r in runs.items():
        cos = (r["features"] * naive_feats).sum(1) / (
            np.linalg.norm(r["features"], axis=1) * np.linalg.norm(naive_feats, axis=1))
        e2e = n / r["cli_seconds"]
        result["landlens"][mode] = {
            "end_to_end_seconds": round(r["cli_seconds"], 2), "end_to_end_images_per_second": round(e2e, 2),
            "prepare_seconds": r["prepare_seconds"], "loop_seconds": round(r["loop_seconds"], 2),
            "loop_images_per_second": r["loop_rate"],
            "speedup_end_to_end": round(e2e / naive_rate, 2), "speedup_loop": round(r["loop_rate"] / naive_rate, 2),
            "compute_share": round(gflop_img * r["loop_rate"] / peak, 3),
            "feature_agreement_min_cosine": round(float(cos.min()), 6),
        }
        m = result["landlens"][mode]
        rows.append(f"| `landlens features extract --optimize {mode}`, end to end (start-up, model load, "
                    f"{'compilation' if mode == 'compile' else 'tracing'} included) | {r['cli_seconds']:.1f} | {e2e:.1f} "
                    f"| {m['speedup_end_to_end']:.2f}x | - |")
        rows.append(f"| `landlens features extract --optimize {mode}`, extraction loop (after {r['prepare_seconds']:.0f} s "
                    f"{'compiling' if mode == 'compile' else 'tracing'}) | {r['loop_seconds']:.1f} | "
                    f"{r['loop_rate']:.1f} | {m['speedup_loop']:.2f}x | {100 * m['compute_share']:.0f}% |")
    table = "| method | seconds | images/s | vs naive | share of conv peak |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    agree = ", ".join(f"{k} {v['feature_agreement_min_cosine']}" for k, v in result["landlens"].items())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"extract_throughput_{bb.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    header = (f"# Feature extraction throughput: {bb.name}\n\n"
              f"Command: `{result['command']}`  \n"
              f"Machine: {result['cores']} cores, torch {torch.__version__}, {result['threads']} threads; "
              f"model {gflop_img:.3f} GFLOP/image at {pre.input_size} px; dense 3x3 conv peak measured "
              f"{peak:.1f} GFLOP/s.  \n"
              f"{n} images. Features agree with the naive loop (min cosine over images): {agree}.\n\n")
    (args.out / f"extract_throughput_{bb.name}.md").write_text(header + table)
    print(header + table)


if __name__ == "__main__":
    main()
