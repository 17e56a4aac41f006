"""The SD VAE (diffusers ``AutoencoderKL``) scheduled by hand for the optimised modes.

Same maths as diffusers' Encoder/Decoder (docs/method.md#image-latent, docs/method.md#decode), with the
memory-bound work moved into the passes of engine/vae_kernels.py and the convolutions left to cuDNN (channels_last,
no bias: each bias is folded into the next pass). Per ResNet block, 6 launches besides the 2-3 convolutions:

    x, stats(x) -> apply GN1+SiLU -> conv1 -> stats(conv1 + b1) -> apply GN2+SiLU (b1 folded) -> conv2
      -> out = x (or 1x1 shortcut) + conv2 + b2 (+ b_sc), with stats(out) for the next GroupNorm, in one pass

Exact rewrites (same function; only rounding differs, checked in float64 by test/test_engine_kernels.py):

- **sub-pixel upsampling**: nearest 2x upsampling then a 3x3 convolution equals, per output phase (a, b) in {0,1}^2,
  a 2x2 convolution of the low-resolution map (``subpixel_weight``); the four phases are one convolution with 4x the
  output channels and padding 1 on the low-resolution map, gathered by the next pass. 4/9 of the FLOPs, no 4x-size
  intermediate. Zero padding of the upsampled map is zero padding of the low-resolution one, so borders are exact.
- **Downsample2D's F.pad(0,1,0,1)**: the residual pass before it writes into a buffer with a zero last row/column.
- **mid-block attention**: q, k and v from one GEMM; ``attention="gemm"`` computes scores with fp32 output
  (``torch.baddbmm(out_dtype=float32)``), a softmax kernel rounding once to the model dtype, then P @ V (as flash
  kernels do: P in half precision); ``"sdpa"`` leaves it to torch's scaled_dot_product_attention (d = 512: the
  memory-efficient kernel).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from .latent import LATENT_SCALE
from .vae_kernels import Stats, nhwc

LOG = logging.getLogger(__name__)

ATTENTION_MODES = ("sdpa", "gemm")
# Taps of a 3x3 kernel row landing on the two low-resolution rows a 2x2 kernel sees, per output phase:
# phase 0 reads rows (i-1, i) with taps (0) and (1, 2); phase 1 reads rows (i, i+1) with taps (0, 1) and (2).
_PHASE_TAPS = torch.tensor([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], dtype=torch.float64)  # [phase, r, tap]


class UnsupportedVAE(ValueError):
    """The VAE has a layer this schedule does not reproduce exactly (the optimised mode keeps its compiled VAE)."""


def subpixel_weight(weight: torch.Tensor) -> torch.Tensor:
    """3x3 kernel [O,I,3,3] of a convolution after nearest 2x upsampling -> [4*O,I,2,2] kernels on the
    low-resolution map, phase (a, b) in output channels (2a+b)*O.. (sums taken in float64, rounded once)."""
    taps = _PHASE_TAPS.to(weight.device)
    w = weight.to(torch.float64)
    phases = [torch.einsum("rk,sl,oikl->oirs", taps[a], taps[b], w) for a in (0, 1) for b in (0, 1)]
    out = torch.cat(phases, dim=0).to(weight.dtype)
    if weight.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise UnsupportedVAE(f"fused VAE: {what}")


def check_supported(vae: Any) -> None:
    """Raise UnsupportedVAE unless every layer is one the hand schedule reproduces (SD / SD2 / Marigold VAEs)."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    enc, dec = vae.encoder, vae.decoder
    _check(isinstance(enc.conv_act, torch.nn.SiLU) and isinstance(dec.conv_act, torch.nn.SiLU), "activation not SiLU")
    _check(isinstance(enc.conv_norm_out, torch.nn.GroupNorm) and isinstance(dec.conv_norm_out, torch.nn.GroupNorm),
           "output norm not GroupNorm (spatial norm?)")
    resnets = [r for blk in (*enc.down_blocks, *dec.up_blocks, enc.mid_block, dec.mid_block) for r in blk.resnets]
    for r in resnets:
        _check(type(r) is ResnetBlock2D, f"{type(r).__name__} is not a ResnetBlock2D")
        _check(r.time_emb_proj is None and r.upsample is None and r.downsample is None, "resnet with temb/resample")
        _check(r.output_scale_factor == 1 and isinstance(r.nonlinearity, torch.nn.SiLU), "resnet scale/activation")
        _check(isinstance(r.norm1, torch.nn.GroupNorm) and isinstance(r.norm2, torch.nn.GroupNorm), "resnet norm")
    for blk in enc.down_blocks:
        for d in blk.downsamplers or []:
            _check(type(d) is Downsample2D and d.use_conv and d.norm is None and d.padding in (0, 1),
                   "downsampler kind")
    for blk in dec.up_blocks:
        for u in blk.upsamplers or []:
            _check(type(u) is Upsample2D and u.use_conv and not u.use_conv_transpose and u.interpolate
                   and u.norm is None and tuple(u.conv.kernel_size) == (3, 3) and tuple(u.conv.padding) == (1, 1),
                   "upsampler kind")
    for mid in (enc.mid_block, dec.mid_block):
        for attn in mid.attentions:
            if attn is None:
                continue
            _check(type(attn) is Attention and attn.group_norm is not None and attn.spatial_norm is None
                   and attn.residual_connection and attn.rescale_output_factor == 1 and attn.norm_q is None
                   and attn.norm_k is None and not attn.is_cross_attention, "attention kind")
            _check(type(attn.processor).__name__ in ("AttnProcessor2_0", "AttnProcessor"), "attention processor")


