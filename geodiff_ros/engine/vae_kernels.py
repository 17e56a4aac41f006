"""Memory-bound passes of the SD VAE as hand-written Triton kernels over NHWC activations.

The VAE spends most of its non-convolution time in GroupNorm statistics, GroupNorm-apply + SiLU and residual adds
over full-resolution maps (benchmarks/README.md, "Where the time goes"). Three kernels cover them, each reading and
writing every element once, with 16-byte accesses along the channel dimension (channels_last is [B,H,W,C] in memory):

    fused_pass   src (+ residual) (+ per-channel bias) -> optionally written out (also into a zero-padded buffer, or
                 gathered from the sub-pixel layout of fused_vae's upsampling convolution) and per-program partial
                 statistics (mean and M2 per channel) of the result: the next GroupNorm needs no pass of its own
    group_stats  partials -> per-sample, per-channel scale and shift of a GroupNorm (Chan's parallel combination of
                 the partial means and M2s, fp32; a conv bias still to be added is folded in here)
    apply        y = act(x * scale + shift): GroupNorm-apply (+ SiLU), written once

Numerics: fp32 arithmetic, one rounding to the output dtype per written element; the statistics are those of torch's
group_norm (biased variance, fp32), summed in another order and shifted per program (sums of x - K with K the first
tile's mean), so large means do not cancel.

``TorchOps`` implements the same interface with torch operations: the reference the tests compare the kernels with
(CPU, Triton interpreter: TRITON_INTERPRET=1), and the exact-algebra check of fused_vae in float64. ``TritonOps``
needs the ``triton`` package (bundled with CUDA builds of torch; optional otherwise).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

try:  # optional: CUDA builds of torch ship it; the CPU path never needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

HAVE_TRITON = triton is not None


def _interpreter_numpy_shim() -> None:
    """Triton 3.6's interpreter (CPU, TRITON_INTERPRET=1: the tests) turns loop bounds into ints with int() of a
    1-element array, which numpy >= 2.4 refuses; index through the first element instead."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "geodiff_shim", False):
        return

    def patched(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.geodiff_shim = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


if HAVE_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_numpy_shim()
# Tile shapes (bench_vae_kernels.py --sweep times alternatives; bench_engine.py --kernel-config applies a choice).
# H200 sweep (benchmarks/README.md): statistics pass 2048 elements x 4 warps beat 4096 x 8 and 8192 x 8
# (stats-only 128 ch @ 576x768: 2113 vs 1873 / 1341 GB/s; 512 ch @ 144x192: 1324 vs 523 / 522 GB/s); apply tiles
# within 2 % of each other.
APPLY_TILE = 4096  # elements per program of the apply kernel (8 KB of fp16 in, 8 KB out)
APPLY_WARPS = 4
STATS_TILE = 2048  # elements per loop step of the statistics pass
STATS_WARPS = 4
MAX_BLOCK_C = 512
MAX_SOFTMAX_ROW = 16384  # longest score row the softmax kernel holds in registers (processing_res 1024 at 4:3)
# Statistics programs per launch (more tiles per program above). H200 kernel profile per depth frame: 1024 programs
# 2.39 ms statistics passes + 0.41 ms group_stats (call 1), 4096: 3.70 + 0.92 ms (call 2: the partials of the small
# maps grew to the size of the data they summarise). A minimum chunk per program is the untested next step.
TARGET_PROGRAMS = 1024


@dataclass
class Stats:
    """Per-program partial statistics of an NHWC tensor: mean and M2 (sum of squared deviations) per channel."""

    mean: torch.Tensor  # [B, npb, C] float32 (float64 in TorchOps on float64 input)
    m2: torch.Tensor  # [B, npb, C]
    chunk: int  # pixels per program (the last program may hold fewer)
    pixels: int  # pixels per image


def nhwc(t: torch.Tensor) -> torch.Tensor:
    """``t`` [B,C,H,W] laid out channels_last ([B,H,W,C] in memory), copying only if it is not."""
    return t if t.is_contiguous(memory_format=torch.channels_last) else t.contiguous(memory_format=torch.channels_last)


def empty_nhwc(b: int, c: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised [B,C,H,W] channels_last tensor (allocated in that layout: no transposing copy)."""
    return torch.empty((b, c, h, w), dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


def padded_nhwc(b: int, c: int, h: int, w: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A [B,C,H+1,W+1] channels_last buffer with a zero last row and column, and its [B,C,H,W] interior view: the
    input of diffusers' Downsample2D (F.pad (0,1,0,1) then a stride-2 convolution) without a padding pass."""
    buf = empty_nhwc(b, c, h + 1, w + 1, like)
    buf[:, :, h, :].zero_()
    buf[:, :, :h, w].zero_()
    return buf, buf[:, :, :h, :w]


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _block_c(c: int) -> int:
    return min(_next_pow2(c), MAX_BLOCK_C)


def stats_geometry(batch: int, pixels: int, channels: int) -> tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_C, tiles per program, programs per image) of the statistics pass."""
    block_c = _block_c(channels)
    block_p = max(1, STATS_TILE // block_c)
    tiles = -(-pixels // block_p)
    per_image = max(1, TARGET_PROGRAMS // (batch * -(-channels // block_c)))
    iters = max(1, -(-tiles // per_image))
    return block_p, block_c, iters, -(-tiles // iters)


# ----------------------------------------------------------------------------------------------------- kernels

if HAVE_TRITON:

    @triton.jit
    def _fused_pass_kernel(src_ptr, res_ptr, bias_ptr, out_ptr, mean_ptr, m2_ptr,
                           P, C, W, src_bstride, res_bstride, out_bstride, iters, npb,
                           SHUFFLE: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr,
                           WRITE: tl.constexpr, OUT_PAD: tl.constexpr, STATS: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """One program: ``iters`` tiles of BLOCK_P pixels x BLOCK_C channels of one image; see fused_pass."""
        pb = tl.program_id(0)
        cb = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        shift = tl.zeros([BLOCK_C], tl.float32)
        acc1 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        acc2 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        start = pb * iters * BLOCK_P
        for t in range(iters):
            rows = start + t * BLOCK_P + tl.arange(0, BLOCK_P)
            rmask = rows < P
            mask = rmask[:, None] & cmask[None, :]
            if SHUFFLE:
                # src: the [B, h+1, w+1, 4C] output of the 2x2 sub-pixel convolution; pixel (y, x) of the 2h x 2w
                # result is phase (y % 2, x % 2) at (y // 2 + y % 2, x // 2 + x % 2) (fused_vae.subpixel_weight)
                y = rows // W
                x = rows - y * W
                ay = y % 2
                ax = x % 2
                spix = ((y // 2 + ay) * (W // 2 + 1) + x // 2 + ax).to(tl.int64)
                soff = spix[:, None] * (4 * C) + ((2 * ay + ax) * C)[:, None] + cols[None, :]
            else:
                soff = rows.to(tl.int64)[:, None] * C + cols[None, :]
            v = tl.load(src_ptr + b * src_bstride + soff, mask=mask, other=0.0).to(tl.float32)
            if HAS_RES:
                roff = rows.to(tl.int64)[:, None] * C + cols[None, :]
                v += tl.load(res_ptr + b * res_bstride + roff, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                v += bias[None, :]
            if WRITE:
                if OUT_PAD:  # [B, H+1, W+1, C] buffer: pixel (y, x) at y * (W + 1) + x = rows + y
                    opix = rows + rows // W
                else:
                    opix = rows
                ooff = opix.to(tl.int64)[:, None] * C + cols[None, :]
                tl.store(out_ptr + b * out_bstride + ooff, v.to(out_ptr.dtype.element_ty), mask=mask)
            if STATS:
                if t == 0:  # per-program shift: the first tile's channel means (keeps the sums small)
                    first = tl.minimum(P - start, BLOCK_P).to(tl.float32)
                    shift = tl.sum(tl.where(mask, v, 0.0), axis=0) / first
                d = tl.where(mask, v - shift[None, :], 0.0)
                acc1 += d
                acc2 += d * d
        if STATS:
            n = tl.minimum(P - start, iters * BLOCK_P).to(tl.float32)
            s1 = tl.sum(acc1, axis=0)
            s2 = tl.sum(acc2, axis=0)
            mean = shift + s1 / n
            m2 = tl.maximum(s2 - s1 * s1 / n, 0.0)
            poff = (b * npb + pb) * C + cols
            tl.store(mean_ptr + poff, mean, mask=cmask)
            tl.store(m2_ptr + poff, m2, mask=cmask)

    @triton.jit
    def _group_stats_kernel(mean_ptr, m2_ptr, bias_ptr, gamma_ptr, beta_ptr, scale_ptr, shift_ptr,
                            P, C, npb, chunk, eps,
                            HAS_BIAS: tl.constexpr, CPG: tl.constexpr, CPG_P2: tl.constexpr,
                            BLOCK_N: tl.constexpr):
        """One program per (image, group): Chan's combination of the partials, then scale/shift per channel."""
        b = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        ci = tl.arange(0, CPG_P2)
        cmask = ci < CPG
        cols = g * CPG + ci
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        else:
            bias = tl.zeros([CPG_P2], tl.float32)
        total = (P * CPG).to(tl.float32)
        acc = tl.zeros([BLOCK_N, CPG_P2], tl.float32)
        for n0 in range(0, npb, BLOCK_N):
            idx = n0 + tl.arange(0, BLOCK_N)
            m = (idx < npb)[:, None] & cmask[None, :]
            cnt = tl.minimum(tl.maximum(P - idx * chunk, 0), chunk).to(tl.float32)
            off = (b * npb + idx)[:, None] * C + cols[None, :]
            mu = tl.load(mean_ptr + off, mask=m, other=0.0) + bias[None, :]
            acc += tl.where(m, cnt[:, None] * mu, 0.0)
        gmean = tl.sum(tl.sum(acc, axis=1), axis=0) / total
        acc = tl.zeros([BLOCK_N, CPG_P2], tl.float32)
        for n0 in range(0, npb, BLOCK_N):
            idx = n0 + tl.arange(0, BLOCK_N)
            m = (idx < npb)[:, None] & cmask[None, :]
            cnt = tl.minimum(tl.maximum(P - idx * chunk, 0), chunk).to(tl.float32)
            off = (b * npb + idx)[:, None] * C + cols[None, :]
            mu = tl.load(mean_ptr + off, mask=m, other=0.0) + bias[None, :]
            m2 = tl.load(m2_ptr + off, mask=m, other=0.0)
            dev = mu - gmean
            acc += tl.where(m, m2 + cnt[:, None] * dev * dev, 0.0)
        var = tl.sum(tl.sum(acc, axis=1), axis=0) / total
        rstd = 1.0 / tl.sqrt(var + eps)
        gamma = tl.load(gamma_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
        beta = tl.load(beta_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        scale = gamma * rstd
        tl.store(scale_ptr + b * C + cols, scale, mask=cmask)
        tl.store(shift_ptr + b * C + cols, beta + (bias - gmean) * scale, mask=cmask)

    @triton.jit
    def _apply_kernel(src_ptr, scale_ptr, shift_ptr, out_ptr, P, C, src_bstride, out_bstride,
                      SILU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """y = act(x * scale[b, c] + shift[b, c]) over one BLOCK_P x BLOCK_C tile."""
        pb = tl.program_id(0)
        cb = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        rows = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        mask = (rows < P)[:, None] & cmask[None, :]
        scale = tl.load(scale_ptr + b * C + cols, mask=cmask, other=0.0)
        shift = tl.load(shift_ptr + b * C + cols, mask=cmask, other=0.0)
        off = rows.to(tl.int64)[:, None] * C + cols[None, :]
        v = tl.load(src_ptr + b * src_bstride + off, mask=mask, other=0.0).to(tl.float32)
        v = v * scale[None, :] + shift[None, :]
        if SILU:
            v = v * tl.sigmoid(v)
        tl.store(out_ptr + b * out_bstride + off, v.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _softmax_rows_kernel(src_ptr, out_ptr, L, scale, BLOCK: tl.constexpr):
        """softmax(scale * row) of an fp32 score row, written in the output dtype (one rounding)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < L
        s = tl.load(src_ptr + row * L + cols, mask=mask, other=-float("inf")) * scale
        e = tl.exp(s - tl.max(s, axis=0))
        e = tl.where(mask, e, 0.0)
        tl.store(out_ptr + row * L + cols, (e / tl.sum(e, axis=0)).to(out_ptr.dtype.element_ty), mask=mask)


KERNELS = ({"fused_pass": _fused_pass_kernel, "group_stats": _group_stats_kernel, "apply": _apply_kernel,
            "softmax_rows": _softmax_rows_kernel} if HAVE_TRITON else {})


def _check_nhwc(t: torch.Tensor, name: str) -> None:
    b, c, h, w = t.shape
    if t.stride(1) != 1 or (w > 1 and t.stride(3) != c) or (h > 1 and t.stride(2) != w * c):
        raise ValueError(f"{name} must be channels_last with unit channel stride and dense rows; got strides "
                         f"{t.stride()} for shape {tuple(t.shape)} (use vae_kernels.nhwc)")


class TritonOps:
    """The passes as Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1)."""

    name = "triton"

    def __init__(self) -> None:
        if not HAVE_TRITON:
            raise RuntimeError("the fused VAE kernels need the triton package (pip install triton, or a CUDA build "
                               "of torch, which bundles it); or use optimize without them (accel.FastPaths)")

    def fused_pass(self, src: torch.Tensor, *, res: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   write: bool = True, out: torch.Tensor | None = None, pad_out: bool = False,
                   shuffle: bool = False, stats: bool = True) -> tuple[torch.Tensor | None, Stats | None]:
        """(src (+ res) (+ bias)) -> written to ``out`` (new, or given; in place when out is src) and/or partial
        statistics. ``shuffle``: src is the [B,4C,h+1,w+1] sub-pixel convolution output of a [B,C,2h,2w] result.
        ``pad_out``: the result goes into the interior of a zero-padded [B,C,H+1,W+1] buffer, which is returned."""
        _check_nhwc(src, "src")
        b = src.shape[0]
        if shuffle:
            c, h, w = src.shape[1] // 4, 2 * (src.shape[2] - 1), 2 * (src.shape[3] - 1)
        else:
            c, h, w = src.shape[1:]
        pixels = h * w
        result = None
        if write:
            if pad_out:
                result, interior = padded_nhwc(b, c, h, w, src)
                out_bstride = result.stride(0)
            else:
                result = interior = out if out is not None else empty_nhwc(b, c, h, w, src)
                out_bstride = result.stride(0)
            if tuple(interior.shape) != (b, c, h, w):
                raise ValueError(f"out has shape {tuple(interior.shape)}, expected {(b, c, h, w)}")
        else:
            interior, out_bstride = src, 0
        if res is not None:
            _check_nhwc(res, "res")
            if tuple(res.shape) != (b, c, h, w):
                raise ValueError(f"res has shape {tuple(res.shape)}, expected {(b, c, h, w)}")
        block_p, block_c, iters, npb = stats_geometry(b, pixels, c)
        if stats:
            mean = torch.empty((b, npb, c), dtype=torch.float32, device=src.device)
            m2 = torch.empty_like(mean)
        else:
            mean = m2 = src  # unused pointers
        grid = (npb, -(-c // block_c), b)
        item = src.element_size()
        nbytes = (src.numel() + (res.numel() if res is not None else 0) + (b * c * pixels if write else 0)) * item
        self._launch("fused_pass", grid, (
            src, res if res is not None else src, bias if bias is not None else src,
            interior if write else src, mean, m2,
            pixels, c, w, src.stride(0), res.stride(0) if res is not None else 0, out_bstride, iters, npb),
            dict(SHUFFLE=shuffle, HAS_RES=res is not None, HAS_BIAS=bias is not None, WRITE=write, OUT_PAD=pad_out,
                 STATS=stats, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=STATS_WARPS), nbytes)
        return result, (Stats(mean, m2, iters * block_p, pixels) if stats else None)

    def group_stats(self, st: Stats, groups: int, gamma: torch.Tensor, beta: torch.Tensor, eps: float,
                    bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """GroupNorm scale and shift [B, C] (fp32) from partials; ``bias``: a per-channel bias not yet added to the
        tensor the statistics were taken of (folded into shift)."""
        b, npb, c = st.mean.shape
        cpg = c // groups
        scale = torch.empty((b, c), dtype=torch.float32, device=st.mean.device)
        shift = torch.empty_like(scale)
        self._launch("group_stats", (b, groups), (
            st.mean, st.m2, bias if bias is not None else gamma, gamma, beta, scale, shift,
            st.pixels, c, npb, st.chunk, float(eps)),
            dict(HAS_BIAS=bias is not None, CPG=cpg, CPG_P2=_next_pow2(cpg),
                 BLOCK_N=max(16, min(256, 4096 // _next_pow2(cpg))), num_warps=4), 2 * st.mean.numel() * 4)
        return scale, shift

    def apply(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, silu: bool) -> torch.Tensor:
        """act(x * scale + shift) per channel and image, a new channels_last tensor of x's dtype."""
        _check_nhwc(x, "x")
        b, c, h, w = x.shape
        out = empty_nhwc(b, c, h, w, x)
        block_c = _block_c(c)
        block_p = max(1, APPLY_TILE // block_c)
        grid = (-(-(h * w) // block_p), -(-c // block_c), b)
        self._launch("apply", grid, (x, scale, shift, out, h * w, c, x.stride(0), out.stride(0)),
                     dict(SILU=silu, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=APPLY_WARPS),
                     2 * x.numel() * x.element_size())
        return out

    def softmax_rows(self, scores: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
        """softmax(scale * scores) over the last dimension of contiguous fp32 scores, in ``dtype``."""
        length = scores.shape[-1]
        block = _next_pow2(length)
        if block > MAX_SOFTMAX_ROW or not scores.is_contiguous():
            return torch.softmax(scores * scale, dim=-1).to(dtype)
        out = torch.empty(scores.shape, dtype=dtype, device=scores.device)
        self._launch("softmax_rows", (scores.numel() // length,), (scores, out, length, float(scale)),
                     dict(BLOCK=block, num_warps=16 if block > 8192 else 8),
                     scores.numel() * (4 + out.element_size()))
        return out

    def _launch(self, kernel: str, grid: tuple[int, ...], args: tuple, meta: dict, nbytes: int) -> None:
        """Launch one kernel (overridden by benchmarks to record launches and the bytes each must move)."""
        KERNELS[kernel][grid](*args, **meta)


class TorchOps:
    """The same passes with torch operations: the reference for the kernels (and, in float64, for fused_vae's
    algebra). Statistics in float32 (float64 for float64 input) over chunks of ``chunk`` pixels, combined as the
    kernels do."""

    name = "torch"

    def __init__(self, chunk: int = 64) -> None:
        self.chunk = chunk

    @staticmethod
    def _acc(t: torch.Tensor) -> torch.dtype:
        return torch.float64 if t.dtype == torch.float64 else torch.float32

    def fused_pass(self, src: torch.Tensor, *, res: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   write: bool = True, out: torch.Tensor | None = None, pad_out: bool = False,
                   shuffle: bool = False, stats: bool = True) -> tuple[torch.Tensor | None, Stats | None]:
        acc = self._acc(src)
        v = src.to(acc)
        if shuffle:
            v = subpixel_shuffle(v)
        if res is not None:
            v = v + res.to(acc)
        if bias is not None:
            v = v + bias.to(acc).view(1, -1, 1, 1)
        b, c, h, w = v.shape
        result = None
        if write:
            if pad_out:
                result, interior = padded_nhwc(b, c, h, w, src)
            else:
                result = interior = out if out is not None else empty_nhwc(b, c, h, w, src)
            interior.copy_(v.to(src.dtype))
        st = None
        if stats:
            pixels = h * w
            npb = -(-pixels // self.chunk)
            flat = v.permute(0, 2, 3, 1).reshape(b, pixels, c)
            flat = torch.cat([flat, flat.new_zeros((b, npb * self.chunk - pixels, c))], dim=1)
            chunks = flat.view(b, npb, self.chunk, c)
            valid = (torch.arange(npb * self.chunk, device=v.device) < pixels).view(1, npb, self.chunk, 1)
            n = valid.sum(2).to(acc)  # [1,npb,1]
            mean = chunks.sum(2) / n
            m2 = torch.where(valid, (chunks - mean[:, :, None]) ** 2, 0).sum(2)
            st = Stats(mean, m2, self.chunk, pixels)
        return result, st

    def group_stats(self, st: Stats, groups: int, gamma: torch.Tensor, beta: torch.Tensor, eps: float,
                    bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b, npb, c = st.mean.shape
        acc = st.mean.dtype
        cnt = (st.pixels - torch.arange(npb, dtype=acc, device=st.mean.device) * st.chunk).clamp(0, st.chunk)
        mu = st.mean + (bias.to(acc).view(1, 1, c) if bias is not None else 0)
        cnt = cnt.view(1, npb, 1)
        total = st.pixels * (c // groups)
        gmean = (cnt * mu).view(b, npb, groups, -1).sum((1, 3)) / total  # [B,G]
        gmean_c = gmean.repeat_interleave(c // groups, dim=1)  # [B,C]
        dev = mu - gmean_c[:, None]
        var = (st.m2 + cnt * dev * dev).view(b, npb, groups, -1).sum((1, 3)) / total
        rstd = torch.rsqrt(var + eps).repeat_interleave(c // groups, dim=1)
        scale = gamma.to(acc).view(1, c) * rstd
        shift = beta.to(acc).view(1, c) + ((bias.to(acc).view(1, c) if bias is not None else 0) - gmean_c) * scale
        return scale, shift

    def softmax_rows(self, scores: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
        return torch.softmax(scores * scale, dim=-1).to(dtype)

    def apply(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, silu: bool) -> torch.Tensor:
        v = x.to(scale.dtype) * scale[:, :, None, None] + shift[:, :, None, None]
        if silu:
            v = v * torch.sigmoid(v)
        return v.to(x.dtype).contiguous(memory_format=torch.channels_last)


def subpixel_shuffle(y: torch.Tensor) -> torch.Tensor:
    """[B,4C,h+1,w+1] sub-pixel convolution output -> [B,C,2h,2w]: phase (a, b) = channels (2a+b)*C.., taken at
    offset (a, b) (the torch form of the kernels' SHUFFLE gather)."""
    b, c4, h1, w1 = y.shape
    c, h, w = c4 // 4, h1 - 1, w1 - 1
    phases = y.view(b, 2, 2, c, h1, w1)
    rows = [torch.stack([phases[:, a, bb, :, a:a + h, bb:bb + w] for bb in (0, 1)], dim=-1) for a in (0, 1)]
    out = torch.stack(rows, dim=-3)  # [B,C,h,2,w,2]
    return out.reshape(b, c, 2 * h, 2 * w)


__all__ = ["HAVE_TRITON", "KERNELS", "Stats", "TorchOps", "TritonOps", "empty_nhwc", "nhwc", "padded_nhwc",
           "stats_geometry", "subpixel_shuffle"]


def compile_for(kernel: str, args: tuple, meta: dict, arch: int = 90) -> Any:
    """Compile one launch's specialization ahead of time for an NVIDIA ``arch`` without a GPU (Triton's bundled
    ptxas): the CPU-side check that the kernels build for Hopper, and their register / spill report. ``args`` as
    TritonOps passes them (tensors give pointer types; ints divisible by 16 are specialised as the runtime does)."""
    from triton.backends.compiler import GPUTarget

    fn = KERNELS[kernel]
    names = [n for n in fn.arg_names]
    types = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64"}
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list] = {}
    launch_opts = {k: v for k, v in meta.items() if k in ("num_warps", "num_stages")}
    constexprs = {k: v for k, v in meta.items() if k not in launch_opts}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[i]
        if torch.is_tensor(value):
            signature[name] = types[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i64" if abs(int(value)) >= 2**31 else "i32"
            if int(value) % 16 == 0 and int(value) != 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=launch_opts)
