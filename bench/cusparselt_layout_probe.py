"""Dump cuSPARSELt's compressed layout for crafted 2:4 bf16 matrices (to learn
where values and metadata go, for a fused prune+compress kernel).

What the first run (cuSPARSELt 0.8, H200) showed: the values are the kept
entries in row-major order, then the metadata, one 4-bit code
``i0 | i1 << 2`` per group of four (the kept indices). The nibble order is a
bit permutation of (row, group): with codes that depend on ``(row + group) mod 6``,
the code at nibble p is exactly linear in p's bits mod 6 (all positions, three
shapes), with steps per bit of p, lowest first,
``[2, 4, 1, 2, 1, 2, 4, 4, 2, 2, ...]``. So the two bits with step 1 are
row bit 0 and group bit 0, the others are row/group bits with 2^j = 2 or 4 mod 6.
The ``row_only`` and ``group_only`` pattern cases below tell rows from groups.

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
    torch.save(out, args.out)
    for k, (d, c) in out["cases"].items():
        print(k, tuple(d.shape), "->", tuple(c.shape), c.dtype)


if __name__ == "__main__":
    main()
