"""Does torch.compile pay for decoding here? Compile time, then eager against compiled, in one process.

    python benchmarks/bench_compile.py [float32|bfloat16]

Uses the random Qwen2.5-0.5B-shaped checkpoint of bench_decode.py (made on first use) with the C
kernels off (``matvec="torch"``): their ctypes calls would split torch.compile's graphs. Prints the
time of the first compiled call (the compilation) and decode steps of both, alternating.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import HERE, make_checkpoint, weights_only  # noqa: E402

from qwen_lab.load import load_model  # noqa: E402


def main() -> None:
    dtype = sys.argv[1] if len(sys.argv) > 1 else "float32"
    model = load_model(weights_only(make_checkpoint(HERE / "configs" / "qwen2.5-0.5b.json")), dtype, "cpu",
                       matvec="torch")
    compiled = torch.compile(model, dynamic=True)
    prompt = 64
    caches = model.new_caches(1, prompt + 200)
    position = prompt

    def steps(m, n: int) -> float:
        nonlocal position
        t = time.perf_counter()
        for _ in range(n):
            m(torch.tensor([[5]]), caches, position, last_only=True)
            position += 1
        return (time.perf_counter() - t) / n * 1e3

    with torch.inference_mode():
        model(torch.randint(0, 1000, (1, prompt)), caches, 0, last_only=True)
        t = time.perf_counter()
        steps(compiled, 1)
        print(f"{dtype}: first compiled call (compiling) {time.perf_counter() - t:.1f} s")
        steps(compiled, 1)
        for _ in range(3):
            print(f"{dtype}: decode step eager {steps(model, 10):.1f} ms, compiled {steps(compiled, 10):.1f} ms")


if __name__ == "__main__":
    main()
