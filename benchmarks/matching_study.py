"""The residual-dyad matching study (Khurshid et al., issue #5) on UC Merced, sized for a 2-core CPU.

Paper: N. Khurshid, Mohbat, M. Taj, F. Z. Qureshi, "A Residual-Dyad Encoder Discriminator
Network for Remote Sensing Image Matching". Its experiments, one command, stages by flag:

``--table2``  Euclidean vs learned metric (Table II): a ResDyadDML discriminator trained on the
              pairs of the train part of the split for each feature (HoG, LBP-RGB,
              EfficientNet-Lite0 pooled vectors seen as (D, 1, 1) maps, and the latent maps of
              the fine-tuned ResDyadAE when Table I's run or ``--ae-run`` gives one); mAP,
              ANMRR, P@5/10/50/100 of both metrics on the same features.
``--table1``  ResAE / ResDyadAE, pre-trained only vs pre-trained + fine-tuned, x ResDML /
              ResDyadDML (Table I): mAP and ANMRR of the learned metric (and, for reference,
              Euclidean on the same latents). Pre-training reads every image under
              ``--corpus`` (default ../shared/data: UC Merced + EuroSAT, labels ignored), or a
              seeded random ``--corpus-limit`` of them.
``--ratios``  train/test ratio sweep (80/20 ... 30/70) with the best combination
              (``--sweep-with``, default: Table I's best).
``--kfold K`` K-fold cross-validation of that combination (mean and standard deviation).
``--estimate`` times a few training steps of every configured network on random tensors and a
              few image decodes, and projects each stage's time (no training on real data;
              written to ``<out>_estimate.json``).

Defaults are CPU-sized and stated in the report: 64-px AE input, widths 16/32/64, 8x8x64 latents,
5 + 5 AE epochs on 4000 corpus images, DML width 64, 10 epochs of 4000 pairs, one torch thread.
Both networks use Adam at 0.001 by default: the paper's SGD at 0.001 (``--ae-optim sgd
--dml-optim sgd``) barely moves in the few hundred steps such a budget allows.

Protocol (the paper's): the test part of the split queries the test part (``--database test``,
the query itself excluded); ``--database archive-minus-query`` searches the whole archive.

Every run is a matching run directory under ``--runs-dir`` (default runs/matching_study/),
named after its step and a digest of its config: a finished run (results.json) is reused, an
interrupted one resumes from its last checkpoint, and evaluations are cached next to it, so
running the command again only does what is missing. Results: ``--out`` .md/.json (default
benchmarks/results/matching_study) and figures in ``<out>_figures/``.

``--smoke`` runs every selected stage (all of them when none is named) on a generated dataset
(4 classes x 10 images) with tiny networks and 1-2 epochs, everything under a temporary
directory (or ``--work``): the whole pipeline in well under a minute.

Usage:
    python benchmarks/matching_study.py --table2 --table1 [--ratios [R ...]] [--kfold [K]]
        [--corpus-limit 4000] [--ae-epochs 5] [--dml-epochs 10] [--database test]
    python benchmarks/matching_study.py --estimate --table2 --table1 --ratios --kfold
    python benchmarks/matching_study.py --smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
UCM = SHARED / "UCMerced_LandUse"

#: Table II's features: key -> (backbone, weights, title).
FEATURES = {
    "hog": ("hog", "auto", "HoG"),
    "lbp_rgb": ("lbp_rgb", "auto", "LBP-RGB"),
    "tf_efficientnet_lite0": ("tf_efficientnet_lite0", "package", "EfficientNet-Lite0 (pooled, ImageNet)"),
}
AE_TITLES = {"res": "ResAE", "resdyad": "ResDyadAE"}
DML_TITLES = {"res": "ResDML", "resdyad": "ResDyadDML"}
STAGE_TITLES = {"pre": "pre-trained", "ft": "pre-trained + fine-tuned"}
DEFAULT_RATIOS = ["80/20", "70/30", "60/40", "50/50", "40/60", "30/70"]
SMOKE_RATIOS = ["80/20", "50/50"]
PRECISION_AT = (5, 10, 50, 100)
#: Overrides left out of a run's digest (they do not change its results), so that a run is reused across them.
_NOT_HASHED = ("data.num_workers=", "features.cache_dir=")
#: The paper's UC Merced numbers quoted in the report (mAP in %, ANMRR as a fraction).
PAPER = {"best": {"mAP": 81.20, "ANMRR": 0.090, "what": "ResDyadAE (pre-trained + fine-tuned) x ResDyadDML"},
         "ae_features": {"euclidean": 4.64, "learned": 81.20},
         "satresnet50": {"euclidean": 69.94, "learned": 89.69},
         "table3": {"mAP": 81.20, "ANMRR": 0.090, "P@5": 99.4, "P@10": 99.2, "P@50": 99.0, "P@100": 87.4}}


# ============================================================================ settings

@dataclass
class Settings:
    """Everything that shapes the runs (recorded in the JSON and stated in the report)."""

    data: str
    dataset: str | None
    corpus: str
    corpus_limit: int
    split: str = "80/20"
    seed: int = 0
    database: str = "test"
    input_size: int = 64
    ae_widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    latent_channels: int = 64
    ae_batch: int = 32
    ae_epochs: int = 5
    ft_epochs: int = 5
    ae_optim: str = "adam"
    ae_lr: float = 1e-3
    ae_set: list[str] = field(default_factory=list)
    dml_width: int = 64
    dml_batch: int = 32
    dml_epochs: int = 10
    pairs_per_epoch: int = 4000
    val_pairs: int = 1000
    dml_optim: str = "adam"
    dml_lr: float = 1e-3
    dml_set: list[str] = field(default_factory=list)
    patience: int = 10
    num_workers: int = 1
    threads: int = 1
    features: list[str] = field(default_factory=lambda: list(FEATURES))
    smoke: bool = False


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    st = ap.add_argument_group("stages")
    st.add_argument("--table2", action="store_true", help="Euclidean vs learned metric per feature")
    st.add_argument("--table1", action="store_true", help="ResAE/ResDyadAE x pre/fine-tuned x ResDML/ResDyadDML")
    st.add_argument("--ratios", nargs="*", default=None, metavar="TRAIN/TEST",
                    help=f"train/test ratio sweep (no value: {' '.join(DEFAULT_RATIOS)})")
    st.add_argument("--kfold", nargs="?", type=int, const=5, default=None, metavar="K",
                    help="K-fold cross-validation of the sweep combination (no value: 5)")
    st.add_argument("--all", action="store_true", help="every stage (--ratios and --kfold with their defaults)")
    st.add_argument("--estimate", action="store_true",
                    help="time a few steps of each network on random tensors and project the selected stages")
    st.add_argument("--smoke", action="store_true", help="generated dataset, tiny networks, temporary directory")
    st.add_argument("--work", type=Path, default=None, help="--smoke: directory for data, runs and results")

    d = ap.add_argument_group("data and protocol")
    d.add_argument("--data", type=Path, default=UCM)
    d.add_argument("--dataset", default="ucmerced", help="catalog name of --data")
    d.add_argument("--corpus", type=Path, default=SHARED, help="pre-training images (searched recursively)")
    d.add_argument("--corpus-limit", type=int, default=4000,
                   help="seeded random subset of the corpus (0: every image)")
    d.add_argument("--split", default="80/20", help="train/test split of Tables I and II")
    d.add_argument("--seed", type=int, default=0, help="split, hold-out and pair seed")
    d.add_argument("--database", choices=["test", "archive-minus-query"], default="test",
                   help="what the test queries search (paper: the test part)")
    d.add_argument("--features", nargs="+", default=list(FEATURES), choices=list(FEATURES),
                   help="Table II features (the AE row is added when an AE run is available)")
    d.add_argument("--ae-run", type=Path, default=None,
                   help="Table II: an autoencoder run whose latents are the AE features (default: Table I's "
                        "fine-tuned ResDyadAE when it exists)")
    d.add_argument("--sweep-with", default="auto",
                   help="combination of --ratios/--kfold: auto (Table I's best), ae:KIND:pre|ft:DMLKIND, or "
                        "feature:NAME:DMLKIND (e.g. feature:tf_efficientnet_lite0:resdyad)")

    a = ap.add_argument_group("autoencoder (AE) training")
    a.add_argument("--input-size", type=int, default=64)
    a.add_argument("--ae-widths", type=int, nargs=3, default=[16, 32, 64])
    a.add_argument("--latent-channels", type=int, default=64, help="n of the 8x8xn latent (paper: 512)")
    a.add_argument("--ae-batch", type=int, default=32)
    a.add_argument("--ae-epochs", type=int, default=5, help="pre-training epochs (maximum)")
    a.add_argument("--ft-epochs", type=int, default=5, help="fine-tuning epochs (maximum)")
    a.add_argument("--ae-optim", choices=["sgd", "adam"], default="adam",
                   help="paper: sgd at 0.001 (too slow to leave the mean image in a few CPU epochs)")
    a.add_argument("--ae-lr", type=float, default=1e-3)
    a.add_argument("--ae-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra matching-config override of AE runs (repeatable)")

    m = ap.add_argument_group("discriminator (DML) training")
    m.add_argument("--dml-width", type=int, default=64, help="paper: 128")
    m.add_argument("--dml-batch", type=int, default=32)
    m.add_argument("--dml-epochs", type=int, default=10)
    m.add_argument("--pairs-per-epoch", type=int, default=4000)
    m.add_argument("--val-pairs", type=int, default=1000)
    m.add_argument("--dml-optim", choices=["sgd", "adam"], default="adam",
                   help="paper: sgd at 0.001 (learns far more slowly in the few hundred steps of a CPU budget)")
    m.add_argument("--dml-lr", type=float, default=1e-3, help="paper: 0.001")
    m.add_argument("--dml-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra matching-config override of DML runs (repeatable)")
    m.add_argument("--patience", type=int, default=10, help="early stopping (paper: 10 epochs)")

    o = ap.add_argument_group("machine and outputs")
    o.add_argument("--workers", type=int, default=1, help="image decoding processes")
    o.add_argument("--threads", type=int, default=1,
                   help="torch threads (2 only on an idle 2-core machine: with another job running, 2 threads "
                        "are many times slower than 1)")
    o.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "matching_study")
    o.add_argument("--cache-dir", type=Path, default=REPO / "runs" / "features")
    o.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "matching_study")
    return ap


def settings_from_args(args: argparse.Namespace) -> Settings:
    s = Settings(data=str(Path(args.data).resolve()), dataset=args.dataset or None,
                 corpus=str(Path(args.corpus).resolve()), corpus_limit=int(args.corpus_limit), split=args.split,
                 seed=args.seed, database=args.database, input_size=args.input_size,
                 ae_widths=list(args.ae_widths), latent_channels=args.latent_channels, ae_batch=args.ae_batch,
                 ae_epochs=args.ae_epochs, ft_epochs=args.ft_epochs, ae_optim=args.ae_optim, ae_lr=args.ae_lr,
                 ae_set=list(args.ae_set), dml_width=args.dml_width, dml_batch=args.dml_batch,
                 dml_epochs=args.dml_epochs, pairs_per_epoch=args.pairs_per_epoch, val_pairs=args.val_pairs,
                 dml_optim=args.dml_optim, dml_lr=args.dml_lr, dml_set=list(args.dml_set), patience=args.patience,
                 num_workers=args.workers, threads=args.threads, features=list(args.features))
    return s


def smoke_settings(work: Path, args: argparse.Namespace) -> Settings:
    """A generated 4-class dataset and a generated corpus under ``work``; tiny networks."""
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures.make_datasets import make_folder_dataset

    data = work / "data" / "scenes"
    if not data.is_dir():
        make_folder_dataset(data, ["beach", "forest", "river", "desert"], per_class=10, size=32)
        make_folder_dataset(work / "data" / "unlabelled" / "extra", ["a", "b"], per_class=5, size=32, seed=1)
    return Settings(data=str(data), dataset=None, corpus=str(work / "data"), corpus_limit=40, split="80/20",
                    seed=args.seed, database=args.database, input_size=64, ae_widths=[4, 8, 8], latent_channels=8,
                    ae_batch=8, ae_epochs=1, ft_epochs=1, ae_optim=args.ae_optim, ae_lr=args.ae_lr, dml_width=8,
                    dml_batch=16, dml_epochs=2, pairs_per_epoch=64, val_pairs=32, dml_optim=args.dml_optim,
                    dml_lr=args.dml_lr, patience=args.patience, num_workers=0, threads=1,
                    features=list(args.features), smoke=True)


def _digest(obj: Any, n: int = 8) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _rel(p: str | Path) -> str:
    """``p`` relative to the repository when it lies under the repository's parent folder, else absolute."""
    q = Path(p).resolve()
    if q == REPO.parent or REPO.parent in q.parents:
        return os.path.relpath(q, REPO)
    return str(q)


