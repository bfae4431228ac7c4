"""The one-token attention step alone (``csrc/kernels.c``: ``qwen_attend_one_*``), at long contexts.

    python benchmarks/bench_attention.py                                 # Qwen2.5-0.5B's heads, bf16
    python benchmarks/bench_attention.py --config benchmarks/configs/qwen2.5-1.5b.json --contexts 4096

A decode step's attention reads the KV cache of every layer: at a few hundred positions it is a few
percent of the step, at thousands it is a large share, and it is arithmetic more than memory (the
cache of one KV head serves a group of query heads). This times one layer's call, the cache filled
with random keys and values, for each context length and thread count (median of ``--rounds``
calls after warm-up), and prints microseconds per layer and per head and position.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=HERE / "configs" / "qwen2.5-0.5b.json")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--contexts", default="512,2048,8192")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()

    import torch
    from bench_decode import machine
    from qwen_lab import kernels

    config = json.loads(args.config.read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    d = config.get("head_dim") or config["hidden_size"] // heads
    dtype = getattr(torch, args.dtype)
    # torch on one thread, as generation decodes: after a parallel torch operation (the random caches below)
    # its OpenMP workers spin for milliseconds on the other cores, and a short context's 35 calls (~1 ms)
    # timed on 2 threads then ran beside them, as slow as on 1 (a tie at 256 and 640 positions)
    torch.set_num_threads(1)
    lib = kernels._library()
    fn = lib.qwen_attend_one_bf16 if dtype == torch.bfloat16 else lib.qwen_attend_one_f32
    print(machine())
    print(f"attention of {args.config.stem}: {heads} query heads, {kv_heads} KV heads, head_dim {d}, {args.dtype}")
    g = torch.Generator().manual_seed(0)
    for context in (int(c) for c in args.contexts.split(",")):
        kc = torch.randn(kv_heads, context + 1, d, generator=g).to(dtype)
        vc = torch.randn(kv_heads, context + 1, d, generator=g).to(dtype)
        q, k, v = (torch.randn(n * d, generator=g).to(dtype) for n in (heads, kv_heads, kv_heads))
        cos, sin = torch.ones(d, dtype=dtype), torch.zeros(d, dtype=dtype)
        y = torch.empty(heads * d, dtype=dtype)
        for threads in (int(t) for t in args.threads.split(",")):
            def call():
                failed = fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(), None, None,
                            0.0, kc.data_ptr(), vc.data_ptr(), y.data_ptr(), heads, kv_heads, d, context,
                            context + 1, threads)
                assert failed == 0, failed
            for _ in range(5):
                call()
            times = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            t = statistics.median(times)
            print(f"  {context:6d} positions, {threads} thread{'s' if threads > 1 else ' '}: {t * 1e6:8.0f} us per layer, "
                  f"{t * 1e9 / (heads * (context + 1)):5.2f} ns per head and position")


if __name__ == "__main__":
    main()
