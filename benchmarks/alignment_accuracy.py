"""Accuracy of the metric scale/shift alignment on real KITTI LiDAR and TUM RGB-D depth.

No model runs here. The "relative depth" a model would produce is simulated from the ground truth:

    z_model = z_gt * (1 + A * n(u, v))          n: smooth low-frequency field, max |n| = 1, A = --noise (3 %)
    rel     = (z_model - min) / (max - min)      affine distortion to [0, 1] over the valid pixels

so the best achievable AbsRel is set by the noise field alone (reported as the "oracle" row: weighted LS on all GT
points, no outliers). "lsq_ungated" is the same weighted LS on the fit points with no gate, to show what the
gates of ``fit_scale_shift`` keep from being published. The sparse fit set is
  * KITTI: the projected single-scan Velodyne depth (~4 % of pixels), split 80/20 into fit / held-out;
  * TUM:   2 % of the pixels sampled from the semi-dense Kinect depth (LiDAR-like sparsity), split 80/20;
           also evaluated on every valid pixel of the semi-dense depth ("dense").
With ``--outliers`` (default 10 %) that fraction of the *fit* points gets a gross error (x1.5-3 or x0.3-0.6, half
each, like LiDAR points seen behind an edge or hitting a foreground object); evaluation points stay clean.
Metrics: AbsRel = mean |pred - gt| / gt, delta1 = share of points with max(pred/gt, gt/pred) < 1.25, on
``pred = s * rel + t`` (unclipped). Failed fits (ok=False) are counted and excluded from the error means.

Run:  .venv/bin/python benchmarks/alignment_accuracy.py [--data DIR] [--seeds 5]
Writes benchmarks/results/alignment_accuracy.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from geodiff_ros.geometry import AlignmentResult, fit_scale_shift  # noqa: E402

METHODS = ("ransac", "irls", "lsq")
SETS = {"kitti_object_lidar": "kitti", "tum_fr2_desk_slambook2": "tum", "tum_open3d": "tum"}


def smooth_field(h: int, w: int, rng: np.random.Generator, n_waves: int = 4) -> np.ndarray:
    """Sum of random planar cosines with periods of 0.5-2 image widths, scaled to max |n| = 1."""
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    field = np.zeros((h, w))
    for _ in range(n_waves):
        period = rng.uniform(0.5, 2.0) * max(h, w)
        theta = rng.uniform(0, np.pi)
        phase = rng.uniform(0, 2 * np.pi)
        field += rng.uniform(0.5, 1.0) * np.cos(2 * np.pi * (u * np.cos(theta) + v * np.sin(theta)) / period + phase)
    return field / np.abs(field).max()


def metrics(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """AbsRel and delta1; a non-positive prediction counts as a delta1 miss."""
    absrel = float(np.mean(np.abs(pred - gt) / gt))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.maximum(pred / gt, gt / pred)
    delta1 = float(np.mean((pred > 0) & (ratio < 1.25)))
    return absrel, delta1


def ungated_lsq(rel: np.ndarray, sparse: np.ndarray) -> AlignmentResult:
    """Weighted (1/z^2) LS with no gate at all, to show what the gates of ``fit_scale_shift`` protect from."""
    m = sparse > 0
    r, z = rel[m], sparse[m]
    a = np.stack([r, np.ones_like(r)], axis=1) / z[:, None]
    (s, t), *_ = np.linalg.lstsq(a, np.ones_like(z), rcond=None)
    return AlignmentResult(True, float(s), float(t), int(m.sum()), 0, float("nan"), "ungated", "lsq_ungated")


def run_frame(entry: dict, data: Path, seed: int, noise: float, outlier_frac: float, tum_frac: float) -> list[dict]:
    """All methods x {clean, outliers} on one frame with one seed."""
    rng = np.random.default_rng(seed)
    gt = np.asarray(Image.open(data / entry["depth"]), dtype=np.float64) / entry["depth_scale"]
    valid = gt > 0
    h, w = gt.shape
    z_model = gt * (1.0 + noise * smooth_field(h, w, rng))
    lo, hi = z_model[valid].min(), z_model[valid].max()
    rel = np.where(valid, (z_model - lo) / (hi - lo), np.nan)

    kind = SETS[entry["set"]]
    vv, uu = np.nonzero(valid)
    if kind == "tum":  # LiDAR-like sparsity: tum_frac of all pixels, drawn from the valid ones
        pick = rng.choice(vv.size, min(int(tum_frac * h * w), vv.size), replace=False)
        vv, uu = vv[pick], uu[pick]
    order = rng.permutation(vv.size)
    n_fit = int(0.8 * vv.size)
    fit_idx, held_idx = order[:n_fit], order[n_fit:]
    hv, hu = vv[held_idx], uu[held_idx]

    # Oracle: weighted LS on all valid GT pixels, no outliers -> the floor set by the noise field.
    oracle = fit_scale_shift(rel, np.where(valid, gt, 0.0), method="lsq", min_inlier_ratio=0.0)

    rows = []
    for out_frac in (0.0, outlier_frac):
        sparse = np.zeros_like(gt)
        fv, fu = vv[fit_idx], uu[fit_idx]
        sparse[fv, fu] = gt[fv, fu]
        n_bad = int(round(out_frac * fv.size))
        if n_bad:
            bad = rng.choice(fv.size, n_bad, replace=False)
            far = rng.random(n_bad) < 0.5
            factor = np.where(far, rng.uniform(1.5, 3.0, n_bad), rng.uniform(0.3, 0.6, n_bad))
            sparse[fv[bad], fu[bad]] *= factor
        candidates = [("oracle", oracle, 0.0)] if out_frac == 0.0 else []
        for method in METHODS:
            t0 = time.perf_counter()
            res = fit_scale_shift(rel, sparse, method=method, seed=seed)
            candidates.append((method, res, (time.perf_counter() - t0) * 1e3))
        candidates.append(("lsq_ungated", ungated_lsq(rel, sparse), float("nan")))
        for method, res, ms in candidates:
            row = {
                "set": kind, "noise": noise, "frame": entry["depth"], "seed": seed, "outliers": out_frac,
                "method": method,
                "ok": res.ok, "reason": res.reason, "scale": res.scale, "shift": res.shift,
                "n_fit": res.n_points, "n_inliers": res.n_inliers, "fit_ms": ms,
                "n_heldout": int(hv.size),
            }
            if res.ok:
                row["absrel_heldout"], row["delta1_heldout"] = metrics(res.scale * rel[hv, hu] + res.shift, gt[hv, hu])
                if kind == "tum":
                    row["absrel_dense"], row["delta1_dense"] = metrics(
                        res.scale * rel[valid] + res.shift, gt[valid]
                    )
            rows.append(row)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Mean over frames and seeds per (set, noise, outliers, method)."""
    out = []
    order = {"oracle": 0, "ransac": 1, "irls": 2, "lsq": 3, "lsq_ungated": 4}
    keys = sorted({(r["set"], r["noise"], r["outliers"], r["method"]) for r in rows},
                  key=lambda k: (k[0], k[1], k[2], order[k[3]]))
    for key in keys:
        kind, noise, outl, method = key
        rs = [r for r in rows if (r["set"], r["noise"], r["outliers"], r["method"]) == key]
        ok = [r for r in rs if r["ok"]]
        s = {"set": kind, "noise": noise, "outliers": outl, "method": method, "runs": len(rs), "ok": len(ok),
             "n_fit_mean": float(np.mean([r["n_fit"] for r in rs]))}
        for m in ("absrel_heldout", "delta1_heldout", "absrel_dense", "delta1_dense", "fit_ms"):
            vals = [r[m] for r in ok if m in r and np.isfinite(r[m])]
            s[m] = float(np.mean(vals)) if vals else None
        out.append(s)
    return out