class FusedVAE:
    """encode/decode of one AutoencoderKL through ``ops`` (vae_kernels.TritonOps, or TorchOps as the reference).

    Shares the VAE's parameters (no copy) except the sub-pixel kernels and the concatenated q/k/v projections."""

    def __init__(self, vae: Any, ops: Any, *, subpixel: bool = True, attention: str = "sdpa") -> None:
        check_supported(vae)
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        self.vae = vae
        self.ops = ops
        self.subpixel = subpixel
        self.attention = attention
        self.latent_channels = vae.config.latent_channels
        self._subpixel_w: dict[int, torch.Tensor] = {}
        self._qkv: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._res_bias: dict[int, torch.Tensor | None] = {}
        self._affine: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.gemm_scores_error: str | None = None
        with torch.no_grad():
            for blk in vae.decoder.up_blocks:
                for up in blk.upsamplers or []:
                    self._subpixel_w[id(up)] = subpixel_weight(up.conv.weight)
            for mid in (vae.encoder.mid_block, vae.decoder.mid_block):
                for attn in mid.attentions:
                    if attn is not None:
                        w = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])
                        biases = [attn.to_q.bias, attn.to_k.bias, attn.to_v.bias]
                        b = torch.cat(biases) if all(x is not None for x in biases) else None
                        self._qkv[id(attn)] = (w, b)
            for blk in (*vae.encoder.down_blocks, *vae.decoder.up_blocks, vae.encoder.mid_block,
                        vae.decoder.mid_block):
                for r in blk.resnets:
                    bias = r.conv2.bias
                    if r.conv_shortcut is not None and r.conv_shortcut.bias is not None:
                        bias = r.conv_shortcut.bias if bias is None else bias + r.conv_shortcut.bias
                    self._res_bias[id(r)] = bias

    # ---------------------------------------------------------------- public (same contract as accel's stages)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [-1,1] -> posterior mean x 0.18215 [B,4,H/8,W/8], as accel._encoder_fn."""
        enc = self.vae.encoder
        h, st = self._conv_bias(nhwc(x), enc.conv_in)
        for blk in enc.down_blocks:
            downs = list(blk.downsamplers or [])
            for i, r in enumerate(blk.resnets):
                last = i == len(blk.resnets) - 1
                pad = last and bool(downs) and downs[0].padding == 0
                # before a Downsample2D with padding 0, h becomes the zero-padded buffer its F.pad would make
                h, st = self._resnet(h, st, r, pad_out=pad, stats=not (last and downs))
            for d in downs:
                h, st = self._conv_bias(h, d.conv)
        h, st = self._mid(h, st, enc.mid_block)
        h = self._gn_apply(h, st, enc.conv_norm_out, silu=True)
        moments = enc.conv_out(h)
        if self.vae.quant_conv is not None:
            moments = self.vae.quant_conv(moments)
        return moments[:, :self.latent_channels] * LATENT_SCALE

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        """[B,4,h,w] latent -> [B,3,8h,8w] decoder output, as accel._decoder_fn."""
        dec = self.vae.decoder
        z = z0 / LATENT_SCALE
        if self.vae.post_quant_conv is not None:
            z = self.vae.post_quant_conv(z)
        h, st = self._conv_bias(nhwc(z), dec.conv_in)
        h, st = self._mid(h, st, dec.mid_block)
        for blk in dec.up_blocks:
            for r in blk.resnets:
                h, st = self._resnet(h, st, r)
            for up in blk.upsamplers or []:
                h, st = self._upsample(h, up)
        h = self._gn_apply(h, st, dec.conv_norm_out, silu=True)
        return dec.conv_out(h)

    # ---------------------------------------------------------------- layers

    def _conv(self, x: torch.Tensor, conv: torch.nn.Conv2d, weight: torch.Tensor | None = None,
              padding: Any = None) -> torch.Tensor:
        """The convolution without its bias (folded into the next pass), its output channels_last (cuDNN keeps the
        input's layout; nhwc is a check then)."""
        return nhwc(F.conv2d(x, conv.weight if weight is None else weight, None, conv.stride,
                             conv.padding if padding is None else padding, conv.dilation, conv.groups))

    def _conv_bias(self, x: torch.Tensor, conv: torch.nn.Conv2d) -> tuple[torch.Tensor, Stats]:
        """Convolution, then its bias added in place in the pass that takes the next GroupNorm's statistics."""
        y = self._conv(x, conv)
        out, st = self.ops.fused_pass(y, bias=conv.bias, out=y)
        return out, st

    def _gn_apply(self, x: torch.Tensor, st: Stats | None, norm: torch.nn.GroupNorm, *, silu: bool,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        """GroupNorm (+ SiLU) of x (+ a pending per-channel ``bias``), statistics from ``st`` or a pass now."""
        if st is None:
            _, st = self.ops.fused_pass(x, write=False)
        gamma, beta = self._gamma_beta(norm, x)
        scale, shift = self.ops.group_stats(st, norm.num_groups, gamma, beta, norm.eps, bias)
        return self.ops.apply(x, scale, shift, silu)

    def _gamma_beta(self, norm: torch.nn.GroupNorm, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if norm.affine:
            return norm.weight, norm.bias
        key = id(norm)
        if key not in self._affine:
            c = norm.num_channels
            self._affine[key] = (torch.ones(c, device=like.device), torch.zeros(c, device=like.device))
        return self._affine[key]

    def _resnet(self, x: torch.Tensor, st: Stats | None, r: Any, *, pad_out: bool = False,
                stats: bool = True) -> tuple[torch.Tensor, Stats | None]:
        h = self._gn_apply(x, st, r.norm1, silu=True)
        h = self._conv(h, r.conv1)
        _, st1 = self.ops.fused_pass(h, write=False)
        h = self._gn_apply(h, st1, r.norm2, silu=True, bias=r.conv1.bias)  # dropout: identity at inference
        h = self._conv(h, r.conv2)
        res = self._conv(x, r.conv_shortcut) if r.conv_shortcut is not None else x
        return self.ops.fused_pass(h, res=res, bias=self._res_bias[id(r)], pad_out=pad_out, stats=stats)

    def _upsample(self, x: torch.Tensor, up: Any) -> tuple[torch.Tensor, Stats]:
        if self.subpixel:
            y = self._conv(x, up.conv, weight=self._subpixel_w[id(up)], padding=1)  # [B,4C,h+1,w+1]
            out, st = self.ops.fused_pass(y, bias=up.conv.bias, shuffle=True)
            return out, st
        u = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self._conv_bias(nhwc(u), up.conv)

    def _mid(self, h: torch.Tensor, st: Stats | None, mid: Any) -> tuple[torch.Tensor, Stats | None]:
        h, st = self._resnet(h, st, mid.resnets[0])
        for attn, r in zip(mid.attentions, mid.resnets[1:], strict=True):
            if attn is not None:
                h, st = self._attention(h, st, attn)
            h, st = self._resnet(h, st, r)
        return h, st

    def _attention(self, x: torch.Tensor, st: Stats | None, attn: Any) -> tuple[torch.Tensor, Stats]:
        b, c, height, width = x.shape
        tokens = height * width
        h = self._gn_apply(x, st, attn.group_norm, silu=False)
        seq = h.permute(0, 2, 3, 1).reshape(b, tokens, c)  # a view: channels_last is [B,H,W,C]
        w_qkv, b_qkv = self._qkv[id(attn)]
        qkv = F.linear(seq, w_qkv, b_qkv)  # [B,L,3*inner]
        inner = attn.to_q.out_features
        heads = attn.heads
        q, k, v = (t.view(b, tokens, heads, inner // heads).transpose(1, 2) for t in qkv.split(inner, dim=-1))
        if self.attention == "gemm":
            o = self._attention_gemm(q, k, v)
        else:
            o = F.scaled_dot_product_attention(q, k, v)
        o = o.transpose(1, 2).reshape(b, tokens, inner)
        o = F.linear(o, attn.to_out[0].weight)  # [B,L,C]; bias into the residual pass, dropout identity
        o = o.view(b, height, width, c).permute(0, 3, 1, 2)  # [B,C,H,W] channels_last view
        out, st = self.ops.fused_pass(o, res=x, bias=attn.to_out[0].bias)
        return out, st

    def _attention_gemm(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) v with fp32 scores and P rounded once to the model dtype."""
        b, heads, tokens, d = q.shape
        q2, k2, v2 = (t.reshape(b * heads, tokens, d) for t in (q, k, v))
        scores = self._scores(q2, k2)
        p = self.ops.softmax_rows(scores, d ** -0.5, v.dtype)
        return torch.bmm(p, v2).view(b, heads, tokens, d)

    def _scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if q.dtype in (torch.float16, torch.bfloat16) and self.gemm_scores_error is None:
            try:
                return torch.bmm(q, k.transpose(1, 2), out_dtype=torch.float32)
            except (RuntimeError, TypeError) as exc:  # torch without bmm(out_dtype=) for this device
                self.gemm_scores_error = f"{type(exc).__name__}: {exc}"
                LOG.warning("fp32-output bmm unavailable (%s); attention scores via an fp32 upcast",
                            self.gemm_scores_error[:200])
        if q.dtype in (torch.float16, torch.bfloat16):
            return torch.bmm(q.float(), k.float().transpose(1, 2))
        return torch.bmm(q, k.transpose(1, 2)).contiguous()
