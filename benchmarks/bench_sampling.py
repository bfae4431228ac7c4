"""The choice of one token from Qwen2.5's 151,936 logits: the whole-vocabulary way against top-k's candidates.

    python benchmarks/bench_sampling.py [--rounds 7] [--calls 100]

With Qwen2.5-Instruct's own settings (``generation_config.json``: temperature 0.7, top-k 20,
top-p 0.8, repetition penalty 1.05), one torch thread as in a decode step, 700 tokens of history.
Alternates, in one process, ``_draw(_process_checked(...))`` (mask the vocabulary, find the
survivors, twice) and ``_draw_top_k`` (work on the 20 candidates; the same token from the same
generator, tests/test_generation.py) with its top-k by torch's operations or by ``kernels.top_k``'s
one C pass, and greedy's choice, with the penalty and without, by torch's operations or by one C
pass (``kernels.top_k``'s best, ``kernels.argmax``); prints the median milliseconds per choice. On a
GPU the logits come to the CPU for this choice, every token.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_contention import cpu_description  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=100)
    args = p.parse_args()
    import torch
    from qwen_lab import kernels, sampling
    from qwen_lab.generation import GenerationConfig
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(151936, generator=g) * 3).to(torch.bfloat16)
    history = torch.randint(0, 151936, (700,), generator=g)
    qwen = GenerationConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05)
    greedy = GenerationConfig(do_sample=False, repetition_penalty=1.05)
    plain = GenerationConfig(do_sample=False)
    c_top_k = kernels.top_k

    def by_torch(way):  # the way with kernels.top_k and kernels.argmax taken away
        def run(gen):
            kernels.top_k, kernels.argmax = (lambda *a: None), (lambda *a: None)
            try:
                return way(gen)
            finally:
                kernels.top_k, kernels.argmax = c_top_k, c_argmax
        return run

    c_argmax = kernels.argmax
    top_k = lambda gen: sampling._draw_top_k(logits, history, qwen, gen)  # noqa: E731
    ways = {
        "sampling, whole vocabulary": lambda gen: sampling._draw(sampling._process_checked(logits, history, qwen),
                                                                 qwen, gen),
        "sampling, top-k by torch": by_torch(top_k),
        "sampling, top-k in C": top_k,
        "greedy, penalty (torch)": by_torch(lambda gen: sampling.next_token(logits, history, greedy, gen)),
        "greedy, penalty (C)": lambda gen: sampling.next_token(logits, history, greedy, gen),
        "greedy, no penalty (torch)": by_torch(lambda gen: sampling.next_token(logits, history, plain, gen)),
        "greedy, no penalty (C)": lambda gen: sampling.next_token(logits, history, plain, gen),
    }
    if not kernels.available():
        raise SystemExit(f"the C kernels do not run here ({kernels.status()}): only torch's ways would be measured")
    times: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(args.rounds):
        for name, way in ways.items():
            gen = torch.Generator().manual_seed(r)
            for _ in range(5):
                way(gen)
            start = time.perf_counter()
            for _ in range(args.calls):
                way(gen)
            times[name].append((time.perf_counter() - start) / args.calls * 1e3)
    print(f"{cpu_description()}; torch {torch.__version__}, 1 thread; {args.rounds} rounds of {args.calls} choices")
    for name, t in times.items():
        print(f"  {name:28} {statistics.median(t):6.3f} ms per token  ({min(t):.3f}-{max(t):.3f})")


if __name__ == "__main__":
    main()
