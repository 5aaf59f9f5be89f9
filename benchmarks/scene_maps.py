"""Maps of whole scenes: land-use maps measured on mosaics of labelled chips, and the real scenes.

Part ``mosaic``: georeferenced mosaics (EPSG:32632, 10 m, uint8 RGB GeoTIFF) assembled from
EuroSAT chips of one part of the run's own 70/20/10 split, 24 x 24 chips of 64 px, in two
layouts: ``chips`` (each chip drawn at random from the part, so every neighbour is another
class most of the time: the hardest case for overlapping windows) and ``parcels`` (2 x 2 chips of
one class, like fields and towns). `landlens scenes classify RUN MOSAIC --chip 64 --stride S` is
scored cell by cell against the known layout, beside the run's accuracy on the same chips read
from their own files (`Predictor`, the path `landlens predict` takes). The stride is chosen on
the **val** part's mosaics; the **test** part's are reported once, for every stride.

Part ``landsat``: the real Landsat 8 scene (30 m, bands blue-green-red, black nodata edge) as a
land-use map from the EuroSAT run. EuroSAT chips are 64 px at 10 m (640 m), so the scene is
resampled to 10 m (``--gsd 10``: GDAL bilinear upsampling, as the scene is coarser) and cut into
64-px chips (640 m, the EuroSAT footprint); ``--bands 3,2,1`` shows red, green, blue and
``--nodata 0`` marks the edge. Time and peak memory (VmHWM of a fresh process) of tiling
and of the map, and of the same map on a mosaic of the scene enlarged 10x (a GDAL VRT of 5 x 2
copies), to show that memory does not grow with the scene.

Part ``similarity``: an archive of the Landsat scene's chips (32 px at 30 m), then
`landlens scenes similarity ARCHIVE @LON,LAT SCENE` for a place in the city and one on the
reservoir; the top-10 search hits of the city chip as GeoJSON.

Usage (RUN from `landlens train run --data ../shared/data/EuroSAT_RGB --split 70/20/10 --out RUN`,
the default recipe: a linear head on the cached default fused features):

    python benchmarks/scene_maps.py mosaic landsat similarity --run runs/bench/default-train-run-eurosat
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EUROSAT = REPO / "../shared/data/EuroSAT_RGB"
LANDSAT = (REPO / "../shared/data/scenes/landsat8_LC08_224078_20200518_bgr_30m.tif").resolve()
WORK = REPO / "runs/bench/scene_maps"
RESULTS = REPO / "benchmarks/results"
GRID = 24
CHIP = 64
STRIDES = (64, 32)
LANDSAT_MAP = ["--gsd", "10", "--chip", "64", "--bands", "3,2,1", "--nodata", "0"]
PLACES = {"city": (-54.6407, -25.5016), "reservoir": (-54.5075, -25.3045)}


# --------------------------------------------------------------------------- measuring


WRAP = r"""
import json, sys, time
t = time.perf_counter()
code = 0
try:
    from landlens.cli.main import cli
    cli.main(args=sys.argv[1:], prog_name="landlens")
except SystemExit as e:
    code = e.code or 0