def main() -> None:
    """Parse flags, run every frame x seed, print the table and write the JSON."""
    default_data = Path(os.environ.get("GEODIFF_SHARED_DATA", REPO.parent / "shared" / "data"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=default_data, help="shared data folder with manifest.json")
    ap.add_argument("--seeds", type=int, default=5, help="noise/split/outlier seeds per frame")
    ap.add_argument("--noise", type=float, nargs="+", default=[0.03, 0.10],
                    help="amplitude(s) A of the smooth multiplicative noise")
    ap.add_argument("--outliers", type=float, default=0.10, help="fraction of fit points given gross errors")
    ap.add_argument("--tum-frac", type=float, default=0.02, help="share of TUM pixels used as sparse points")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "alignment_accuracy.json")
    args = ap.parse_args()

    manifest = args.data / "manifest.json"
    if not manifest.is_file():
        raise SystemExit(f"no manifest.json in {args.data}; pass --data or set GEODIFF_SHARED_DATA")
    entries = [e for e in json.loads(manifest.read_text()) if e["set"] in SETS]
    rows = []
    for e in entries:
        for noise in args.noise:
            for seed in range(args.seeds):
                rows.extend(run_frame(e, args.data, seed, noise, args.outliers, args.tum_frac))
    summary = summarize(rows)

    def f(x: float | None, fmt: str) -> str:
        return format(x, fmt) if x is not None else "-"

    header = (f"{'set':6} {'noise':>5} {'outl':>5} {'method':11} {'ok':>6} {'n_fit':>7} {'AbsRel_ho':>10} {'d1_ho':>7} "
              f"{'AbsRel_dense':>12} {'d1_dense':>8} {'fit_ms':>7}")
    print(header)
    print("-" * len(header))
    for s in summary:
        print(f"{s['set']:6} {100 * s['noise']:4.0f}% {100 * s['outliers']:4.0f}% {s['method']:11} "
              f"{s['ok']:>2}/{s['runs']:<3} "
              f"{s['n_fit_mean']:7.0f} {f(s['absrel_heldout'], '10.4f')} {f(s['delta1_heldout'], '7.4f')} "
              f"{f(s['absrel_dense'], '12.4f')} {f(s['delta1_dense'], '8.4f')} {f(s['fit_ms'], '7.2f')}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "description": __doc__,
        "config": {"noise_amplitudes": args.noise, "outlier_fraction": args.outliers, "tum_sparse_fraction":
                   args.tum_frac, "seeds": args.seeds, "fit_heldout_split": [0.8, 0.2],
                   "frames": [e["depth"] for e in entries], "fit_defaults": "min_points=20, min_inlier_ratio=0.5, "
                   "inlier_threshold_rel=0.1, weights=relative (1/z^2)"},
        "machine": {"python": platform.python_version(), "numpy": np.__version__, "cpu": platform.processor()
                    or platform.machine()},
        "summary": summary,
        "runs": rows,
    }, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
