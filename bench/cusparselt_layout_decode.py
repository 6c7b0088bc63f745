"""Decode the metadata order of cuSPARSELt packings from bench/cusparselt_layout_probe.py's
dump (CPU only): for every case whose per-group codes are known, find every
bit permutation p -> (row bits, group bits) of the nibble index that explains
all nibbles.

    python bench/cusparselt_layout_decode.py cslt_layout.pt

A packed bf16 2:4 [M, K] matrix is M*K/2 kept values (row-major) followed by
one 4-bit code ``i0 | i1 << 2`` per group of four. Torch's tile kernel and
cuSPARSELt 0.8's own compression order those codes differently; a fused
prune+compress kernel needs the latter.
"""

from __future__ import annotations

import itertools
import sys

import numpy as np
import torch

sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", "src"))
from sparsetrain.sparse24.sparsify import transposable_24  # noqa: E402


def group_codes(mask: np.ndarray) -> list[list[set[int]]]:
    """Codes each group may carry (a group with fewer than two kept values may pad either index)."""
    M, G, _ = mask.shape
    out = []
    for r in range(M):
        row = []
        for g in range(G):
            kept = {i for i in range(4) if mask[r, g, i]}
            row.append({a | (b << 2) for a, b in itertools.combinations(range(4), 2) if kept <= {a, b}})
        out.append(row)
    return out


def nibbles(packed: torch.Tensor, M: int, K: int) -> np.ndarray:
    meta = packed.flatten()[M * K // 2:].view(torch.int16).numpy().astype(np.uint16)
    return np.stack([(meta >> (4 * k)) & 0xF for k in range(4)], axis=1).flatten()


def solve(nib: np.ndarray, codes, M: int, G: int, limit: int = 50) -> list[list[tuple[str, int]]]:
    bits = int(np.log2(nib.size))
    targets = [("r", j) for j in range(int(np.log2(M)))] + [("g", j) for j in range(int(np.log2(G)))]

    def at(t):
        return (1 << t[1], 0) if t[0] == "r" else (0, 1 << t[1])

    cand = [[t for t in targets if nib[1 << i] in codes[at(t)[0]][at(t)[1]]] for i in range(bits)]
    order = sorted(range(bits), key=lambda i: len(cand[i]))
    sols: list = []

    def ok(assign: dict) -> bool:
        idx = list(assign)
        m = sum(1 << i for i in idx)
        sub = m
        while True:
            r = g = 0
            for i in idx:
                if (sub >> i) & 1:
                    kind, j = assign[i]
                    r, g = (r | 1 << j, g) if kind == "r" else (r, g | 1 << j)
            if nib[sub] not in codes[r][g]:
                return False
            if sub == 0:
                return True
            sub = (sub - 1) & m

    def bt(k: int, assign: dict, used: frozenset) -> None:
        if len(sols) >= limit:
            return
        if k == bits:
            sols.append([assign[i] for i in range(bits)])
            return
        i = order[k]
        for t in cand[i]:
            if t not in used:
                assign[i] = t
                if ok(assign):
                    bt(k + 1, assign, used | {t})
                del assign[i]

    bt(0, {}, frozenset())
    return sols


def main() -> None:
    d = torch.load(sys.argv[1] if len(sys.argv) > 1 else "cslt_layout.pt")
    print("cuSPARSELt", d["version"])
    for name, (dense, packed) in d["cases"].items():
        if not any(name.startswith(p) for p in ("patterns", "row_only", "group_only", "random")):
            continue
        M, K = dense.shape
        if name.endswith("_tile"):  # torch's tile kernel prunes to its transposable pattern first
            _, m = transposable_24(dense.float())
        else:
            m = dense != 0
        sols = solve(nibbles(packed, M, K), group_codes(m.view(M, K // 4, 4).numpy()), M, K // 4)
        many = " or more (the codes do not pin it; use the row_only / group_only cases)" if len(sols) >= 50 else ""
        print(f"{name}: {len(sols)}{many} bit permutation(s)")
        for s in sols[:3]:
            print("   ", " ".join(f"{k}{j}" for k, j in s))


if __name__ == "__main__":
    main()