sys.path.insert(0, "benchmarks")
from measure import peak_rss_mb
print(json.dumps({"seconds": time.perf_counter() - t, "exit": code, "peak_rss_mib": peak_rss_mb()}), file=sys.stderr)
sys.exit(code)
"""


def measured(*args: str) -> tuple[str, dict]:
    """Run `landlens ARGS` in a fresh process: (stdout, {seconds, peak_rss_mib})."""
    print("$ landlens " + " ".join(args), flush=True)
    p = subprocess.run([sys.executable, "-c", WRAP, *args], capture_output=True, text=True, cwd=REPO)
    meta = json.loads(p.stderr.strip().splitlines()[-1])
    if p.returncode != 0:
        raise SystemExit(f"landlens {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return p.stdout, meta


def measured_tiling(scene: Path, settings: dict) -> dict:
    code = (f"import json,sys,time\nsys.path.insert(0, 'benchmarks')\nfrom measure import peak_rss_mb\n"
            f"from landlens.scenes.tiling import tile_scene\nt=time.perf_counter()\n"
            f"tiles=tile_scene({str(scene)!r}, **{settings!r})\n"
            f"print(json.dumps({{'seconds': time.perf_counter()-t, 'chips': len(tiles), 'skipped': tiles.skipped, "
            f"'peak_rss_mib': peak_rss_mb()}}))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- mosaics


def write_mosaic(path: Path, chips: list[Path]) -> None:
    import rasterio
    from affine import Affine
    from PIL import Image

    n = int(round(len(chips) ** 0.5))
    img = np.zeros((3, n * CHIP, n * CHIP), np.uint8)
    for k, p in enumerate(chips):
        r, c = divmod(k, n)
        with Image.open(p) as im:
            img[:, r * CHIP:(r + 1) * CHIP, c * CHIP:(c + 1) * CHIP] = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    prof = {"driver": "GTiff", "width": n * CHIP, "height": n * CHIP, "count": 3, "dtype": "uint8",
            "crs": "EPSG:32632", "transform": Affine(10.0, 0, 500_000.0, 0, -10.0, 5_500_000.0), "tiled": True,
            "compress": "deflate", "photometric": "RGB"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(img)


def layout(paths: list[str], labels: np.ndarray, n_classes: int, kind: str, seed: int) -> tuple[list[Path], np.ndarray]:
    """Chip files row by row and the (GRID, GRID) class layout."""
    rng = np.random.default_rng(seed)
    if kind == "chips":
        pick = rng.choice(len(paths), GRID * GRID, replace=False)
        items = [(int(labels[i]), paths[i]) for i in pick]
    else:  # parcels of 2 x 2 chips of one class
        by_class = {k: [p for p, lab in zip(paths, labels) if lab == k] for k in range(n_classes)}
        items = [(0, "")] * (GRID * GRID)
        for pr in range(GRID // 2):
            for pc in range(GRID // 2):
                k = int(rng.integers(n_classes))
                four = rng.choice(len(by_class[k]), 4, replace=False)
                for q, idx in enumerate(four):
                    r, c = 2 * pr + q // 2, 2 * pc + q % 2
                    items[r * GRID + c] = (k, by_class[k][idx])
    truth = np.array([k for k, _ in items]).reshape(GRID, GRID)
    return [EUROSAT / p for _, p in items], truth


def chip_ci(hits: np.ndarray, seed: int = 0, n_boot: int = 1000) -> tuple[float, float]:
    """95 % percentile bootstrap over chips of the mean per-chip share of correct cells."""
    rng = np.random.default_rng(seed)
    means = hits[rng.integers(0, len(hits), size=(n_boot, len(hits)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def run_mosaic(run: Path) -> dict:
    from landlens.data.splits import SplitManifest
    from landlens.training.landuse import map_accuracy
    from landlens.training.predict import Predictor

    manifest = SplitManifest.load(run / "split.json")
    pred = Predictor(run)
    classes = pred.classes
    if list(manifest.classes) != list(classes):
        raise SystemExit(f"the run's classes {classes} are not its split's {manifest.classes}")
    rows = []
    for part_name in ("val", "test"):
        paths, labels = manifest.part(part_name)
        for kind in ("chips", "parcels"):
            files, truth = layout(paths, labels, len(classes), kind, seed=0)
            mosaic = WORK / f"mosaic_{part_name}_{kind}.tif"
            write_mosaic(mosaic, files)
            t0 = time.perf_counter()
            chip_pred = [classes.index(p.label) for p in pred.predict_paths(files, top_k=1)]
            chip_seconds = time.perf_counter() - t0
            chip_hits = (np.array(chip_pred) == truth.ravel()).astype(float)
            for stride in STRIDES:
                out = WORK / f"mosaic_{part_name}_{kind}_s{stride}.tif"
                stdout, meta = measured("scenes", "classify", str(run), str(mosaic), "--chip", str(CHIP), "--stride",
                                        str(stride), "--out", str(out), "--json", "-q", "--restart")
                rep = json.loads(stdout)
                f = CHIP // stride
                cell_truth = np.repeat(np.repeat(truth, f, 0), f, 1)
                acc = map_accuracy(out, cell_truth, classes)
                import rasterio

                with rasterio.open(out) as src:
                    cells = src.read(1).astype(np.int64)
                per_chip = (cells == cell_truth).reshape(GRID, f, GRID, f).mean((1, 3)).ravel()
                row = {"part": part_name, "layout": kind, "stride": stride, "windows": rep["windows"],
                       "map_accuracy": acc["accuracy"], "map_ci": chip_ci(per_chip), "cells": acc["cells"],
                       "chip_accuracy": float(chip_hits.mean()), "chip_ci": chip_ci(chip_hits),
                       "map_seconds": round(meta["seconds"], 1), "peak_rss_mib": round(meta["peak_rss_mib"]),
                       "chip_seconds": round(chip_seconds, 1)}
                print(f"  {part_name} {kind} stride {stride}: map {100 * row['map_accuracy']:.2f} % "
                      f"chips {100 * row['chip_accuracy']:.2f} % ({row['map_seconds']} s)", flush=True)
                rows.append(row)
                if part_name == "test" and kind == "parcels" and stride == STRIDES[-1]:
                    shutil.copy(out.with_suffix(".png"), RESULTS / "scene_maps_mosaic_test_parcels.png")
    val = {s: np.mean([r["map_accuracy"] for r in rows if r["part"] == "val" and r["stride"] == s]) for s in STRIDES}
    return {"rows": rows, "chosen_stride": int(max(val, key=val.get)), "val_mean": {str(k): v for k, v in val.items()}}


# --------------------------------------------------------------------------- the Landsat scene


def enlarged_vrt(path: Path, scene: Path, across: int = 5, down: int = 2) -> Path:
    """A VRT mosaic of ``across`` x ``down`` copies of ``scene`` side by side (GDAL's XML format)."""
    import rasterio

    with rasterio.open(scene) as src:
        w, h, t, wkt, dtype = src.width, src.height, src.transform, src.crs.to_wkt(), src.dtypes[0]
        count = src.count
    gdal_type = {"uint16": "UInt16", "uint8": "Byte"}[dtype]
    bands = []
    for b in range(1, count + 1):
        sources = "".join(
            f'<SimpleSource><SourceFilename relativeToVRT="0">{scene}</SourceFilename><SourceBand>{b}</SourceBand>'
            f'<SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
            f'<DstRect xOff="{i * w}" yOff="{j * h}" xSize="{w}" ySize="{h}"/></SimpleSource>'
            for j in range(down) for i in range(across))
        bands.append(f'<VRTRasterBand dataType="{gdal_type}" band="{b}">{sources}</VRTRasterBand>')
    from xml.sax.saxutils import escape

    xml = (f'<VRTDataset rasterXSize="{across * w}" rasterYSize="{down * h}"><SRS>{escape(wkt)}</SRS>'
           f"<GeoTransform>{t.c}, {t.a}, 0, {t.f}, 0, {t.e}</GeoTransform>{''.join(bands)}</VRTDataset>")
    path.write_text(xml)
    return path


def run_landsat(run: Path) -> dict:
    out = {}
    settings = {"chip": 64, "gsd": 10.0, "bands": [3, 2, 1], "nodata": 0.0}
    out["tiling"] = measured_tiling(LANDSAT, settings)
    print(f"  tiling: {out['tiling']}", flush=True)
    tif = WORK / "landsat_landuse.tif"
    stdout, meta = measured("scenes", "classify", str(run), str(LANDSAT), *LANDSAT_MAP, "--out", str(tif), "--json",
                            "-q", "--restart")
    rep = json.loads(stdout)
    out["map"] = {"command": f"landlens scenes classify RUN {LANDSAT.name} {' '.join(LANDSAT_MAP)} --out landuse.tif",
                  "seconds": round(meta["seconds"], 1), "peak_rss_mib": round(meta["peak_rss_mib"]),
                  "windows": rep["windows"], "scored": rep["scored"], "cells": rep["cells"], "classes": rep["classes"]}
    shutil.copy(tif.with_suffix(".png"), RESULTS / "scene_maps_landsat_landuse.png")
    shutil.copy(tif.with_suffix(".csv"), RESULTS / "scene_maps_landsat_landuse.csv")
    print(f"  land-use map: {meta}", flush=True)
    # memory against scene size: the native 30 m grid, 1x and 10x
    big = enlarged_vrt(WORK / "landsat_x10.vrt", LANDSAT)
    growth = []
    for name, scene in (("1x", LANDSAT), ("10x", big)):
        tif = WORK / f"landsat_{name}_30m.tif"
        stdout, meta = measured("scenes", "classify", str(run), str(scene), "--chip", "64", "--bands", "3,2,1",
                                "--nodata", "0", "--out", str(tif), "--json", "-q", "--restart", "--no-preview")
        rep = json.loads(stdout)
        growth.append({"scene": name, "pixels": rep["scene"]["width"] * rep["scene"]["height"],
                       "windows": rep["windows"], "seconds": round(meta["seconds"], 1),
                       "peak_rss_mib": round(meta["peak_rss_mib"])})
        print(f"  {name}: {growth[-1]}", flush=True)
    out["growth"] = growth
    return out


def run_similarity() -> dict:
    arch = WORK / "landsat.archive"
    stdout, meta = measured("index", "build", str(LANDSAT), "--chip", "32", "--bands", "3,2,1", "--nodata", "0",
                            "--out", str(arch), "--overwrite", "--json")
    out = {"archive": {"command": f"landlens index build {LANDSAT.name} --chip 32 --bands 3,2,1 --nodata 0 "
                                  f"--out landsat.archive", "seconds": round(meta["seconds"], 1),
                       "peak_rss_mib": round(meta["peak_rss_mib"])}}
    for place, (lon, lat) in PLACES.items():
        tif = WORK / f"landsat_similarity_{place}.tif"
        stdout, meta = measured("scenes", "similarity", str(arch), f"@{lon},{lat}", str(LANDSAT), "--out", str(tif),
                                "--json", "-q", "--restart")
        rep = json.loads(stdout)
        out[place] = {"command": f"landlens scenes similarity landsat.archive @{lon},{lat} {LANDSAT.name} "
                                 f"--out {place}.tif", "seconds": round(meta["seconds"], 1),
                      "peak_rss_mib": round(meta["peak_rss_mib"]), "windows": rep["windows"],
                      "range": rep["value_range"]}
        shutil.copy(tif.with_suffix(".png"), RESULTS / f"scene_maps_landsat_similarity_{place}.png")
        print(f"  similarity {place}: {out[place]}", flush=True)
    lon, lat = PLACES["city"]
    gj = RESULTS / "scene_maps_landsat_city_hits.geojson"
    stdout, meta = measured("search", str(arch), "--at", f"{lon},{lat}", "-k", "10", "--geojson", str(gj))
    out["search"] = {"command": f"landlens search landsat.archive --at {lon},{lat} -k 10 --geojson hits.geojson",
                     "seconds": round(meta["seconds"], 1), "output": stdout.strip().splitlines()[-12:]}
    return out


# --------------------------------------------------------------------------- report


def write_md(doc: dict, path: Path) -> None:
    lines = ["# Maps of whole scenes", "", f"Machine: {doc['machine']}; all CPU. Commands: `{doc['command']}`.", ""]
    if "mosaic" in doc:
        m = doc["mosaic"]
        lines += ["## Land-use maps of mosaics of labelled EuroSAT chips", "",
                  f"Run: `{doc['run']}` (fused backbone, linear head; its chip accuracy below is on the same chips).",
                  f"Stride chosen on the val mosaics: **{m['chosen_stride']}** (mean val map accuracy "
                  + ", ".join(f"stride {k}: {100 * v:.2f} %" for k, v in m["val_mean"].items()) + ").", "",
                  "| part | layout | stride | windows | map accuracy (95 % CI over chips) | chip accuracy (95 % CI) "
                  "| map s | chips s | peak RSS MiB |", "|---|---|---:|---:|---|---|---:|---:|---:|"]
        for r in m["rows"]:
            lines.append(f"| {r['part']} | {r['layout']} | {r['stride']} | {r['windows']} | "
                         f"{100 * r['map_accuracy']:.2f} ({100 * r['map_ci'][0]:.2f}-{100 * r['map_ci'][1]:.2f}) | "
                         f"{100 * r['chip_accuracy']:.2f} ({100 * r['chip_ci'][0]:.2f}-{100 * r['chip_ci'][1]:.2f}) | "
                         f"{r['map_seconds']} | {r['chip_seconds']} | {r['peak_rss_mib']} |")
        lines += ["", "![test parcels map](scene_maps_mosaic_test_parcels.png)", ""]
    if "landsat" in doc:
        ls = doc["landsat"]
        t, mp = ls["tiling"], ls["map"]
        lines += ["## The Landsat 8 scene as a land-use map", "", f"`{mp['command']}`", "",
                  f"- tiling alone (`tile_scene`, 64-px chips at 10 m): {t['chips']} chips kept, {t['skipped']} "
                  f"skipped as nodata, {t['seconds']:.1f} s, peak RSS {t['peak_rss_mib']:.0f} MiB",
                  f"- the map: {mp['windows']} windows, {mp['scored']} classified, {mp['cells'][0]}x{mp['cells'][1]} "
                  f"cells, {mp['seconds']} s, peak RSS {mp['peak_rss_mib']} MiB", "",
                  "| class | share of cells |", "|---|---:|"]
        lines += [f"| {c['class']} | {100 * c['share']:.1f} % |" for c in mp["classes"]]
        lines += ["", "![Landsat land use](scene_maps_landsat_landuse.png)", "",
                  "Memory against scene size (native 30 m grid, 64-px chips, same run):", "",
                  "| scene | pixels | windows | seconds | peak RSS MiB |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {g['scene']} | {g['pixels']:,} | {g['windows']} | {g['seconds']} | {g['peak_rss_mib']} |"
                  for g in ls["growth"]]
        lines.append("")
    if "similarity" in doc:
        s = doc["similarity"]
        lines += ["## Where else looks like this (Landsat)", "", f"- archive: `{s['archive']['command']}` "
                  f"({s['archive']['seconds']} s, peak RSS {s['archive']['peak_rss_mib']} MiB)"]
        for place in PLACES:
            p = s[place]
            lines += [f"- {place}: `{p['command']}`: {p['windows']} windows, {p['seconds']} s, peak RSS "
                      f"{p['peak_rss_mib']} MiB, similarity {p['range'][0]:.3f} to {p['range'][1]:.3f}",
                      "", f"![{place}](scene_maps_landsat_similarity_{place}.png)", ""]
        lines += [f"- search: `{s['search']['command']}` ({s['search']['seconds']} s); hits in "
                  f"`scene_maps_landsat_city_hits.geojson`", ""]
    if doc.get("notes"):
        lines += ["## Notes", "", *doc["notes"], ""]
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="+", choices=["mosaic", "landsat", "similarity"])
    ap.add_argument("--run", type=Path, default=REPO / "runs/bench/default-train-run-eurosat")
    ap.add_argument("--out", type=Path, default=RESULTS / "scene_maps")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    js = args.out.with_suffix(".json")
    doc = json.loads(js.read_text()) if js.exists() else {}
    doc.update(machine=f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
               run=str(args.run.relative_to(REPO) if args.run.is_absolute() else args.run),
               command="python benchmarks/scene_maps.py " + " ".join(sys.argv[1:]))
    if "mosaic" in args.parts:
        doc["mosaic"] = run_mosaic(args.run)
    if "landsat" in args.parts:
        doc["landsat"] = run_landsat(args.run)
    if "similarity" in args.parts:
        doc["similarity"] = run_similarity()
    js.write_text(json.dumps(doc, indent=1))
    write_md(doc, args.out.with_suffix(".md"))
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
