"""One-row matrix products: torch's F.linear against every way of the C kernel, side by side in one process.

    python benchmarks/bench_gemv.py [--config benchmarks/configs/qwen2.5-1.5b.json] [--dtypes bfloat16]

For each weight shape of a decode step (Qwen2.5-0.5B by default), in float32 and bfloat16, prints
the GB/s of weight bytes that F.linear and each plan of the C kernel stream (``qwen_lab.tuning``:
gemv variant x rows side by side x prefetch; best of several rounds, cycling through copies so
the matrix is never in the cache), and the plan ``tuning`` picks; then the read bandwidth of
summing a 1 GiB tensor next to the chosen kernel on a 1 GiB matrix: the kernel's ceiling here.

    python benchmarks/bench_gemv.py --pages [--rounds 2]

instead ranks the plans of each shape twice, alternating: on matrices in 4 KiB pages (as tuning
measured before ``tuning.METHOD`` 3, and as it does with ``QWEN_LAB_HUGE_PAGES=0``) and in 2 MiB
pages (as the model's weights are where ``pages.huge_pages()``), and says how fast the plan chosen
on small pages streams on large ones.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_contention import cpu_description  # noqa: E402

from qwen_lab import kernels, pages, threads, tuning  # noqa: E402


def shapes(config_path: Path) -> list[tuple[int, int, str]]:
    c = json.loads(config_path.read_text())
    h, kv = c["hidden_size"], c["num_key_value_heads"] * c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])
    q = c["num_attention_heads"] * c.get("head_dim", h // c["num_attention_heads"])
    return [(q, h, "q_proj"), (kv, h, "k/v_proj"), (h, q, "o_proj"), (c["intermediate_size"], h, "gate/up_proj"),
            (h, c["intermediate_size"], "down_proj"), (c["vocab_size"], h, "lm_head")]


def tuned_shapes(args):
    """(dtype, out_features, in_features, name) of every shape of ``args.config`` that tuning measures."""
    for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
        for out_features, in_features, name in shapes(args.config):
            if out_features * in_features * torch.empty((), dtype=dtype).element_size() >= tuning.TUNE_MIN_BYTES:
                yield dtype, out_features, in_features, name


def best_seconds(fn, reps: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        threads.wait_until_quiet()  # torch's OpenMP workers spin a while after its sum: not on our time
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=HERE / "configs" / "qwen2.5-0.5b.json")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--pages", action="store_true", help="rank the plans on 4 KiB and on 2 MiB pages, alternating")
    p.add_argument("--rounds", type=int, default=2, help="with --pages: measurements of each kind per shape")
    args = p.parse_args()
    if not kernels.available():
        sys.exit(f"the C kernels are not available: {kernels.status()}")
    if args.pages:
        return rank_on_pages(args)
    print(f"{cpu_description()}; torch {torch.__version__}; {kernels.num_threads()} threads; "
          f"shapes of {args.config.stem}\n")
    for dtype, out_features, in_features, name in tuned_shapes(args):
        chosen, speeds = tuning.measure(out_features, in_features, dtype)
        alone = {plan.removesuffix(f" {tuning.ALONE}"): v for plan, v in speeds.items()
                 if plan.endswith(f" {tuning.ALONE}")}
        ranked = sorted(((plan, v) for plan, v in speeds.items() if not plan.endswith(f" {tuning.ALONE}")),
                        key=lambda kv: -kv[1])
        torch_speed = speeds.get("torch", 0.0)
        print(f"{str(dtype)[6:]:9} {out_features:>7} x {in_features:<6} {name:13} F.linear {torch_speed / 1e9:5.1f} "
              f"GB/s | chosen: {chosen} {speeds[str(chosen)] / 1e9:5.1f} GB/s | "
              + "  ".join(f"{plan}: {v / 1e9:.1f}" for plan, v in [kv for kv in ranked if kv[0] != str(chosen)][:3])
              + (" | near ties, on one thread: " + "  ".join(f"{plan}: {v / 1e9:.1f}" for plan, v in
                                                           sorted(alone.items(), key=lambda kv: -kv[1]))
                 if alone else ""))
    big = pages.huge_empty((2**28,), torch.float32).fill_(1.0)  # 1 GiB, in 2 MiB pages as the weights are
    rows = 2**28 // 896
    matrix, x = big[:rows * 896].view(rows, 896), torch.ones(896)
    plan = tuning.measure(rows, 896, torch.float32, [kernels.Plan(v) for v in kernels.variants()])[0]
    read = 2**30 / best_seconds(big.sum, 5)
    kernel = rows * 896 * 4 / best_seconds(lambda: kernels.gemv(x, matrix, plan=plan), 5)
    print(f"\n1 GiB: sum {read / 1e9:.1f} GB/s, gemv ({plan}) {kernel / 1e9:.1f} GB/s ({kernel / read:.0%} of sum)")


def rank_on_pages(args) -> None:
    if not pages.huge_pages():
        sys.exit(f"2 MiB pages are not asked for here: {pages.huge_pages_and_why()[1]}")
    print(f"{cpu_description()}; torch {torch.__version__}; {kernels.num_threads()} threads; shapes of "
          f"{args.config.stem}; each shape's plans ranked {args.rounds} times on each kind of page, alternating\n")
    for dtype, out_features, in_features, name in tuned_shapes(args):
        for _ in range(args.rounds):
            ranked = {}
            for kind, off in (("4 KiB", "0"), ("2 MiB", None)):
                if off is None:
                    os.environ.pop("QWEN_LAB_HUGE_PAGES", None)
                else:
                    os.environ["QWEN_LAB_HUGE_PAGES"] = off
                ranked[kind] = tuning.measure(out_features, in_features, dtype)
            os.environ.pop("QWEN_LAB_HUGE_PAGES", None)
            (small, _), (large, speeds) = ranked["4 KiB"], ranked["2 MiB"]
            print(f"{str(dtype)[6:]:9} {out_features:>7} x {in_features:<6} {name:13} chosen on 4 KiB pages: "
                  f"{str(small):22} on 2 MiB: {str(large):22} | on 2 MiB pages these stream "
                  f"{speeds[str(small)] / 1e9:5.1f} and {speeds[str(large)] / 1e9:5.1f} GB/s")


if __name__ == "__main__":
    main()
