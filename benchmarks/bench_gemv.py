"""One-row matrix products: torch's F.linear against qwen_lab's C kernel, side by side in one process.

    python benchmarks/bench_gemv.py

For each weight shape of a Qwen2.5-0.5B decode step, in float32 and bfloat16, prints the GB/s of
weight bytes each streams (median of 30 calls, cycling through copies so the matrix is never in
the cache), then the read bandwidth of summing a 1 GiB tensor next to the kernel on a 1 GiB matrix:
the kernel's ceiling on this machine.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from qwen_lab import kernels

SHAPES = [(896, 896, "q/o_proj"), (128, 896, "k/v_proj"), (4864, 896, "gate/up_proj"), (896, 4864, "down_proj"),
          (151936, 896, "lm_head")]


def gbps(fn, nbytes: int, reps: int = 30) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times) / 1e9


def main() -> None:
    if not kernels.available():
        sys.exit(f"the C kernel is not available: {kernels.status()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(f"{'shape (out x in)':>18} {'':12} {'dtype':9} {'F.linear':>9} {'gemv':>7}  GB/s")
    for out_features, in_features, name in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            w = torch.randn(out_features, in_features).to(dtype)
            x = torch.randn(1, in_features).to(dtype)
            nbytes = w.numel() * w.element_size()
            copies = [w] + [w.clone() for _ in range(max(0, int(256e6 // nbytes) - 1))]  # > any cache
            i = iter(range(10**9))
            torch_speed = gbps(lambda: F.linear(x, copies[next(i) % len(copies)]), nbytes)
            kernel_speed = gbps(lambda: kernels.gemv(x, copies[next(i) % len(copies)]), nbytes)
            print(f"{out_features:>8} x {in_features:<7} {name:12} {str(dtype)[6:]:9} {torch_speed:9.1f} "
                  f"{kernel_speed:7.1f}")
            del copies
    big = torch.ones(2**28)  # 1 GiB
    rows = 2**28 // 896
    matrix, x = big[:rows * 896].view(rows, 896), torch.ones(896)
    print(f"\n1 GiB: sum {gbps(big.sum, 2**30, 5):.1f} GB/s, gemv {gbps(lambda: kernels.gemv(x, matrix), rows * 896 * 4, 5):.1f} GB/s")


if __name__ == "__main__":
    main()
