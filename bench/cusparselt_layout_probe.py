"""Dump cuSPARSELt's compressed layout for crafted 2:4 bf16 matrices (to learn
where values and metadata go, for a fused prune+compress kernel).

What it showed (cuSPARSELt 0.8, H200): the values are the kept entries in
row-major order, then the metadata, one 4-bit code ``i0 | i1 << 2`` per group
of four. The random cases pin the code order uniquely
(bench/cusparselt_layout_decode.py): tiles of 64 rows x 8 groups in row-major
order, and inside a tile the nibble index has the bits
``r3 g2 g0 g1 r0 r1 r2 r4 r5`` (row r, group g, lowest first).
``sparse24/packing.py`` writes that layout; tests/data/cusparselt_0.8_compress.pt
keeps four of these dumps for the CPU tests.

    PYTHONPATH=src python bench/cusparselt_layout_probe.py --out $OUT/cslt_layout.pt
"""

from __future__ import annotations

import argparse
import os

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "cslt_layout.pt"))
    args = ap.parse_args()
    out = {"version": torch.backends.cusparselt.version(), "cases": {}}
    for M, K in [(64, 64), (128, 128), (64, 256)]:
        i = torch.arange(M).view(M, 1).expand(M, K)
        j = torch.arange(K).view(1, K).expand(M, K)
        keep01 = (j % 4) < 2
        cases = {
            "ids": ((i * K + j) % 251 + 1).float(),  # distinct small integers (exact in bf16), kept at 0,1
            "col": (j + 1).float() % 251,
            "row": (i + 1).float() % 251,
        }
        for name, vals in cases.items():
            dense = torch.where(keep01, vals, torch.zeros_like(vals)).to(torch.bfloat16).cuda()
            out["cases"][f"{name}_{M}x{K}_keep01"] = (dense.cpu(), torch._cslt_compress(dense).cpu())
        # metadata: the six 2-of-4 patterns, chosen by (row + group), by row bits, by group bits
        pats = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
        choosers = {"patterns": lambda r, g: (r * 7 + g) % 6,
                    "row_only": lambda r, g: r % 6,  # bits of the row
                    "group_only": lambda r, g: g % 6}
        for name, pick in choosers.items():
            mask = torch.zeros(M, K, dtype=torch.bool)
            for r in range(M):
                for g in range(K // 4):
                    a, b = pats[pick(r, g)]
                    mask[r, 4 * g + a] = mask[r, 4 * g + b] = True
            dense = torch.where(mask, ((i * K + j) % 251 + 1).float(), torch.zeros(M, K)).to(torch.bfloat16).cuda()
            out["cases"][f"{name}_{M}x{K}"] = (dense.cpu(), torch._cslt_compress(dense).cpu())
        # what the tile kernel writes for the same pruned input (torch's reverse-engineered format)
        try:
            packed, meta, packed_t, meta_t, bitmask = torch._sparse_semi_structured_tile(dense, "", False)
            out["cases"][f"patterns_{M}x{K}_tile"] = (dense.cpu(), packed.cpu())
        except Exception as e:  # noqa: BLE001
            out["tile_error"] = repr(e)
    # random 2:4 matrices of larger and non-square shapes: the checks for a decoded order
    g = torch.Generator().manual_seed(0)
    for M, K in [(256, 512), (512, 256), (128, 1024), (1024, 128), (192, 320)]:
        vals = torch.randn(M, K, generator=g)
        keep = torch.zeros(M, K // 4, 4, dtype=torch.bool)
        idx = torch.rand(M, K // 4, 4, generator=g).argsort(-1)[..., :2]
        keep.scatter_(-1, idx, True)
        dense = torch.where(keep.view(M, K), vals, torch.zeros_like(vals)).to(torch.bfloat16).cuda()
        try:
            out["cases"][f"random_{M}x{K}"] = (dense.cpu(), torch._cslt_compress(dense).cpu())
        except RuntimeError as e:
            out[f"random_{M}x{K}_error"] = repr(e)
    torch.save(out, args.out)
    for k, (d, c) in out["cases"].items():
        print(k, tuple(d.shape), "->", tuple(c.shape), c.dtype)


if __name__ == "__main__":
    main()
