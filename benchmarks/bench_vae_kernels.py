"""The fused VAE's kernels on their own: bytes, Hopper build, correctness and speed per kernel.

CPU (no GPU needed):
    --plan   launches and bytes of every pass of the full-size SD2 VAE at --size (meta tensors), and the time they
             need at --bandwidth: the memory floor of the non-convolution work
    --aot    every kernel specialisation the full-size VAE uses, compiled for sm_90a with Triton's bundled ptxas:
             registers, spills, load/store widths (16-byte accesses show as .v4.b32)
CUDA (the default):
    copy bandwidth (device-to-device copy, bytes read + written); the kernels against vae_kernels.TorchOps on
    random data and the fused VAE against diffusers' VAE in fp32 (TF32 off); every launch of one encode and one
    decode (batch 1 and 2) timed in place (CUDA events; a sleep kernel first so the host runs ahead) -> GB/s per
    kernel and per kind, against the copy bandwidth; --sweep: tile shapes on the largest maps, the fastest written to
    --config-out (for bench_engine.py --kernel-config); sub-pixel vs nearest-upsample + 3x3 convolution per
    upsampler; VAE attention "sdpa" vs "gemm"; whole encode / decode per variant as CUDA-graph replays.

    python benchmarks/bench_vae_kernels.py --plan --aot                      # CPU
    python benchmarks/bench_vae_kernels.py --sweep --config-out cfg.json --out benchmarks/results/vae_kernels_h200.json
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "benchmarks"))
from bench_engine import SD2_VAE  # noqa: E402

from geodiff_ros.engine import vae_kernels  # noqa: E402
from geodiff_ros.engine.fused_vae import FusedVAE  # noqa: E402
from geodiff_ros.engine.vae_kernels import TorchOps, TritonOps  # noqa: E402

LOG = logging.getLogger("bench_vae_kernels")
SWEEP = {"stats": [(4096, 8), (2048, 4), (8192, 8)], "apply": [(8192, 8), (4096, 4), (16384, 8)]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="768x576", help="VAE input WxH (processing size)")
    p.add_argument("--plan", action="store_true")
    p.add_argument("--aot", action="store_true")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--bandwidth", type=float, default=4.3, help="TB/s for --plan (H200 copy rate measured here)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", default="correctness,launches,ab,whole_vae",
                   help="CUDA steps to run: correctness, launches, ab, whole_vae (--sweep adds the sweep)")
    p.add_argument("--config-out", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


class RecordingOps(TritonOps):
    """TritonOps that records each launch (and optionally times it with CUDA events) instead of / around it."""

    def __init__(self, launch: bool, timed: bool = False) -> None:
        super().__init__()
        self.launch, self.timed = launch, timed
        self.log: list[dict[str, Any]] = []

    def _launch(self, kernel: str, grid: tuple[int, ...], args: tuple, meta: dict, nbytes: int) -> None:
        entry: dict[str, Any] = {"kernel": kernel, "grid": grid, "meta": meta, "bytes": nbytes, "args": args,
                                 "shape": [tuple(a.shape) for a in args[:1]]}
        if self.timed:
            entry["events"] = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            entry["events"][0].record()
        if self.launch:
            super()._launch(kernel, grid, args, meta, nbytes)
        if self.timed:
            entry["events"][1].record()
        self.log.append(entry)


def full_size_vae(device: str, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKL

    with torch.device(device):
        torch.manual_seed(1)
        vae = AutoencoderKL(**SD2_VAE).to(dtype).eval()
    return vae.to(memory_format=torch.channels_last)


def nhwc_input(b: int, c: int, h: int, w: int, device: str, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    t = torch.rand(b, c, h, w, device=device, dtype=torch.float32, generator=gen) * 2 - 1
    return t.to(dtype).contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------------- CPU: plan, aot


def plan(size: tuple[int, int], bandwidth: float) -> dict[str, Any]:
    """Launches and bytes per stage (meta tensors), and their time at ``bandwidth`` TB/s."""
    vae = full_size_vae("meta", torch.float16)
    w, h = size
    out: dict[str, Any] = {"size": f"{w}x{h}", "bandwidth_tbs": bandwidth, "stages": {}}
    for name, batch in (("encode", 1), ("decode", 1), ("decode_b2", 2)):
        ops = RecordingOps(launch=False)
        fused = FusedVAE(vae, ops, subpixel=True, attention="gemm")
        with torch.no_grad():
            if name == "encode":
                fused.encode(torch.empty(1, 3, h, w, device="meta", dtype=torch.float16).contiguous(
                    memory_format=torch.channels_last))
            else:
                fused.decode(torch.empty(batch, 4, h // 8, w // 8, device="meta", dtype=torch.float16))
        by_kind: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        for e in ops.log:
            by_kind[e["kernel"]][0] += 1
            by_kind[e["kernel"]][1] += e["bytes"]
        total = sum(e["bytes"] for e in ops.log)
        out["stages"][name] = {"launches": len(ops.log), "gb": total / 1e9,
                               "floor_ms": total / (bandwidth * 1e12) * 1e3,
                               "by_kernel": {k: {"launches": n, "gb": b / 1e9} for k, (n, b) in by_kind.items()}}
    return out


def specialisations(size: tuple[int, int]) -> list[dict[str, Any]]:
    """One recorded launch per distinct kernel specialisation used by encode, decode (batch 1 and 2)."""
    vae = full_size_vae("meta", torch.float16)
    w, h = size
    seen: dict[tuple, dict[str, Any]] = {}
    for subpixel in (True, False):
        ops = RecordingOps(launch=False)
        fused = FusedVAE(vae, ops, subpixel=subpixel, attention="gemm")
        with torch.no_grad():
            fused.encode(torch.empty(1, 3, h, w, device="meta", dtype=torch.float16).contiguous(
                memory_format=torch.channels_last))
            for b in (1, 2):
                fused.decode(torch.empty(b, 4, h // 8, w // 8, device="meta", dtype=torch.float16))
        for e in ops.log:
            seen.setdefault((e["kernel"], tuple(sorted(e["meta"].items()))), e)
    return list(seen.values())


def aot_report(size: tuple[int, int], arch: int = 90) -> list[dict[str, Any]]:
    """Compile every specialisation for sm_90a; ptxas -v for registers and spills; PTX load/store widths."""
    import os

    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    rows = []
    for e in specialisations(size):
        start = time.perf_counter()
        compiled = vae_kernels.compile_for(e["kernel"], e["args"], e["meta"], arch)
        ptx = compiled.asm["ptx"]
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as fh:
            fh.write(ptx)
        info = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", fh.name, "-o", os.devnull], capture_output=True,
                              text=True, check=False).stderr
        os.unlink(fh.name)
        regs = re.search(r"Used (\d+) registers", info)
        spills = re.search(r"(\d+) bytes spill stores", info)
        rows.append({"kernel": e["kernel"], "meta": {k: v for k, v in e["meta"].items() if v is not False},
                     "registers": int(regs.group(1)) if regs else None,
                     "spill_store_bytes": int(spills.group(1)) if spills else 0,
                     "loads": sorted(set(re.findall(r"ld\.global[.\w]*", ptx))),
                     "stores": sorted(set(re.findall(r"st\.global[.\w]*", ptx))),
                     "compile_s": round(time.perf_counter() - start, 2)})
    return rows


# ------------------------------------------------------------------------------------------------- CUDA


def copy_bandwidth(reps: int = 20) -> float:
    """TB/s of a 2 GiB device-to-device copy, bytes read + written (the ceiling for the GB/s columns)."""
    src = torch.empty(2**30, dtype=torch.float16, device="cuda").uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return 2 * src.numel() * 2 / float(np.median(times)) / 1e12


def gpu_correctness() -> dict[str, Any]:
    """Kernels vs TorchOps (random data, GPU), the fused VAE vs diffusers' VAE (fp32, TF32 off; fp16 vs fp32)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    tr, ref = TritonOps(), TorchOps(chunk=512)
    out: dict[str, Any] = {"kernels": []}
    for dtype in (torch.float32, torch.float16):
        for b, c, h, w in ((1, 128, 96, 128), (2, 512, 18, 24), (1, 256, 37, 53)):
            x = nhwc_input(b, c, h, w, "cuda", dtype, 1) * 3 + 0.7
            r = nhwc_input(b, c, h, w, "cuda", dtype, 2)
            bias = torch.randn(c, device="cuda", dtype=dtype)
            gamma, beta = torch.randn(c, device="cuda"), torch.randn(c, device="cuda")
            o1, s1 = tr.fused_pass(x, res=r, bias=bias)
            o2, s2 = ref.fused_pass(x, res=r, bias=bias)
            sc1, sh1 = tr.group_stats(s1, 32, gamma, beta, 1e-6, bias)
            sc2, sh2 = ref.group_stats(s2, 32, gamma, beta, 1e-6, bias)
            a1, a2 = tr.apply(o1, sc1, sh1, True), ref.apply(o1, sc2, sh2, True)
            y = nhwc_input(b, 4 * c, h // 2 + 1, w // 2 + 1, "cuda", dtype, 3)
            q1, _ = tr.fused_pass(y, bias=bias, shuffle=True)
            q2, _ = ref.fused_pass(y, bias=bias, shuffle=True)
            out["kernels"].append({
                "dtype": str(dtype).replace("torch.", ""), "shape": [b, c, h, w],
                "pass_max_abs": (o1.float() - o2.float()).abs().max().item(),
                "scale_rel": ((sc1 - sc2).abs().max() / sc2.abs().max()).item(),
                "shift_max_abs": (sh1 - sh2).abs().max().item(),
                "apply_max_abs": (a1.float() - a2.float()).abs().max().item(),
                "shuffle_max_abs": (q1.float() - q2.float()).abs().max().item()})
    vae32 = full_size_vae("cuda", torch.float32)
    x = nhwc_input(1, 3, 192, 256, "cuda", torch.float32, 4)
    with torch.no_grad():
        z_ref = vae32.encode(x).latent_dist.mean * 0.18215
        y_ref = vae32.decode(z_ref / 0.18215).sample
        for name, vae, dt in (("fp32", vae32, torch.float32), ("fp16", full_size_vae("cuda", torch.float16),
                                                                 torch.float16)):
            for attention in ("gemm",) if name == "fp32" else ("gemm", "sdpa"):
                fused = FusedVAE(vae, TritonOps(), subpixel=True, attention=attention)
                z = fused.encode(x.to(dt)).float()
                y = fused.decode(z_ref.to(dt)).float()
                out[f"vae_{name}_{attention}"] = {
                    "encode_rel": ((z - z_ref).norm() / z_ref.norm()).item(),
                    "decode_rel": ((y - y_ref).norm() / y_ref.norm()).item(),
                    "decode_max_abs": (y - y_ref).abs().max().item(), "finite": bool(torch.isfinite(y).all())}
            if name == "fp16":  # eager diffusers fp16 against the same fp32 reference: fp16's own error
                y16 = vae.decode(z_ref.half() / 0.18215).sample.float()
                out["vae_fp16_eager_diffusers"] = {"decode_rel": ((y16 - y_ref).norm() / y_ref.norm()).item(),
                                                   "decode_max_abs": (y16 - y_ref).abs().max().item()}
    del vae32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return out


def timed_launches(vae: Any, size: tuple[int, int], reps: int, subpixel: bool = True) -> list[dict[str, Any]]:
    """Every kernel launch of encode, decode and decode of 2, timed in place (median of ``reps`` runs)."""
    w, h = size
    x = nhwc_input(1, 3, h, w, "cuda", torch.float16)
    z = {b: torch.randn(b, 4, h // 8, w // 8, device="cuda", dtype=torch.float16) for b in (1, 2)}
    runs: dict[str, list[list[dict[str, Any]]]] = defaultdict(list)
    with torch.no_grad():
        for rep in range(reps + 1):
            for stage, fn in (("encode", lambda f: f.encode(x)), ("decode", lambda f: f.decode(z[1])),
                              ("decode_b2", lambda f: f.decode(z[2]))):
                ops = RecordingOps(launch=True, timed=rep > 0)
                fused = FusedVAE(vae, ops, subpixel=subpixel, attention="gemm")
                torch.cuda.synchronize()
                torch.cuda._sleep(100_000_000)  # ~50 ms: the host enqueues the whole stage ahead of the GPU
                fn(fused)
                torch.cuda.synchronize()
                if rep > 0:
                    runs[stage].append([{"kernel": e["kernel"], "bytes": e["bytes"], "shape": e["shape"],
                                         "meta": {k: v for k, v in e["meta"].items() if v is not False},
                                         "ms": e["events"][0].elapsed_time(e["events"][1])} for e in ops.log])
    rows = []
    for stage, reps_list in runs.items():
        for i, e in enumerate(reps_list[0]):
            ms = float(np.median([r[i]["ms"] for r in reps_list]))
            rows.append({**e, "stage": stage, "index": i, "ms": ms, "gbs": e["bytes"] / (ms * 1e-3) / 1e9})
    return rows


def summarise(rows: list[dict[str, Any]], copy_tbs: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stage in sorted({r["stage"] for r in rows}):
        sel = [r for r in rows if r["stage"] == stage]
        kinds: dict[str, Any] = {}
        for kind in sorted({r["kernel"] for r in sel}):
            k = [r for r in sel if r["kernel"] == kind]
            ms, gb = sum(r["ms"] for r in k), sum(r["bytes"] for r in k) / 1e9
            big = [r for r in k if r["bytes"] >= 50e6]  # full-resolution maps: where the bytes are
            kinds[kind] = {"launches": len(k), "ms": ms, "gb": gb, "gbs": gb / (ms * 1e-3),
                           "pct_of_copy": 100 * gb / (ms * 1e-3) / (copy_tbs * 1e3),
                           "gbs_launches_over_50MB": (sum(r["bytes"] for r in big) / 1e9
                                                      / (sum(r["ms"] for r in big) * 1e-3)) if big else None}
        total_ms = sum(r["ms"] for r in sel)
        total_gb = sum(r["bytes"] for r in sel) / 1e9
        out[stage] = {"kernels_ms": total_ms, "gb": total_gb, "gbs": total_gb / (total_ms * 1e-3),
                      "pct_of_copy": 100 * total_gb / (total_ms * 1e-3) / (copy_tbs * 1e3), "by_kernel": kinds}
    return out


def event_time(fn: Any, reps: int = 20, inner: int = 5) -> float:
    """Median ms of ``fn`` (each sample: ``inner`` back-to-back calls behind a sleep kernel)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        torch.cuda._sleep(2_000_000)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / inner)
    return float(np.median(times))


def sweep(copy_tbs: float) -> dict[str, Any]:
    """Tile shapes of the statistics pass and of apply on the largest maps; the fastest (total time) wins."""
    tr = TritonOps()
    shapes = [(1, 128, 576, 768), (1, 512, 144, 192)]
    data = {s: (nhwc_input(*s, "cuda", torch.float16, 5), nhwc_input(*s, "cuda", torch.float16, 6)) for s in shapes}
    bias = {s[1]: torch.randn(s[1], device="cuda", dtype=torch.float16) for s in shapes}
    result: dict[str, Any] = {"stats": [], "apply": []}
    default = {k: getattr(vae_kernels, k) for k in ("STATS_TILE", "STATS_WARPS", "APPLY_TILE", "APPLY_WARPS")}
    best: dict[str, Any] = dict(default)
    for tile, warps in SWEEP["stats"]:
        vae_kernels.STATS_TILE, vae_kernels.STATS_WARPS = tile, warps
        entry = {"tile": tile, "warps": warps, "launches": []}
        for s, (x, r) in data.items():
            calls = (("stats", lambda x=x: tr.fused_pass(x, write=False)),
                     ("res_bias_write_stats", lambda x=x, r=r, s=s: tr.fused_pass(x, res=r, bias=bias[s[1]])))
            for kind, call in calls:
                ms = event_time(call)
                n = x.numel() * 2 * (1 if kind == "stats" else 3)
                entry["launches"].append({"shape": s, "kind": kind, "ms": ms, "gbs": n / (ms * 1e-3) / 1e9,
                                          "pct_of_copy": 100 * n / (ms * 1e-3) / (copy_tbs * 1e12)})
        entry["total_ms"] = sum(e["ms"] for e in entry["launches"])
        result["stats"].append(entry)
    fastest = min(result["stats"], key=lambda e: e["total_ms"])
    best["STATS_TILE"], best["STATS_WARPS"] = fastest["tile"], fastest["warps"]
    vae_kernels.STATS_TILE, vae_kernels.STATS_WARPS = default["STATS_TILE"], default["STATS_WARPS"]
    c_of = {s: s[1] for s in shapes}
    for tile, warps in SWEEP["apply"]:
        vae_kernels.APPLY_TILE, vae_kernels.APPLY_WARPS = tile, warps
        entry = {"tile": tile, "warps": warps, "launches": []}
        for s, (x, _) in data.items():
            scale = torch.rand(1, c_of[s], device="cuda") + 0.5
            shift = torch.randn(1, c_of[s], device="cuda")
            ms = event_time(lambda x=x, scale=scale, shift=shift: tr.apply(x, scale, shift, True))
            n = 2 * x.numel() * 2
            entry["launches"].append({"shape": s, "ms": ms, "gbs": n / (ms * 1e-3) / 1e9,
                                      "pct_of_copy": 100 * n / (ms * 1e-3) / (copy_tbs * 1e12)})
        entry["total_ms"] = sum(e["ms"] for e in entry["launches"])
        result["apply"].append(entry)
    fastest = min(result["apply"], key=lambda e: e["total_ms"])
    best["APPLY_TILE"], best["APPLY_WARPS"] = fastest["tile"], fastest["warps"]
    vae_kernels.APPLY_TILE, vae_kernels.APPLY_WARPS = default["APPLY_TILE"], default["APPLY_WARPS"]
    result["best"] = best
    return result


def conv_and_attention_ab(vae: Any) -> dict[str, Any]:
    """Sub-pixel 2x2 convolution (+ its gather pass) vs nearest upsample + 3x3 convolution (+ the bias/stats pass it
    needs anyway), per decoder upsampler at 768x576; VAE attention sdpa vs gemm at 6912 tokens."""
    from geodiff_ros.engine.fused_vae import subpixel_weight

    tr = TritonOps()
    out: dict[str, Any] = {"upsample": [], "attention": []}
    with torch.no_grad():
        for c, h, w in ((512, 72, 96), (512, 144, 192), (256, 288, 384)):
            x = nhwc_input(1, c, h, w, "cuda", torch.float16, 7)
            w3 = (torch.randn(c, c, 3, 3, device="cuda", dtype=torch.float16) * 0.02).contiguous(
                memory_format=torch.channels_last)
            w2 = subpixel_weight(w3)
            bias = torch.randn(c, device="cuda", dtype=torch.float16)
            up = F.interpolate(x, scale_factor=2.0, mode="nearest")
            t = {"shape": [1, c, h, w],
                 "upsample_ms": event_time(lambda x=x: F.interpolate(x, scale_factor=2.0, mode="nearest")),
                 "conv3x3_ms": event_time(lambda up=up, w3=w3: F.conv2d(up, w3, None, 1, 1)),
                 "subpixel_conv_ms": event_time(lambda x=x, w2=w2: F.conv2d(x, w2, None, 1, 1))}
            y3 = F.conv2d(up, w3, None, 1, 1)
            y2 = F.conv2d(x, w2, None, 1, 1)
            t["bias_stats_pass_ms"] = event_time(lambda y3=y3, bias=bias: tr.fused_pass(y3, bias=bias))
            t["gather_bias_stats_pass_ms"] = event_time(lambda y2=y2, bias=bias: tr.fused_pass(y2, bias=bias,
                                                                                              shuffle=True))
            a, _ = tr.fused_pass(y3, bias=bias, stats=False)
            b, _ = tr.fused_pass(y2, bias=bias, shuffle=True, stats=False)
            t["max_abs_diff"] = (a.float() - b.float()).abs().max().item()
            t["original_ms"] = t["upsample_ms"] + t["conv3x3_ms"] + t["bias_stats_pass_ms"]
            t["subpixel_ms"] = t["subpixel_conv_ms"] + t["gather_bias_stats_pass_ms"]
            out["upsample"].append(t)
        ref = FusedVAE(vae, tr, attention="sdpa")
        gemm = FusedVAE(vae, tr, attention="gemm")
        for b in (1, 2):
            qkv = torch.randn(b, 6912, 3 * 512, device="cuda", dtype=torch.float16)
            q, k, v = (t.view(b, 6912, 1, 512).transpose(1, 2) for t in qkv.split(512, dim=-1))
            o1 = F.scaled_dot_product_attention(q, k, v)
            o2 = gemm._attention_gemm(q, k, v)
            out["attention"].append({
                "batch": b, "sdpa_ms": event_time(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)),
                "gemm_ms": event_time(lambda q=q, k=k, v=v: gemm._attention_gemm(q, k, v)),
                "max_abs_diff": (o1.float() - o2.float()).abs().max().item(),
                "scores_fallback": gemm.gemm_scores_error})
        del ref
    return out


def whole_vae(vae: Any, size: tuple[int, int]) -> list[dict[str, Any]]:
    """encode / decode (batch 1, 2) per fused variant, each replayed as its own CUDA graph (GPU time)."""
    w, h = size
    x = nhwc_input(1, 3, h, w, "cuda", torch.float16)
    z = {b: torch.randn(b, 4, h // 8, w // 8, device="cuda", dtype=torch.float16) for b in (1, 2)}
    rows = []
    for subpixel in (True, False):
        for attention in ("gemm", "sdpa"):
            fused = FusedVAE(vae, TritonOps(), subpixel=subpixel, attention=attention)
            row: dict[str, Any] = {"subpixel": subpixel, "attention": attention}
            for name, fn in (("encode", lambda f=fused: f.encode(x)),
                             ("decode", lambda f=fused: f.decode(z[1])),
                             ("decode_b2", lambda f=fused: f.decode(z[2]))):
                with torch.no_grad():
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        fn()
                        fn()
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        fn()
                    row[f"{name}_ms"] = event_time(graph.replay, reps=10, inner=3)
                    del graph
            rows.append(row)
            LOG.info("whole VAE %s", row)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    size = tuple(int(v) for v in args.size.lower().split("x"))
    result: dict[str, Any] = {"benchmark": "bench_vae_kernels", "issue": 11, "size": args.size,
                              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__,
                              "kernel_constants": {k: getattr(vae_kernels, k) for k in (
                                  "STATS_TILE", "STATS_WARPS", "APPLY_TILE", "APPLY_WARPS", "TARGET_PROGRAMS")}}

    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1, default=str))

    if args.plan:
        result["plan"] = plan(size, args.bandwidth)
        for stage, p in result["plan"]["stages"].items():
            print(f"{stage:10s} {p['launches']:3d} launches {p['gb']:6.2f} GB  floor {p['floor_ms']:.2f} ms at "
                  f"{args.bandwidth} TB/s  " + ", ".join(f"{k} {v['gb']:.2f} GB" for k, v in p["by_kernel"].items()))
        save()
    if args.aot:
        result["aot_sm90"] = aot_report(size)
        for r in result["aot_sm90"]:
            print(f"{r['kernel']:12s} regs {r['registers']} spills {r['spill_store_bytes']} {r['loads']} "
                  f"{r['stores']} {r['meta']}")
        save()
    if args.plan or args.aot:
        return 0
    import triton

    result.update(card=torch.cuda.get_device_name(), triton=triton.__version__, cuda=torch.version.cuda)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.benchmark_limit = 0
    result["copy_tbs"] = copy_tbs = copy_bandwidth()
    LOG.info("copy bandwidth %.2f TB/s", copy_tbs)
    save()
    vae = full_size_vae("cuda", torch.float16)
    available = {"correctness": gpu_correctness, "sweep": lambda: sweep(copy_tbs),
                 "launches": lambda: timed_launches(vae, size, args.reps), "ab": lambda: conv_and_attention_ab(vae),
                 "whole_vae": lambda: whole_vae(vae, size)}
    wanted = [s.strip() for s in args.steps.split(",") if s.strip()]
    if args.sweep and "sweep" not in wanted:
        wanted.insert(1 if "correctness" in wanted else 0, "sweep")
    steps = [(name, available[name]) for name in wanted]
    for name, fn in steps:
        start = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as exc:
            LOG.exception("%s failed", name)
            result.setdefault("errors", []).append(f"{name}: {type(exc).__name__}: {exc}")
        result.setdefault("step_s", {})[name] = round(time.perf_counter() - start, 1)
        if name == "launches" and name in result:
            result["summary"] = summarise(result["launches"], copy_tbs)
        if name == "sweep" and name in result and args.config_out:
            args.config_out.write_text(json.dumps(result["sweep"]["best"]))
        save()
    print(f"card {result['card']}  copy {copy_tbs:.2f} TB/s")
    for stage, s in result.get("summary", {}).items():
        print(f"{stage:10s} kernels {s['kernels_ms']:.3f} ms  {s['gb']:.2f} GB  {s['gbs']:.0f} GB/s "
              f"({s['pct_of_copy']:.0f}% of copy)  " + "; ".join(
                  f"{k} {v['launches']}x {v['ms']:.3f} ms {v['gbs']:.0f} GB/s ({v['pct_of_copy']:.0f}%)"
                  for k, v in s["by_kernel"].items()))
    if "sweep" in result:
        for kind in ("stats", "apply"):
            print(kind, [(e["tile"], e["warps"], round(e["total_ms"], 4)) for e in result["sweep"][kind]])
        print("best", result["sweep"]["best"])
    for t in result.get("ab", {}).get("upsample", []):
        print(f"upsample {t['shape']}: original {t['original_ms']:.3f} ms, sub-pixel {t['subpixel_ms']:.3f} ms, "
              f"max diff {t['max_abs_diff']:.2e}")
    for t in result.get("ab", {}).get("attention", []):
        print(f"attention b{t['batch']}: sdpa {t['sdpa_ms']:.3f} ms, gemm {t['gemm_ms']:.3f} ms, "
              f"max diff {t['max_abs_diff']:.2e}")
    for r in result.get("whole_vae", []):
        print("whole", r)
    print("correctness", json.dumps({k: v for k, v in result.get("correctness", {}).items() if k != "kernels"}))
    print("errors", result.get("errors"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
