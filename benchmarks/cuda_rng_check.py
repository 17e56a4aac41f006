"""CUDA noise of the legacy multi-step path: does ``seed=s`` draw what the official pipeline draws on a GPU?

The official pipeline starts iterating a DataLoader (one int64 draw from the global CPU generator: the loader's base
seed) before its first ``torch.randn`` on the device. On CUDA that draw must not move the CUDA generator, so after
``torch.manual_seed(s)`` the official noise equals a fresh CUDA generator seeded with ``s``, which is what
``core._official_noise_generator`` gives for ``seed=s`` (engine/core.py). Checked here on the card, with the real
DataLoader too; writes JSON.

    python benchmarks/cuda_rng_check.py --out /tmp/rng.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def check(seed: int, shape: tuple[int, ...], device: torch.device) -> dict:
    from geodiff_ros.engine.core import _official_noise_generator

    torch.manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_()  # the DataLoader's base seed, drawn from the global CPU generator
    official = torch.randn(shape, device=device, dtype=torch.float16)
    fresh = torch.randn(shape, generator=torch.Generator(device=device).manual_seed(seed), device=device,
                        dtype=torch.float16)
    engine = torch.randn(shape, generator=_official_noise_generator(device, seed), device=device, dtype=torch.float16)
    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(1, 3)), batch_size=1)
    next(iter(loader))  # the official pipeline's loop start, for real
    with_loader = torch.randn(shape, device=device, dtype=torch.float16)
    return {
        "seed": seed, "shape": list(shape),
        "official_equals_fresh_generator": bool(torch.equal(official, fresh)),
        "official_equals_engine_seed_s": bool(torch.equal(official, engine)),
        "dataloader_equals_engine_seed_s": bool(torch.equal(with_loader, engine)),
        "max_abs_diff": float((official.float() - fresh.float()).abs().max()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = [check(seed, (3, 4, 72, 96), device) for seed in (0, 1, 1234)]
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "checks": rows,
              "all_equal": all(r["official_equals_fresh_generator"] and r["official_equals_engine_seed_s"]
                               and r["dataloader_equals_engine_seed_s"] for r in rows)}
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0 if result["all_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
