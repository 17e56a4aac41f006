"""Zero-shot evaluation console script ``geodiff_eval``: runs the engine, writes JSON + markdown.

The protocol is the official E2E-FT evaluation's, per benchmark (docs/method.md#evaluation):
Depth (Marigold's ``infer.py``/``eval.py`` with E2E-FT's ``experiments/depth/eval_args``):
per-dataset processing resolution, valid range, crop and mask; least-squares scale+shift in depth space
per image (ETH3D: fitted on the official width-only subsample); clip to the range; the ten official
metrics per image, averaged over images (an image without valid pixels gives NaN, as officially).
Normals (DSINE's ``test.py`` with ``experiments/normals/eval_args``): native resolution,
DSINE-preprocessed input image, DSINE's ground truth and masks, angular errors of all valid pixels of a
dataset pooled. Manifests (your own recordings) use the same metrics at the node's default resolution.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .datasets import (
    DEPTH_DATASETS,
    NORMALS_DATASETS,
    EvalSample,
    dsine_model_input,
    iter_depth_dataset,
    iter_depth_manifest,
    iter_normals_dataset,
    iter_normals_manifest,
)
from .metrics import DEPTH_METRICS, angular_errors_deg, evaluate_depth_image, mean_over_images, normal_metrics

logger = logging.getLogger("geodiff_ros.evaluation")

__all__ = ["build_parser", "evaluate", "main", "markdown_table"]

DEPTH_KINDS = (*DEPTH_DATASETS, "manifest")
NORMALS_KINDS = (*NORMALS_DATASETS, "normals")
DEPTH_METRIC_NAMES = tuple(fn.__name__ for fn in DEPTH_METRICS)
#: Manifests are your own recordings, not a benchmark: evaluated at the node's default processing resolution.
MANIFEST_PROCESSING_RES = 768


def build_parser() -> argparse.ArgumentParser:
    """CLI flags."""
    p = argparse.ArgumentParser(
        prog="geodiff_eval",
        description="Zero-shot depth and normals evaluation of E2E-FT checkpoints through the geodiff engine, "
        "with the official E2E-FT protocol (Marigold's for depth, DSINE's for normals).",
    )
    p.add_argument("--depth-model", dest="depth_model", default=None, help="depth checkpoint (hub id/folder)")
    p.add_argument("--normals-model", dest="normals_model", default=None, help="normals checkpoint")
    p.add_argument("--dataset", action="append", default=[], metavar="KIND:PATH",
                   help=f"repeatable; KIND in {list(DEPTH_KINDS)} (depth; PATH = dataset root or manifest) or "
                   f"{list(NORMALS_KINDS)} (normals; PATH = dsine_eval/<name> folder, or a normals manifest)")
    p.add_argument("--filelist", action="append", default=[], metavar="KIND:FILE",
                   help="split list for KIND: Marigold's data_split file (depth) or DSINE's "
                   "data/datasets/<name>/split/*.txt (normals); default: its usual name inside the root")
    p.add_argument("--kitti_crop", choices=("eigen", "garg", "none"), default="eigen",
                   help="KITTI evaluation crop (official: eigen)")
    p.add_argument("--manifest_min_depth", type=float, default=1e-3)
    p.add_argument("--manifest_max_depth", type=float, default=80.0)
    p.add_argument("--processing_res", type=int, default=None,
                   help="override the per-dataset processing resolution (official: NYU/KITTI/ScanNet depth 0, "
                   "ETH3D 756, DIODE 640, all normals benchmarks 0; manifests 768)")
    p.add_argument("--normals_input", choices=("dsine", "raw"), default=None,
                   help="image fed to the normals model: 'dsine' = the official evaluation's ImageNet-normalised "
                   "then min-max stretched uint8 image (default for the normals benchmarks), 'raw' = the RGB "
                   "file as is (default for normals manifests, what the node sees)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="fp32 as in the paper's evaluation")
    p.add_argument("--allow_cpu_fallback", action="store_true")
    p.add_argument("--local_files_only", action="store_true")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples per dataset")
    p.add_argument("--output_dir", required=True, help="writes metrics.json, metrics.md, per_image_depth.csv")
    return p


def _parse_kv(items: Iterable[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        kind, sep, path = item.partition(":")
        if not sep or not path:
            raise SystemExit(f"{flag} expects KIND:PATH; got {item!r}")
        out.append((kind.strip().lower(), path))
    return out


def _resize_normals(n: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``[H,W,3]`` normals to ``hw`` and re-normalise."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(n)).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=hw, mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    return t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-8)


def _summarise_depth(rows: list[dict], *, skip_empty: bool) -> dict:
    """Mean of each metric over images, and which images had no valid pixel or a non-finite metric.

    Benchmarks (``skip_empty=False``) keep images without valid pixels: their NaN carries into the mean as in
    the official evaluation. Manifests skip them (a recording may have frames without depth); both list them.
    """
    empty = [r["name"] for r in rows if r["valid_pixels"] == 0]
    used = [r for r in rows if not (skip_empty and r["valid_pixels"] == 0)]
    out: dict = {n: mean_over_images(r[n] for r in used) for n in DEPTH_METRIC_NAMES}
    out["num_images"] = len(used)
    timed = [r["sec"] for r in rows if math.isfinite(r["sec"])]
    out["sec_per_image"] = float(np.mean(timed)) if timed else math.nan
    out["images_without_valid_pixels"] = empty
    out["empty_images"] = "skipped" if skip_empty else "NaN (official)"
    out["images_with_nonfinite_metrics"] = [
        r["name"] for r in used if r["valid_pixels"] > 0 and not all(math.isfinite(r[n]) for n in DEPTH_METRIC_NAMES)]
    return out


def _depth_row(engine: object, s: EvalSample, kind: str, rng: tuple[float, float], amr: int | None) -> dict:
    """Metrics of one depth sample; an empty mask gives NaN without running the model (NaN either way)."""
    valid = int(np.count_nonzero(s.mask))
    row: dict = {"dataset": kind, "group": s.group, "name": s.name, "sec": math.nan, "valid_pixels": valid}
    if valid == 0:
        logger.warning("%s: %s has no valid ground-truth pixel: its metrics are NaN (%s)", kind, s.name,
                       "skipped in the manifest mean" if kind == "manifest" else "so is the mean, as officially")
        row.update(dict.fromkeys(DEPTH_METRIC_NAMES, math.nan), scale=math.nan, shift=math.nan)
        return row
    t0 = time.perf_counter()
    pred = engine.predict(s.rgb, tasks=["depth"]).depth[0]  # [H,W] float32 in [0,1]
    row["sec"] = time.perf_counter() - t0
    row.update(evaluate_depth_image(pred, s.depth_m, s.mask, min_depth=rng[0], max_depth=rng[1],
                                    alignment_max_res=amr))
    bad = {n: row[n] for n in DEPTH_METRIC_NAMES if not math.isfinite(row[n])}
    if bad:
        logger.warning("%s: %s has non-finite metrics %s (kept in the mean, as officially)", kind, s.name, bad)
    return row


def evaluate(args: argparse.Namespace, engine: object | None = None) -> dict:
    """Run every requested dataset; returns the results dict that is also written as JSON."""
    datasets = _parse_kv(args.dataset, "--dataset")
    filelists = dict(_parse_kv(args.filelist, "--filelist"))
    if not datasets:
        raise SystemExit("nothing to evaluate: pass at least one --dataset KIND:PATH")
    for kind, _ in datasets:
        if kind not in DEPTH_KINDS + NORMALS_KINDS:
            raise SystemExit(f"unknown dataset kind {kind!r}; choose from {list(DEPTH_KINDS + NORMALS_KINDS)}")
    needs_depth = any(k in DEPTH_KINDS for k, _ in datasets)
    needs_normals = any(k in NORMALS_KINDS for k, _ in datasets)
    if needs_depth and not args.depth_model:
        raise SystemExit("depth datasets given but no --depth-model")
    if needs_normals and not args.normals_model:
        raise SystemExit("normals datasets given but no --normals-model")
    if engine is None:
        from ..engine import EngineConfig, GeoDiffEngine

        engine = GeoDiffEngine(EngineConfig(
            depth_model=args.depth_model if needs_depth else None,
            normals_model=args.normals_model if needs_normals else None,
            device=args.device, dtype=args.dtype, processing_res=MANIFEST_PROCESSING_RES, match_input_res=True,
            allow_cpu_fallback=args.allow_cpu_fallback, local_files_only=args.local_files_only, batch_size=1,
        ))
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "config": {"depth_model": args.depth_model, "normals_model": args.normals_model, "device": args.device,
                   "dtype": args.dtype, "kitti_crop": args.kitti_crop,
                   "normals_frame": "ROS optical (x right, y down, z forward); GT converted to it (exact sign flip)",
                   "depth_alignment": "least squares scale+shift in depth space, per image"},
        "depth": {},
        "normals": {},
    }
    per_image: list[dict] = []
    kitti_crop = None if args.kitti_crop == "none" else args.kitti_crop

    for kind, path in datasets:
        t_start = time.perf_counter()
        if kind in DEPTH_KINDS:
            if kind == "manifest":
                samples: Iterable[EvalSample] = iter_depth_manifest(
                    path, min_depth=args.manifest_min_depth, max_depth=args.manifest_max_depth, limit=args.limit)
                rng, res, amr = (args.manifest_min_depth, args.manifest_max_depth), MANIFEST_PROCESSING_RES, None
            else:
                spec = DEPTH_DATASETS[kind]
                samples = iter_depth_dataset(kind, path, filelists.get(kind), kitti_crop=kitti_crop,
                                             limit=args.limit)
                rng, res, amr = (spec.min_depth, spec.max_depth), spec.processing_res, spec.alignment_max_res
            # The engine reads its processing resolution per call (per-dataset values of the official protocol).
            engine.config.processing_res = args.processing_res if args.processing_res is not None else res
            groups: dict[str, list[dict]] = defaultdict(list)
            for s in samples:
                row = _depth_row(engine, s, kind, rng, amr)
                groups[s.group].append(row)
                per_image.append(row)
            if not groups:
                raise SystemExit(f"dataset {kind}:{path} produced no samples")
            all_rows = [r for rs in groups.values() for r in rs]
            summary = _summarise_depth(all_rows, skip_empty=kind == "manifest")
            if summary["num_images"] == 0:
                raise SystemExit(f"dataset {kind}:{path} has no image with valid depth")
            summary.update(processing_res=engine.config.processing_res, alignment_max_res=amr)
            results["depth"][kind] = summary
            if kind == "manifest" and len(groups) > 1:
                for g, rs in groups.items():
                    results["depth"][f"manifest/{g}"] = _summarise_depth(rs, skip_empty=True)
        else:
            benchmark = kind != "normals"
            res = 0 if benchmark else MANIFEST_PROCESSING_RES
            engine.config.processing_res = args.processing_res if args.processing_res is not None else res
            normals_input = args.normals_input or ("dsine" if benchmark else "raw")
            if benchmark:
                samples = iter_normals_dataset(kind, path, filelists.get(kind), limit=args.limit)
            else:
                samples = iter_normals_manifest(path, limit=args.limit)
            pooled: dict[str, list[np.ndarray]] = defaultdict(list)
            empty: dict[str, list[str]] = defaultdict(list)
            for s in samples:
                image = dsine_model_input(s.rgb) if normals_input == "dsine" else s.rgb
                pred = engine.predict(image, tasks=["normals"]).normals[0]  # [H,W,3] float32 optical
                if pred.shape[:2] != s.normals.shape[:2]:
                    logger.info("%s: prediction %s resized to GT %s", s.name, pred.shape[:2], s.normals.shape[:2])
                    pred = _resize_normals(pred, s.normals.shape[:2])
                if not s.mask.any():
                    logger.warning("%s: %s has no valid ground-truth normal (adds no pixel)", kind, s.name)
                    empty[s.group].append(s.name)
                pooled[s.group].append(angular_errors_deg(pred, s.normals, s.mask))
            if not pooled:
                raise SystemExit(f"normals dataset {kind}:{path} has no entries with normals")
            for g, errs in pooled.items():
                m = normal_metrics(np.concatenate(errs))
                m.update(num_images=len(errs), processing_res=engine.config.processing_res,
                         input_image=normals_input, images_without_valid_pixels=empty[g])
                results["normals"][g] = m
        logger.info("%s done in %.1f s", kind, time.perf_counter() - t_start)

    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2))
    (out_dir / "metrics.md").write_text(markdown_table(results))
    if per_image:
        keys = list(per_image[0].keys())
        with open(out_dir / "per_image_depth.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(per_image)
    return results


def _fmt(v: float, scale: float = 1.0, nd: int = 2) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * scale:.{nd}f}"


def markdown_table(results: dict) -> str:
    """Depth and normals tables; AbsRel and deltas x100 like the paper's tables (docs/method.md#paper-numbers)."""
    lines: list[str] = []
    notes: list[str] = []
    if results.get("depth"):
        lines += [
            "### Depth (affine-invariant, LS scale+shift per image)",
            "",
            "| dataset | images | AbsRel x100 | delta1 x100 | SqRel | RMSE [m] | RMSE-log | log10 | delta2 x100 "
            "| delta3 x100 | iRMSE | SI-log |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, m in results["depth"].items():
            lines.append(
                f"| {name} | {m['num_images']} | {_fmt(m['abs_relative_difference'], 100)} | "
                f"{_fmt(m['delta1_acc'], 100)} | {_fmt(m['squared_relative_difference'], 1, 3)} | "
                f"{_fmt(m['rmse_linear'], 1, 3)} | {_fmt(m['rmse_log'], 1, 3)} | {_fmt(m['log10'], 1, 3)} | "
                f"{_fmt(m['delta2_acc'], 100)} | {_fmt(m['delta3_acc'], 100)} | {_fmt(m['i_rmse'], 1, 3)} | "
                f"{_fmt(m['silog_rmse'], 1, 2)} |"
            )
            empty, bad = m.get("images_without_valid_pixels", []), m.get("images_with_nonfinite_metrics", [])
            if empty:
                notes.append(f"- {name}: {len(empty)} image(s) without valid ground truth, "
                             f"{m.get('empty_images', '')}: {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}")
            if bad:
                notes.append(f"- {name}: {len(bad)} image(s) with inf/NaN metrics (kept in the mean): "
                             f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
        lines.append("")
    if results.get("normals"):
        lines += [
            "### Normals (angular error in degrees, pixels pooled per dataset, ROS optical frame)",
            "",
            "| dataset | images | pixels | mean | median | RMSE | <5 % | <7.5 % | <11.25 % | <22.5 % | <30 % |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, m in results["normals"].items():
            lines.append(
                f"| {name} | {m['num_images']} | {m['num_pixels']} | {_fmt(m['mean'], 1, 3)} | "
                f"{_fmt(m['median'], 1, 3)} | {_fmt(m['rmse'], 1, 3)} | {_fmt(m['a5'], 1, 3)} | "
                f"{_fmt(m['a7.5'], 1, 3)} | {_fmt(m['a11.25'], 1, 3)} | {_fmt(m['a22.5'], 1, 3)} | "
                f"{_fmt(m['a30'], 1, 3)} |"
            )
            if m.get("images_without_valid_pixels"):
                notes.append(f"- {name}: {len(m['images_without_valid_pixels'])} image(s) without valid "
                             "ground-truth normals (no pixels pooled)")
        lines.append("")
    if notes:
        lines += ["Notes:", "", *notes, ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``geodiff_eval``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    results = evaluate(args)
    print(markdown_table(results))  # noqa: T201 - CLI output
    logger.info("Wrote %s/metrics.json and metrics.md", args.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