def _ratio_tag(split: str) -> str:
    return "r" + split.replace("/", "-") if "/" in split else "s" + _digest(split, 6)


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _write_json(path: Path, doc: Any) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


# ============================================================================ the study

class Study:
    """Runs (reused, resumed or trained), evaluations (cached) and the rows of each table."""

    def __init__(self, s: Settings, runs_dir: Path, cache_dir: Path, command: str) -> None:
        self.s = s
        self.runs_dir = runs_dir
        self.cache_dir = cache_dir
        self.command = command
        self.progress = sys.stderr.isatty()
        self.runs: dict[str, dict[str, Any]] = {}
        self.touched: list[str] = []  # runs a stage used (trained, resumed or reused), in order
        self._corpus: Path | None = None

    # ------------------------------------------------------------------ configs
    def _ae_overrides(self, kind: str, epochs: int) -> list[str]:
        s = self.s
        return [f"ae.kind={kind}", f"ae.widths={json.dumps(s.ae_widths)}", f"ae.latent_channels={s.latent_channels}",
                f"data.input_size={s.input_size}", f"data.batch_size={s.ae_batch}",
                f"data.num_workers={s.num_workers}", f"data.seed={s.seed}", f"optim.name={s.ae_optim}",
                f"optim.lr={s.ae_lr}", f"optim.epochs={epochs}", f"optim.patience={s.patience}",
                f"trainer.seed={s.seed}", *s.ae_set]

    def _data_overrides(self, split: str, data: tuple[str, str | None, int] | None = None) -> list[str]:
        """The target dataset (``data``: path, catalog name, seed; default the study's) and its split."""
        path, dataset, seed = data or (self.s.data, self.s.dataset, self.s.seed)
        out = [f"data.path={path}", f"data.split={split}", f"data.seed={seed}"]
        if dataset:
            out.append(f"data.dataset={dataset}")
        return out

    def _dml_overrides(self, kind: str, split: str, features: tuple[str, ...],
                       data: tuple[str, str | None, int] | None = None) -> list[str]:
        s = self.s
        if features[0] == "ae":
            feat = [f"features.ae={features[1]}"]
        else:
            backbone, weights, _ = FEATURES[features[1]]
            feat = [f"features.backbone={backbone}", f"features.weights={weights}"]
        return [*self._data_overrides(split, data), f"data.batch_size={s.dml_batch}",
                f"data.num_workers={s.num_workers}", f"dml.kind={kind}", f"dml.width={s.dml_width}", *feat,
                f"features.cache_dir={self.cache_dir}",
                f"optim.name={s.dml_optim}", f"optim.lr={s.dml_lr}", f"optim.epochs={s.dml_epochs}",
                f"optim.patience={s.patience}", f"pairs.per_epoch={s.pairs_per_epoch}",
                f"pairs.val_pairs={s.val_pairs}", f"pairs.seed={s.seed}", f"trainer.seed={s.seed}", *s.dml_set]

    # ------------------------------------------------------------------ runs
    def run_dir(self, name: str, overrides: list[str]) -> Path:
        """``<runs dir>/<name>-<digest of the overrides that shape the results>``."""
        return self.runs_dir / f"{name}-{_digest([o for o in overrides if not o.startswith(_NOT_HASHED)])}"

    def run_step(self, step: str, name: str, overrides: list[str]) -> Path:
        """Train one matching run, or reuse / resume it; returns its directory."""
        from landlens.matching.config import load_matching_config
        from landlens.matching.pipeline import finetune_ae, pretrain_ae, train_dml
        from landlens.training.runs import RESULTS_FILE

        run_dir = self.run_dir(name, overrides)
        if name not in self.touched:
            self.touched.append(name)
        if name in self.runs and self.runs[name]["dir"] == _rel(run_dir):
            return run_dir  # already trained or reused by this invocation
        cfg = load_matching_config(None, [*overrides, f"out={run_dir}"])
        done = run_dir / RESULTS_FILE
        reused = done.is_file()
        t0 = time.perf_counter()
        if reused:
            print(f"[{name}] reusing {_rel(run_dir)}", flush=True)
        else:
            resume = (run_dir / "checkpoints" / "last.ckpt").is_file()
            if not resume and run_dir.exists():  # started, but killed before its first checkpoint
                shutil.rmtree(run_dir)
            if resume and (run_dir / "config.json").is_file():  # settings that do not change results: as saved
                saved = _load_json(run_dir / "config.json")
                cfg.data.num_workers = saved["data"]["num_workers"]
                cfg.features.cache_dir = saved["features"]["cache_dir"]
            print(f"[{name}] {'resuming' if resume else 'training'} -> {_rel(run_dir)}", flush=True)
            fn = {"pretrain": pretrain_ae, "finetune": finetune_ae, "dml": train_dml}[step]
            res = fn(cfg, resume=resume, progress=self.progress, command=self.command)
            if res.status != "complete":
                raise SystemExit(f"[{name}] interrupted; run the same command again to resume")
        self.runs[name] = _run_summary(step, run_dir, reused, time.perf_counter() - t0)
        return run_dir

    def corpus(self) -> Path:
        """The pre-training folder: ``corpus`` itself, or a folder of links to a seeded random subset."""
        if self._corpus is not None:
            return self._corpus
        s = self.s
        if not s.corpus_limit:
            self._corpus = Path(s.corpus)
            return self._corpus
        from landlens.matching.data import list_images

        root, paths = list_images(s.corpus)
        k = min(s.corpus_limit, len(paths))
        pick = sorted(np.random.default_rng(s.seed).choice(len(paths), k, replace=False).tolist())
        chosen = [paths[i] for i in pick]
        out = self.runs_dir / f"corpus-{k}-seed{s.seed}-{_digest([str(root), chosen])}"
        marker = out / ".corpus.json"
        if not marker.is_file():
            for rel in chosen:
                link = out / rel
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.is_symlink():
                    link.symlink_to(root / rel)
            by_top: dict[str, int] = {}
            for rel in chosen:
                top = rel.split("/", 1)[0] if "/" in rel else "."
                by_top[top] = by_top.get(top, 0) + 1
            marker.write_text(json.dumps({"root": str(root), "of": len(paths), "images": k, "seed": s.seed,
                                          "by_folder": by_top}, indent=1))
        self._corpus = out
        return out

    def corpus_info(self) -> dict[str, Any]:
        c = self.corpus()
        marker = c / ".corpus.json"
        if marker.is_file():
            return _load_json(marker)
        return {"root": str(c), "images": "all"}

    def pretrain(self, kind: str) -> Path:
        return self.run_step("pretrain", f"ae-pre-{kind}",
                             [f"data.path={self.corpus()}", *self._ae_overrides(kind, self.s.ae_epochs)])

    def finetune(self, kind: str, split: str) -> Path:
        pre = self.pretrain(kind)
        return self.run_step("finetune", f"ae-ft-{kind}-{_ratio_tag(split)}",
                             [*self._data_overrides(split), *self._ae_overrides(kind, self.s.ft_epochs),
                              f"ae.init={pre}"])

    def ae_features(self, kind: str, stage: str, split: str) -> tuple[str, str]:
        return ("ae", str(self.pretrain(kind) if stage == "pre" else self.finetune(kind, split)))

    def dml(self, label: str, kind: str, split: str, features: tuple[str, ...]) -> Path:
        return self.run_step("dml", f"dml-{label}-{kind}-{_ratio_tag(split)}",
                             self._dml_overrides(kind, split, features))

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, dml_dir: Path) -> dict[str, Any]:
        """Learned vs Euclidean retrieval of the run's test part (cached in the run directory)."""
        path = dml_dir / f"study_eval_{self.s.database}.json"
        if path.is_file():
            return _load_json(path)
        from landlens.matching.pipeline import evaluate_matching, load_run, resolve_features

        cfg, _ = load_run(dml_dir)
        t0 = time.perf_counter()
        features, _ = resolve_features(cfg, progress=False, command=self.command)
        ev = evaluate_matching(dml_dir, features, protocol="split", database=self.s.database, baseline="euclidean")
        doc = ev.to_dict()
        doc["wall_s"] = round(time.perf_counter() - t0, 2)
        _write_json(path, doc)
        return doc

    def row(self, dml_dir: Path, **info: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        ev = self.evaluate(dml_dir)
        out = {**info, "run": _rel(dml_dir), "eval_s": ev.get("wall_s"),
               "eval_call_s": round(time.perf_counter() - t0, 2)}
        for which in ("learned", "baseline"):
            d = ev[which]
            out[which] = {"metrics": d["metrics"], "classwise_map": d["classwise_map"],
                          "queries": d["protocol"]["n_queries"],
                          "searched": d["protocol"]["n_database_per_query"]}
        for which, key in (("learned", "confusion"), ("baseline", "confusion_euclidean")):
            c = ev[which]["confusion"]
            out[key] = {"k": c["k"], "classes": c["classes"], "counts": c["counts"]}
        m = out["learned"]["metrics"]
        print(f"    {info.get('label', '')}: learned mAP {100 * m['mAP']:.2f} ANMRR {m['ANMRR']:.4f} | Euclidean "
              f"mAP {100 * out['baseline']['metrics']['mAP']:.2f}", flush=True)
        return out

    # ------------------------------------------------------------------ stages
    def table1(self) -> dict[str, Any]:
        s = self.s
        rows = []
        for ae_kind in ("res", "resdyad"):
            for stage in ("pre", "ft"):
                feats = self.ae_features(ae_kind, stage, s.split)
                for dml_kind in ("res", "resdyad"):
                    label = f"{AE_TITLES[ae_kind]} ({STAGE_TITLES[stage]}) x {DML_TITLES[dml_kind]}"
                    d = self.dml(f"ae-{ae_kind}-{stage}", dml_kind, s.split, feats)
                    rows.append(self.row(d, label=label, ae=ae_kind, stage=stage, dml=dml_kind,
                                         combo=f"ae:{ae_kind}:{stage}:{dml_kind}", ae_run=_rel(feats[1])))
        return {"rows": rows}

    def table2(self, ae_run: Path | None, with_ae: bool) -> dict[str, Any]:
        s = self.s
        rows = []
        for key in s.features:
            d = self.dml(f"feat-{key}", "resdyad", s.split, ("backbone", key))
            rows.append(self.row(d, label=FEATURES[key][2], feature=key, combo=f"feature:{key}:resdyad"))
        notes = []
        if ae_run is not None:
            from landlens.matching.files import SPLIT_FILE

            split, data = s.split, None
            if (ae_run / SPLIT_FILE).is_file():  # fine-tuned: its data and split, so that its test part stays unseen
                from landlens.matching.config import load_matching_run_config

                d_ = load_matching_run_config(ae_run).data
                split, data = d_.split, (d_.path, d_.dataset, d_.seed)
            d = self.run_step("dml", f"dml-ae-given-resdyad-{_ratio_tag(split)}",
                              self._dml_overrides("resdyad", split, ("ae", str(ae_run.resolve())), data))
            rows.append(self.row(d, label=f"AE latents ({_rel(ae_run)})", feature="ae", ae_run=_rel(ae_run)))
        elif with_ae:
            feats = self.ae_features("resdyad", "ft", s.split)
            d = self.dml("ae-resdyad-ft", "resdyad", s.split, feats)
            rows.append(self.row(d, label="ResDyadAE latents (pre-trained + fine-tuned)", feature="ae",
                                 combo="ae:resdyad:ft:resdyad", ae_run=_rel(feats[1])))
        else:
            notes.append("no AE row: run --table1 (or pass --ae-run) for the autoencoder features")
        return {"rows": rows, "notes": notes}

    def combo_run(self, combo: str, split: str, tag: str) -> Path:
        """The DML run of ``combo`` (``ae:KIND:pre|ft:DML`` or ``feature:NAME:DML``) on ``split``."""
        parts = combo.split(":")
        if parts[0] == "ae" and len(parts) == 4 and parts[1] in AE_TITLES and parts[2] in STAGE_TITLES \
                and parts[3] in DML_TITLES:
            _, ae_kind, stage, dml_kind = parts
            if stage == "pre":
                feats = self.ae_features(ae_kind, "pre", split)
            else:
                ft = self.run_step("finetune", f"ae-ft-{ae_kind}-{tag}",
                                   [*self._data_overrides(split), *self._ae_overrides(ae_kind, self.s.ft_epochs),
                                    f"ae.init={self.pretrain(ae_kind)}"])
                feats = ("ae", str(ft))
            return self.run_step("dml", f"dml-ae-{ae_kind}-{stage}-{dml_kind}-{tag}",
                                 self._dml_overrides(dml_kind, split, feats))
        if parts[0] == "feature" and len(parts) == 3 and parts[1] in FEATURES and parts[2] in DML_TITLES:
            return self.run_step("dml", f"dml-feat-{parts[1]}-{parts[2]}-{tag}",
                                 self._dml_overrides(parts[2], split, ("backbone", parts[1])))
        raise SystemExit(f"--sweep-with {combo!r}: expected auto, ae:KIND:pre|ft:DMLKIND or feature:NAME:DMLKIND "
                         f"(KIND res/resdyad, NAME one of {', '.join(FEATURES)})")

    def ratios(self, combo: str, ratios: list[str]) -> dict[str, Any]:
        rows = []
        for r in ratios:
            d = self.combo_run(combo, r, _ratio_tag(r))
            rows.append(self.row(d, label=r, split=r, combo=combo))
        return {"combo": combo, "rows": rows}

    def kfold(self, combo: str, k: int) -> dict[str, Any]:
        from landlens.data.folder import scan_folder
        from landlens.data.splits import SplitManifest, make_kfold

        s = self.s
        ds = scan_folder(s.data, s.dataset)
        folds = make_kfold(ds.paths, ds.labels, ds.classes, k=k, seed=s.seed, dataset=ds.name)
        rows = []
        for i, ((tr_paths, tr_labels), (te_paths, te_labels)) in enumerate(folds.folds()):
            manifest = SplitManifest(parts={"train": list(zip(tr_paths, tr_labels.tolist())),
                                            "test": list(zip(te_paths, te_labels.tolist()))},
                                     classes=list(folds.classes), ratios={"train": (k - 1) / k, "test": 1 / k},
                                     seed=s.seed, kind="holdout", dataset=ds.name, source_digest=folds.source_digest)
            path = self.runs_dir / "splits" / f"kfold{k}-seed{s.seed}-{folds.source_digest[:8]}-fold{i}.json"
            if not path.is_file():
                manifest.save(path)
            d = self.combo_run(combo, str(path), f"k{k}f{i}")
            rows.append(self.row(d, label=f"fold {i}", fold=i, split=_rel(path), combo=combo))
        summary = {}
        for which in ("learned", "baseline"):
            summary[which] = {}
            for key in ("mAP", "ANMRR", *(f"P@{p}" for p in PRECISION_AT)):
                v = np.array([r[which]["metrics"][key] for r in rows], dtype=np.float64)
                summary[which][key] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
        return {"combo": combo, "k": k, "rows": rows, "summary": summary}


def _run_summary(step: str, run_dir: Path, reused: bool, seconds: float) -> dict[str, Any]:
    res = _load_json(run_dir / "results.json")
    hist_path = run_dir / "history.json"
    hist = _load_json(hist_path) if hist_path.is_file() else []
    epoch_s = [float(h["epoch_s"]) for h in hist if isinstance(h, dict) and h.get("epoch_s") is not None]
    cfg = res.get("config", {})
    out: dict[str, Any] = {
        "step": step, "dir": _rel(run_dir), "reused": reused, "call_s": round(seconds, 2),
        "epochs_run": res.get("epochs_run"), "best_epoch": res.get("best_epoch"),
        "fit_s": (res.get("timing_s") or {}).get("fit"), "total_s": (res.get("timing_s") or {}).get("total"),
        "mean_epoch_s": round(float(np.mean(epoch_s)), 2) if epoch_s else None,
        "optim": {k: (cfg.get("optim") or {}).get(k) for k in ("name", "lr", "epochs", "patience")},
    }
    if step == "dml":
        out["model"] = res.get("model")
        out["features"] = {k: (res.get("features") or {}).get("identity", {}).get(k) for k in ("backbone", "shape")}
        out["pairs_per_epoch"] = (res.get("data") or {}).get("pairs_per_epoch")
        out["fit_images"] = (res.get("data") or {}).get("fit_images")
        out["val_pair_accuracy"] = (res.get("val_pairs") or {}).get("accuracy")
        out["test_pair_accuracy"] = (res.get("test_pairs") or {}).get("accuracy")
    else:
        out["model"] = res.get("model")
        out["train_images"] = (res.get("data") or {}).get("train_images")
        out["val_mse"] = res.get("val_mse")
        out["train_mse"] = res.get("train_mse")
    return out


# ============================================================================ estimate

def estimate(s: Settings, stages: dict[str, Any], study: Study) -> dict[str, Any]:
    """Seconds per training step of every configured network (random tensors), per image decode,
    per scored pair; projected seconds of each selected stage (an upper bound: early stopping
    can end runs sooner)."""
    import torch
    import torch.nn.functional as F

    from landlens.data.folder import scan_folder
    from landlens.data.io import load_rgb
    from landlens.matching.networks import AEConfig, DMLConfig, MatchingDiscriminator, ResidualAutoencoder
    from landlens.matching.scoring import PairScorer
    from landlens.matching.data import list_images

    def timed_steps(step, n: int) -> float:
        step()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        return (time.perf_counter() - t0) / n

    def opt(params, name, lr):
        return torch.optim.Adam(params, lr=lr) if name == "adam" else torch.optim.SGD(params, lr=lr, momentum=0.9)

    out: dict[str, Any] = {"ae_ms_per_image": {}, "dml_ms_per_pair": {}, "score_us_per_pair": {}}
    for kind in ("res", "resdyad"):
        ae = ResidualAutoencoder(AEConfig(kind=kind, input_size=s.input_size, widths=tuple(s.ae_widths),
                                          latent_channels=s.latent_channels))
        o = opt(ae.parameters(), s.ae_optim, s.ae_lr)
        x = torch.rand(s.ae_batch, 3, s.input_size, s.input_size)

        def ae_step() -> None:
            r, _ = ae(x)
            loss = F.mse_loss(r, x)
            o.zero_grad()
            loss.backward()
            o.step()

        out["ae_ms_per_image"][kind] = 1000 * timed_steps(ae_step, 3) / s.ae_batch
        with torch.inference_mode():
            ae.eval()
            enc_s = timed_steps(lambda: ae.encode(x), 3)
            out.setdefault("ae_encode_ms_per_image", {})[kind] = 1000 * enc_s / s.ae_batch
    shapes = {"ae": (s.latent_channels, 8, 8), "hog": (8100, 1, 1), "lbp_rgb": (30, 1, 1),
              "tf_efficientnet_lite0": (1280, 1, 1)}
    for feat, (c, h, w) in shapes.items():
        for kind in ("res", "resdyad"):
            if feat != "ae" and kind == "res":
                continue
            net = MatchingDiscriminator(DMLConfig(kind=kind, in_channels=c, spatial=h, width=s.dml_width))
            o = opt(net.parameters(), s.dml_optim, s.dml_lr)
            a, b = torch.randn(s.dml_batch, c, h, w), torch.randn(s.dml_batch, c, h, w)
            y = torch.randint(0, 2, (s.dml_batch,))

            def dml_step() -> None:
                loss = F.cross_entropy(net(a, b), y)
                o.zero_grad()
                loss.backward()
                o.step()

            out["dml_ms_per_pair"][f"{feat}/{kind}"] = 1000 * timed_steps(dml_step, 5) / s.dml_batch
            scorer = PairScorer(net.eval())
            db = scorer.prepare_db(torch.randn(512, c, h, w))
            q = scorer.prepare_query(torch.randn(4, c, h, w))
            out["score_us_per_pair"][f"{feat}/{kind}"] = 1e6 * timed_steps(lambda: scorer.score(q, db), 2) / (4 * 512)
    # decoding (and resizing) of real images
    ds = scan_folder(s.data, s.dataset)
    root, cpaths = list_images(study.corpus())
    rng = np.random.default_rng(0)

    def decode_ms(base: Path, paths: list[str]) -> float:
        pick = [paths[i] for i in rng.choice(len(paths), min(16, len(paths)), replace=False)]
        t0 = time.perf_counter()
        for p in pick:
            load_rgb(base / p).resize((s.input_size, s.input_size))
        return 1000 * (time.perf_counter() - t0) / len(pick)

    out["decode_ms_per_image"] = {"data": decode_ms(Path(ds.root), ds.paths), "corpus": decode_ms(root, cpaths)}
    n_data, n_corpus = len(ds.paths), len(cpaths)
    out["images"] = {"data": n_data, "corpus": n_corpus}

    def train_count(split: str) -> int:
        from landlens.data.splits import parse_ratios

        return int(round(n_data * parse_ratios(split)["train"]))

    def ae_epoch(kind: str, n: int, where: str) -> float:
        """Training on 90 % of ``n`` images, validation (encoder + decoder, about twice the encoder) on 10 %."""
        dec = out["decode_ms_per_image"][where]
        return (0.9 * n * (out["ae_ms_per_image"][kind] + dec)
                + 0.1 * n * (2 * out["ae_encode_ms_per_image"][kind] + dec)) / 1000

    def ae_run(kind: str, n: int, where: str, epochs: int) -> float:
        """``epochs`` epochs, then the final train and validation MSE over every image."""
        return epochs * ae_epoch(kind, n, where) + n * (2 * out["ae_encode_ms_per_image"][kind]
                                                        + out["decode_ms_per_image"][where]) / 1000

    def dml_run(key: str) -> float:
        per = out["dml_ms_per_pair"][key] / 1000
        return s.dml_epochs * (s.pairs_per_epoch * per + s.val_pairs * per / 3)

    def evaluation(key: str, split: str) -> float:
        n_test = n_data - train_count(split)
        pairs = n_test * (n_test if s.database == "test" else n_data)
        return pairs * out["score_us_per_pair"][key] / 1e6

    def encode(kind: str) -> float:
        return n_data * (out["ae_encode_ms_per_image"][kind] + out["decode_ms_per_image"]["data"]) / 1000

    proj: dict[str, float] = {}
    per_epoch = {f"pretrain/{k}": ae_epoch(k, n_corpus, "corpus") for k in ("res", "resdyad")}
    per_epoch.update({f"finetune/{k}": ae_epoch(k, train_count(s.split), "data") for k in ("res", "resdyad")})
    per_epoch.update({f"dml/{k}": dml_run(k) / s.dml_epochs for k in out["dml_ms_per_pair"]})
    out["per_epoch_s"] = per_epoch
    if "table1" in stages:
        t = sum(ae_run(k, n_corpus, "corpus", s.ae_epochs) + ae_run(k, train_count(s.split), "data", s.ft_epochs)
                + 2 * encode(k) for k in ("res", "resdyad"))
        t += sum(2 * (dml_run(f"ae/{k}") + evaluation(f"ae/{k}", s.split)) for k in ("res", "resdyad"))
        proj["table1"] = t
    if "table2" in stages:
        ext = {"hog": 10e-3, "lbp_rgb": 55e-3, "tf_efficientnet_lite0": 40e-3}  # s per image, measured on this box
        t = sum(dml_run(f"{f}/resdyad") + evaluation(f"{f}/resdyad", s.split) + n_data * ext[f] for f in s.features)
        t += dml_run("ae/resdyad") + evaluation("ae/resdyad", s.split)
        proj["table2"] = t
    sweep_splits = [r for r in stages.get("ratios") or [] if r != s.split]
    per_split = lambda sp: (ae_run("resdyad", train_count(sp), "data", s.ft_epochs) + encode("resdyad")  # noqa: E731
                            + dml_run("ae/resdyad") + evaluation("ae/resdyad", sp))
    if sweep_splits:
        proj["ratios"] = sum(per_split(r) for r in sweep_splits)
    if stages.get("kfold"):
        k = stages["kfold"]
        proj["kfold"] = k * per_split(f"{100 * (k - 1) / k:g}/{100 / k:g}")
    out["projected_s"] = proj
    out["assumes"] = ("sweep combination ae:resdyad:ft:resdyad; every run goes its full epochs; feature extraction "
                      "of HoG/LBP-RGB/Lite0 at 10/55/40 ms per image; the background load of the moment")
    return out


# ============================================================================ figures and report

def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max(rows, key=lambda r: r["learned"]["metrics"]["mAP"]) if rows else None


def make_figures(doc: dict[str, Any], figures: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from landlens.reports.figures import plot_confusion_matrix

    figures.mkdir(parents=True, exist_ok=True)
    made: list[str] = []
    stages = doc["stages"]
    t2 = stages.get("table2", {}).get("rows") or []
    candidates = t2 or stages.get("table1", {}).get("rows") or []
    best = _best(candidates)
    if best is not None:
        classes = list(best["learned"]["classwise_map"])
        lv = [100 * (best["learned"]["classwise_map"][c] or 0) for c in classes]
        ev = [100 * (best["baseline"]["classwise_map"].get(c) or 0) for c in classes]
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(classes) + 2), 4.2))
        x = np.arange(len(classes))
        ax.bar(x - 0.2, ev, 0.4, label="Euclidean", color="#8da0cb")
        ax.bar(x + 0.2, lv, 0.4, label="learned (discriminator)", color="#dd8452")
        ax.set_xticks(x, classes, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("mAP (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"class-wise mAP, {best['label']}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(figures / "classwise_map.png", dpi=110)
        plt.close(fig)
        made.append("classwise_map.png")
        conf = best["confusion"]
        plot_confusion_matrix(np.asarray(conf["counts"]), conf["classes"], figures / "retrieval_confusion.png",
                              normalize=True, title=f"top-{conf['k']} retrieval confusion, learned metric\n"
                                                    f"{best['label']}")
        made.append("retrieval_confusion.png")
    ratio_rows = stages.get("ratios", {}).get("rows") or []
    if ratio_rows:
        from landlens.data.splits import parse_ratios

        xs = [100 * parse_ratios(r["split"])["train"] for r in ratio_rows]
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for which, name, colour in (("learned", "learned", "#dd8452"), ("baseline", "Euclidean", "#8da0cb")):
            ax.plot(xs, [100 * r[which]["metrics"]["mAP"] for r in ratio_rows], "o-", label=name, color=colour)
        ax.set_xlabel("train part (%)")
        ax.set_ylabel("mAP (%)")
        ax.set_title(f"train/test ratio sweep, {stages['ratios']['combo']}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(figures / "ratio_sweep.png", dpi=110)
        plt.close(fig)
        made.append("ratio_sweep.png")
    # copies of the runs' own figures: the autoencoders of Table I (pre-trained, and fine-tuned on the main split);
    # the learning curves of each table's best discriminator
    main_tag = _ratio_tag(doc["meta"]["settings"]["split"])
    for name, info in doc["runs"].items():
        src = REPO / info["dir"]  # an absolute path stays itself
        if info["step"] == "pretrain" or (info["step"] == "finetune" and name.endswith(main_tag)):
            for fig_name in ("reconstructions.png", "latent_maps.png", "learning_curves.png"):
                if (src / fig_name).is_file():
                    shutil.copyfile(src / fig_name, figures / f"{name}_{fig_name}")
                    made.append(f"{name}_{fig_name}")
                elif (figures / f"{name}_{fig_name}").is_file():  # copied when the run was here
                    made.append(f"{name}_{fig_name}")
    for table in ("table1", "table2"):
        b = _best(stages.get(table, {}).get("rows") or [])
        if b is None:
            continue
        src = REPO / b["run"]
        if (src / "learning_curves.png").is_file():
            shutil.copyfile(src / "learning_curves.png", figures / f"{table}_best_dml_learning_curves.png")
            made.append(f"{table}_best_dml_learning_curves.png")
        elif (figures / f"{table}_best_dml_learning_curves.png").is_file():
            made.append(f"{table}_best_dml_learning_curves.png")
    return sorted(set(made))


def _pct(v: float | None) -> str:
    return "-" if v is None or v != v else f"{100 * v:.2f}"


def _f4(v: float | None) -> str:
    return "-" if v is None or v != v else f"{v:.4f}"


def _secs(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 10:
        return f"{v:.1f} s"
    return f"{v:.0f} s" if v < 120 else f"{v / 60:.1f} min"


def render_md(doc: dict[str, Any]) -> str:
    meta, s, stages = doc["meta"], doc["meta"]["settings"], doc["stages"]
    env = meta["environment"]
    db = "the test part (the query itself excluded)" if s["database"] == "test" else \
        "the whole archive minus the query"
    corpus = doc.get("corpus") or {}
    subset = f"(seeded random subset of {corpus['of']})" if corpus.get("of") else ""
    smoke = " (SMOKE RUN: generated data, tiny networks; the numbers mean nothing)" if s["smoke"] else ""
    lines = [f"# Residual-dyad matching study on {Path(s['data']).name}{smoke}", "",
             "Khurshid, Mohbat, Taj & Qureshi, \"A Residual-Dyad Encoder Discriminator Network for Remote Sensing "
             "Image Matching\" (issue #5), reproduced with `landlens.matching` at a **CPU-sized configuration**: "
             f"small autoencoders on {s['input_size']}-px inputs, a few epochs, a subset of the pre-training "
             "corpus. The numbers below are what that budget gives on this machine, not the paper's setting; see the "
             "last section for how far they fall short of the paper.", "",
             "Commands (each stage lists the command that produced it):", "", "```"]
    lines += sorted({st.get("command", meta["command"]) for st in stages.values()} | {meta["command"]})
    lines += ["```", "",
              f"Machine: {env.get('platform')}, {env.get('cpu_count')} CPUs, torch {env.get('torch')} on "
              f"{s['threads']} thread(s), Lightning {env.get('lightning')}, GPU: {env.get('cuda') or 'none'}; a "
              "long benchmark was running on the same cores, so wall times are those of a shared machine.", "",
              "## Protocol and configuration", "",
              f"- Data: `{_rel(s['data'])}`{' (' + s['dataset'] + ')' if s['dataset'] else ''}, stratified "
              f"{s['split']} split, seed {s['seed']}. Queries: the test part; database: {db} (the paper's "
              "protocol for `test`). Relevant = same class. With `test` a query has only (test images of its class "
              "- 1) relevant images (19 for UC Merced 80/20), which caps P@50 and P@100 well below 100.",
              f"- Discriminators are trained on pairs of the train part only ({s['pairs_per_epoch']} balanced "
              f"pairs drawn afresh per epoch, {s['val_pairs']} fixed validation pairs from a held-out 10 % of the "
              "train part); test images never enter training. Fine-tuned autoencoders see only the train part.",
              f"- Pre-training corpus: {corpus.get('images', '?')} images "
              f"{subset}"
              f" of `{_rel(s['corpus'])}`: {json.dumps(corpus.get('by_folder', {}))}. Labels are "
              "never used; the corpus may include UC Merced test images (unsupervised, transductive pre-training; "
              "pass `--corpus ../shared/data/EuroSAT_RGB` to exclude them).", "",
              "| setting | this study | paper (library default where the paper is not quoted) |", "|---|---|---|",
              f"| AE input | {s['input_size']} px (squashed) | (64 px) |",
              f"| AE widths (stem, stage 1, stage 2) | {s['ae_widths']} | ([32, 64, 128]) |",
              f"| AE latent | 8x8x{s['latent_channels']} | 8x8x512 |",
              f"| AE optimiser | {s['ae_optim']} lr {s['ae_lr']}, batch {s['ae_batch']} | SGD lr 0.001 |",
              f"| AE epochs (pre-train / fine-tune, max) | {s['ae_epochs']} / {s['ft_epochs']} | until early "
              "stopping |",
              f"| DML width | {s['dml_width']} | (128) |",
              f"| DML optimiser | {s['dml_optim']} lr {s['dml_lr']}, batch {s['dml_batch']} | SGD lr 0.001 |",
              f"| DML epochs (max) x pairs per epoch | {s['dml_epochs']} x {s['pairs_per_epoch']} | until early "
              "stopping (10000 pairs) |",
              f"| plateau x0.2, early stopping patience | yes, {s['patience']} | yes, 10 |",
              f"| extra overrides | AE {s['ae_set'] or '-'}, DML {s['dml_set'] or '-'} | |", ""]
    if "table2" in stages:
        t2 = stages["table2"]
        lines += ["## Table II: Euclidean vs learned metric", "",
                  "ResDyadDML on each feature (vectors seen as (D, 1, 1) maps; AE latents as 8x8xn maps); the "
                  "Euclidean rows rank the same features.", "",
                  "| feature | metric | mAP | ANMRR | " + " | ".join(f"P@{k}" for k in PRECISION_AT)
                  + " | paper mAP |", "|---|---|---|---|" + "---|" * len(PRECISION_AT) + "---|"]
        for r in t2["rows"]:
            paper = PAPER["ae_features"] if r.get("feature") == "ae" else None
            for which, name in (("baseline", "Euclidean"), ("learned", "learned")):
                m = r[which]["metrics"]
                pv = f"{paper['euclidean' if which == 'baseline' else 'learned']:.2f}" if paper else "-"
                lines.append(f"| {r['label']} | {name} | {_pct(m['mAP'])} | {_f4(m['ANMRR'])} | "
                             + " | ".join(_pct(m.get(f"P@{k}")) for k in PRECISION_AT) + f" | {pv} |")
        lines += ["", f"(The paper's CNN is SatResNet-50: {PAPER['satresnet50']['euclidean']:.2f} -> "
                  f"{PAPER['satresnet50']['learned']:.2f} mAP; ours is an ImageNet EfficientNet-Lite0, not "
                  "comparable number for number.)"]
        lines += [f"note: {n}" for n in t2.get("notes", [])]
        lines.append("")
    if "table1" in stages:
        lines += ["## Table I: autoencoder x discriminator", "",
                  "| autoencoder | training | discriminator | mAP | ANMRR | Euclidean mAP (same latents) |",
                  "|---|---|---|---|---|---|"]
        for r in stages["table1"]["rows"]:
            m, b = r["learned"]["metrics"], r["baseline"]["metrics"]
            lines.append(f"| {AE_TITLES[r['ae']]} | {STAGE_TITLES[r['stage']]} | {DML_TITLES[r['dml']]} | "
                         f"{_pct(m['mAP'])} | {_f4(m['ANMRR'])} | {_pct(b['mAP'])} |")
        lines += ["", f"Paper, best ({PAPER['best']['what']}): mAP {PAPER['best']['mAP']:.2f}, ANMRR "
                  f"{PAPER['best']['ANMRR']:.3f}.", ""]
    full_rows = [(r.get("label") or r.get("combo"), r) for r in (stages.get("table2", {}).get("rows") or [])]
    best1 = _best(stages.get("table1", {}).get("rows") or [])
    if best1 is not None:
        full_rows.append((f"{AE_TITLES[best1['ae']]} ({STAGE_TITLES[best1['stage']]}) x {DML_TITLES[best1['dml']]}",
                          best1))
    if full_rows:
        ks = ("P@5", "P@10", "P@50", "P@100", "P@1000")
        lines += ["## Table III: the learned metric in full", "",
                  "Every learned-metric row of Table II and Table I's best, with all the paper's Table III measures.",
                  "", "| features | mAP | ANMRR | " + " | ".join(ks) + " |", "|---|---|---|" + "---|" * len(ks)]
        for label, r in full_rows:
            m = r["learned"]["metrics"]
            lines.append(f"| {label} | {_pct(m['mAP'])} | {_f4(m['ANMRR'])} | "
                         + " | ".join(_pct(m.get(k)) for k in ks) + " |")
        p3 = PAPER["table3"]
        lines += [f"| paper ({PAPER['best']['what']}) | {p3['mAP']:.2f} | {p3['ANMRR']:.3f} | "
                  + " | ".join(f"{p3[k]:.1f}" if k in p3 else "-" for k in ks) + " |", "",
                  "P@k counts the first min(k, N) results of the N searched. When the database is the test part, "
                  "every query searches fewer than 1000 images, so P@1000 is the share of relevant images in the "
                  "whole database: the same for every ranking. The same cap bounds P@50 and P@100 by the "
                  "images of each class in the database.", ""]
    if "ratios" in stages:
        st = stages["ratios"]
        lines += [f"## Train/test ratio sweep ({st['combo']})", "",
                  "| train/test | queries | mAP | ANMRR | Euclidean mAP |", "|---|---|---|---|---|"]
        for r in st["rows"]:
            m, b = r["learned"]["metrics"], r["baseline"]["metrics"]
            lines.append(f"| {r['split']} | {r['learned']['queries']} | {_pct(m['mAP'])} | {_f4(m['ANMRR'])} | "
                         f"{_pct(b['mAP'])} |")
        lines.append("")
        # the sweep's row at the tables' split retrains a table's configuration when that run was not kept
        main = next((r for r in st["rows"] if r["split"] == s["split"]), None)
        same = [r for t in ("table2", "table1") for r in (stages.get(t, {}).get("rows") or [])
                if r.get("combo") == st["combo"]]
        if main is not None and same and abs(main["learned"]["metrics"]["mAP"] - same[0]["learned"]["metrics"]["mAP"]) > 1e-9:
            lines += [f"The {s['split']} row is the same configuration as the table row at "
                      f"{_pct(same[0]['learned']['metrics']['mAP'])} mAP, trained again ({main['learned']['queries']} "
                      f"queries either way): the sweep ran with {doc['meta']['settings']['threads']} torch thread(s), "
                      "the table's run with another count. Runs are seeded and repeat exactly at one thread count (the "
                      "table's run, retrained with its own thread count, gave its figure again), but CPU training is "
                      "not bit-identical across thread counts (reductions are summed in another order), so the two "
                      "differ by "
                      f"{abs(100 * (main['learned']['metrics']['mAP'] - same[0]['learned']['metrics']['mAP'])):.2f} "
                      "mAP: a measure of how much one configuration moves between trainings.", ""]
    if "kfold" in stages:
        st = stages["kfold"]
        lines += [f"## {st['k']}-fold cross-validation ({st['combo']})", "",
                  "| fold | mAP | ANMRR | Euclidean mAP |", "|---|---|---|---|"]
        for r in st["rows"]:
            m, b = r["learned"]["metrics"], r["baseline"]["metrics"]
            lines.append(f"| {r['fold']} | {_pct(m['mAP'])} | {_f4(m['ANMRR'])} | {_pct(b['mAP'])} |")
        sm = st["summary"]
        lines += [f"| mean +- std | {_pct(sm['learned']['mAP']['mean'])} +- {_pct(sm['learned']['mAP']['std'])} | "
                  f"{_f4(sm['learned']['ANMRR']['mean'])} +- {_f4(sm['learned']['ANMRR']['std'])} | "
                  f"{_pct(sm['baseline']['mAP']['mean'])} +- {_pct(sm['baseline']['mAP']['std'])} |", ""]
    lines += ["## Time", "", "Per stage: training time of the runs it uses (fit, as recorded when each run was "
              "trained, shared runs counted in every stage that uses them), retrieval evaluation time (as recorded "
              "when first evaluated), and the wall time of the command that last produced it (small when its runs "
              "and evaluations were reused).", "",
              "| stage | runs | fit | evaluation | wall time of the last command | command |",
              "|---|---|---|---|---|---|"]
    for name, st in stages.items():
        lines.append(f"| {name} | {len(st.get('runs', []))} | {_secs(st.get('fit_s'))} | {_secs(st.get('eval_s'))} | "
                     f"{_secs(st.get('wall_s'))} | `{st.get('command', '')}` |")
    lines += ["", "Training runs (fit time as recorded when the run was trained; `reused` runs were not retrained):",
              "", "| run | step | epochs (best) | s / epoch | fit | result | reused |", "|---|---|---|---|---|---|---|"]
    for name, r in sorted(doc["runs"].items()):
        if r["step"] == "dml":
            result = f"val / test pair acc {_pct(r.get('val_pair_accuracy'))} / {_pct(r.get('test_pair_accuracy'))}"
        else:
            result = f"val MSE {_f4(r.get('val_mse'))}"
        lines.append(f"| `{name}` | {r['step']} | {r['epochs_run']} ({r['best_epoch']}) | "
                     f"{'-' if r['mean_epoch_s'] is None else r['mean_epoch_s']} | {_secs(r['fit_s'])} | {result} | "
                     f"{'yes' if r['reused'] else 'no'} |")
    if doc.get("estimate"):
        e = doc["estimate"]
        lines += ["", "Projected stage times (`--estimate`, upper bounds): "
                  + ", ".join(f"{k} {_secs(v)}" for k, v in e["projected_s"].items()) + "."]
    if doc.get("figures"):
        listed = ", ".join(f"`{f}`" for f in doc["figures"])
        lines += ["", "## Figures", "", f"In `{_rel(doc['figures_dir'])}/`: {listed}"
                  + ". `classwise_map.png` and `retrieval_confusion.png` (top-10 results per query, rows = query "
                  "class) are of the best learned-metric row of Table II (else Table I)."]
    lines += ["", "## Against the paper", ""]
    best_rows = [r for k in ("table1", "table2") for r in stages.get(k, {}).get("rows", [])]
    best = _best(best_rows)
    ae_rows = [r for r in stages.get("table2", {}).get("rows", []) if r.get("feature") == "ae"]
    if best is not None:
        m = best["learned"]["metrics"]
        lines.append(f"- Best learned-metric row here: {best['label']}, mAP {_pct(m['mAP'])}, ANMRR {_f4(m['ANMRR'])}; "
                     f"paper's best on UC Merced: mAP {PAPER['best']['mAP']:.2f}, ANMRR {PAPER['best']['ANMRR']:.3f}.")
    t1 = stages.get("table1", {}).get("rows", [])
    if t1:
        b1 = _best(t1)
        m = b1["learned"]["metrics"]
        gap = PAPER["best"]["mAP"] - 100 * m["mAP"]
        lines.append(f"- Autoencoder pipeline (Table I best, {b1['label']}): mAP {_pct(m['mAP'])} "
                     f"({'%.2f points below' % gap if gap > 0 else '%.2f points above' % -gap} the paper's "
                     f"{PAPER['best']['mAP']:.2f}).")
    if ae_rows:
        r = ae_rows[0]
        lines.append(f"- Learned metric on AE latents: {_pct(r['baseline']['metrics']['mAP'])} (Euclidean) -> "
                     f"{_pct(r['learned']['metrics']['mAP'])} (learned); paper: {PAPER['ae_features']['euclidean']:.2f}"
                     f" -> {PAPER['ae_features']['learned']:.2f}.")
    lines += [f"- How this configuration differs from the paper's: latents of 8x8x{s['latent_channels']} (the "
              f"paper: 8x8x512) from narrow autoencoders on {s['input_size']}-px inputs, a few epochs of "
              "pre-training on a corpus subset instead of training to early stopping, and discriminators of width "
              f"{s['dml_width']} trained for at most {s['dml_epochs']} epochs of {s['pairs_per_epoch']} pairs. "
              "Larger settings are flags away (`--latent-channels 512 --ae-widths 32 64 128 --ae-epochs 100 "
              "--ft-epochs 100 --dml-width 128 --dml-epochs 100 --pairs-per-epoch 10000 --corpus-limit 0`, "
              "`--input-size 128/256`) but need a GPU.", ""]
    return "\n".join(lines)


# ============================================================================ main

def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    from landlens.cli.common import quiet_lightning

    quiet_lightning()  # an entry point: Lightning's banners off, as `landlens matching` does
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["python", "benchmarks/matching_study.py", *argv_list])

    stages: dict[str, Any] = {}
    named = args.table1 or args.table2 or args.ratios is not None or args.kfold is not None
    if args.all or ((args.smoke or args.estimate) and not named):
        args.table1 = args.table2 = True
        args.ratios = [] if args.ratios is None else args.ratios
        args.kfold = (2 if args.smoke else 5) if args.kfold is None else args.kfold
    elif not named:
        ap.error("choose stages: --table2 --table1 --ratios [R ...] --kfold [K], or --all (or --smoke)")

    import torch

    if args.smoke:
        work = args.work or Path(tempfile.mkdtemp(prefix="matching_study_smoke_"))
        work.mkdir(parents=True, exist_ok=True)
        s = smoke_settings(work, args)
        runs_dir, cache_dir, out = work / "runs", work / "cache", work / "results" / "matching_study"
        print(f"smoke run under {work}", flush=True)
    else:
        s = settings_from_args(args)
        runs_dir, cache_dir, out = args.runs_dir.resolve(), args.cache_dir.resolve(), args.out.resolve()
    if args.table1:
        stages["table1"] = True
    if args.table2:
        stages["table2"] = True
    if args.ratios is not None:
        stages["ratios"] = list(args.ratios) or list(SMOKE_RATIOS if args.smoke else DEFAULT_RATIOS)
    if args.kfold is not None:
        if args.kfold < 2:
            ap.error("--kfold needs K >= 2")
        stages["kfold"] = int(args.kfold)
    torch.set_num_threads(max(1, s.threads))
    runs_dir.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    study = Study(s, runs_dir, cache_dir, command)

    from landlens.training.runs import environment

    json_path, md_path = out.with_suffix(".json"), out.with_suffix(".md")
    prior = _load_json(json_path) if json_path.is_file() else {}
    settings = asdict(s)
    machine = ("threads", "num_workers", "features")  # do not change the results of a run

    def results_settings(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k not in machine}

    same = results_settings((prior.get("meta") or {}).get("settings") or {}) == results_settings(settings)
    doc: dict[str, Any] = {"meta": {"command": command, "environment": environment(), "settings": settings,
                                    "paper": PAPER, "runs_dir": _rel(runs_dir), "cache_dir": _rel(cache_dir)},
                           "stages": dict(prior.get("stages", {})) if same else {},
                           "runs": dict(prior.get("runs", {})) if same else {}}
    if prior and not same:
        print("settings differ from the previous results file: its stages are dropped", flush=True)
    doc["corpus"] = (prior.get("corpus") if same else None) or {}

    if args.estimate:
        t0 = time.perf_counter()
        est = estimate(s, stages, study)
        est["wall_s"] = time.perf_counter() - t0
        doc["estimate"] = est
        print(json.dumps({k: est[k] for k in ("per_epoch_s", "projected_s")}, indent=1), flush=True)
        _write_json(json_path.with_name(json_path.stem + "_estimate.json"), est)
        return 0

    def stage(name: str, fn) -> None:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        study.touched = []
        result = fn()
        result["wall_s"] = round(time.perf_counter() - t0, 2)
        result["command"] = command
        result["runs"] = list(study.touched)
        result["fit_s"] = round(sum(study.runs[n]["fit_s"] or 0 for n in study.touched), 2)
        result["eval_s"] = round(sum(r.get("eval_s") or 0 for r in result["rows"]), 2)
        doc["stages"][name] = result
        doc["runs"].update(study.runs)
        _write_json(json_path, doc)  # partial results survive a later failure

    if "table1" in stages:
        stage("table1", study.table1)
    if "table2" in stages:
        stage("table2", lambda: study.table2(args.ae_run, with_ae="table1" in stages or _ae_ready(study)))
    combo = args.sweep_with
    if combo == "auto":
        t1 = doc["stages"].get("table1", {}).get("rows") or []
        combo = _best(t1)["combo"] if t1 else "ae:resdyad:ft:resdyad"
    if "ratios" in stages:
        stage("ratios", lambda: study.ratios(combo, stages["ratios"]))
    if "kfold" in stages:
        stage("kfold", lambda: study.kfold(combo, stages["kfold"]))

    doc["runs"].update(study.runs)
    if study._corpus is not None:
        doc["corpus"] = study.corpus_info()
    figures = out.parent / (out.name + "_figures")
    doc["figures_dir"] = str(figures)
    doc["figures"] = make_figures(doc, figures)
    _write_json(json_path, doc)
    md_path.write_text(render_md(doc))
    print(md_path.read_text())
    print(f"results: {_rel(md_path)}, {_rel(json_path)}; figures: {_rel(figures)}", flush=True)
    return 0


def _ae_ready(study: Study) -> bool:
    """Whether Table I's fine-tuned ResDyadAE of these settings already exists (then Table II gets an AE row)."""
    from landlens.errors import LandlensError
    from landlens.training.runs import RESULTS_FILE

    s = study.s
    try:
        corpus = study.corpus()
    except LandlensError:
        return False
    pre_over = [f"data.path={corpus}", *study._ae_overrides("resdyad", s.ae_epochs)]
    pre = study.run_dir("ae-pre-resdyad", pre_over)
    if not (pre / RESULTS_FILE).is_file():
        return False
    ft_over = [*study._data_overrides(s.split), *study._ae_overrides("resdyad", s.ft_epochs), f"ae.init={pre}"]
    return (study.run_dir(f"ae-ft-resdyad-{_ratio_tag(s.split)}", ft_over) / RESULTS_FILE).is_file()


if __name__ == "__main__":
    raise SystemExit(main())
