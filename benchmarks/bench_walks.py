"""Why a float32 product with a long x streams slower: x pushed out of the L1 cache by the weights.

    python benchmarks/bench_walks.py                     # 896 x 4864: Qwen2.5-0.5B's down projection
    python benchmarks/bench_walks.py --shapes 4864x896,1536x8960

The one-row walk of ``csrc/gemv.c`` reads all of x once per row. When x and a row of weights no
longer fit the L1 cache together (float32 x over ~4,000 values; bf16 x, read as bf16 by the
``avx512bf16`` variant, over ~8,000), the weights streaming through L1 evict x, and every row reads
it again from L2. ``benchmarks/walks.c`` times, alternating in one process over matrices in 2 MiB
pages (as ``load`` keeps converted weights), with a ``torch.sum`` read probe before each round:

- ``plan``: the production kernel (``kernels.gemv``) with the plan ``tuning`` chose for the shape
  on this machine (read from its cache, or measured now);
- ``row``: the production one-row walk, here with OpenMP threads;
- ``xwindow``: the same weight stream against a 4 KB window of x (wrong sums: the ceiling if x
  stayed in L1);
- ``colblock``: the weights stored in blocks of columns, each block contiguous, so a block of x
  stays in L1 while its block streams (a layout the model's weights do not have: torch's products
  and a learner's ``weight`` expect rows);
- ``kblock``: the row-major weights walked a block of columns at a time (x in L1, but the stream
  jumps at each row).

Needs a C compiler with OpenMP (``cc -fopenmp``). Figures: GB/s of weight bytes, median of the rounds.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

WALKS = {"row": 0, "xwindow": 1, "colblock": 2, "kblock": 3}


def build(directory: str) -> ctypes.CDLL:
    lib = os.path.join(directory, "walks.so")
    subprocess.run([os.environ.get("CC", "cc"), "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared",
                    str(HERE / "walks.c"), "-o", lib], check=True)
    walks = ctypes.CDLL(lib)
    V, I, L = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    walks.walk.argtypes = [V, I, V, V, L, L, I, I, L, I]
    walks.walk.restype = ctypes.c_double
    return walks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="896x4864", help="N x K of the weights, comma-separated")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's and walks.c's OpenMP threads must not spin

    import torch
    from bench_contention import cpu_description
    from bench_decode import probe_memory, read_bandwidth
    from qwen_lab import kernels, pages, tuning

    torch.set_num_threads(args.threads)
    print(f"{cpu_description()}; {args.threads} threads; torch {torch.__version__}")
    memory = probe_memory(1.0)  # 1 GiB in 2 MiB pages

    def probe() -> float:
        return read_bandwidth(reps=3, memory=memory) / 1e9

    with tempfile.TemporaryDirectory() as work:
        walks = build(work)
        if not kernels.available():
            sys.exit(f"the C kernels are not available: {kernels.status()}")
        for shape in args.shapes.split(","):
            N, K = (int(v) for v in shape.split("x"))
            blocks = -(-K * 4 // 12288)  # x's block and a row's under 24 KB together: room left in a 32 KB L1
            B = -(-K // blocks)
            copies = max(2, (256 * 2**20) // (N * K * 4))  # 256 MB of them: 8x the L3 of the CPUs seen (at 2x, some hit)
            Ws = [pages.huge_copy(torch.randn(N, K), torch.float32) for _ in range(copies)]
            blocked = [pages.huge_copy(torch.cat([b.contiguous().reshape(-1) for b in w.split(B, dim=1)]),
                                       torch.float32) for w in Ws]
            x, y = torch.randn(K), torch.empty(N)
            rows = (ctypes.c_void_p * copies)(*[w.data_ptr() for w in Ws])
            cols = (ctypes.c_void_p * copies)(*[w.data_ptr() for w in blocked])
            reps = max(copies, int(2e9 // (N * K * 4)))  # about 2 GB read per measurement
            plan = tuning.plan_for(N, K, torch.float32)
            speeds: dict[str, list[float]] = {name: [] for name in ("plan", *WALKS)}
            probes = []
            for _ in range(args.rounds):
                probes.append(probe())
                t = time.perf_counter()
                for i in range(reps):
                    kernels.gemv(x, Ws[i % copies], plan=plan)
                speeds["plan"].append(N * K * 4 * reps / (time.perf_counter() - t) / 1e9)
                for name, code in WALKS.items():
                    seconds = walks.walk(cols if name == "colblock" else rows, copies, x.data_ptr(), y.data_ptr(),
                                         N, K, reps, code, B, args.threads)
                    if name != "xwindow":  # the others compute the product: check it
                        want = Ws[(reps - 1) % copies] @ x
                        if not torch.allclose(y, want, rtol=1e-3, atol=1e-3 * float(want.abs().max())):
                            raise SystemExit(f"walk {name} computed a wrong product for {shape}")
                    speeds[name].append(N * K * 4 * reps / seconds / 1e9)
            print(f"\nfloat32 {N} x {K} (x {K * 4 / 1024:.1f} KB; column blocks of {B}; plan: {plan}); read probe median "
                  f"{statistics.median(probes):.1f} GB/s (range {min(probes):.1f}-{max(probes):.1f})")
            for name, values in speeds.items():
                m = statistics.median(values)
                print(f"  {name:9s} {m:5.1f} GB/s  ({m / statistics.median(probes):4.0%} of the probe; "
                      f"range {min(values):.1f}-{max(values):.1f})")


if __name__ == "__main__":
    main()
