"""A short prompt's time to first token: torch's matrix products against the kernels' few-rows walk.

    python benchmarks/bench_prompt.py                               # 0.5B shapes, bf16, 2 to 16 tokens
    python benchmarks/bench_prompt.py --dtype float32 --lengths 2 4 8
    python benchmarks/bench_prompt.py --cached 1500 --lengths 8 16  # after a conversation's 1,500 positions

A chat's turn prefills only its new tokens when the KV cache kept the conversation (``PromptCache``), so
a short message is a prompt of a few tokens. For each length, in rounds, two ways alternate in this one
process, on random weights at Qwen2.5's shapes:

- ``torch``: every product of several rows by torch (``kernels.configure(few_rows=1)``, as before the walk);
- ``walk``: the products by the kernels' few-rows walk, each weight read once for all the prompt's tokens
  (``few_rows=kernels.FEW_MAX``: every length here, past the ``FEW_ROWS`` that ``Linear`` gives it by
  default), torch's operations between them on one thread up to ``generation.SHORT_PROMPT_POSITIONS``.

With ``--cached N`` each way first fills a ``PromptCache`` with N positions (not timed), then times the
prompt that follows them; past ``generation.SHORT_PROMPT_POSITIONS`` in all, generation gives both ways torch's
products (the line says so), as it decided from this script's figures. Before each round a ``torch.sum`` over a float32 tensor of the weights' bytes
gives the memory's read speed at that moment (it moves on a shared host). Medians over the rounds.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from bench_contention import cpu_description, generation_arguments, model_and_tokenizer  # noqa: E402
from bench_decode import sum_speed  # noqa: E402


def main() -> None:
    p = generation_arguments(__doc__)
    p.add_argument("--lengths", type=int, nargs="+", default=[2, 4, 8, 12, 16])
    p.add_argument("--cached", type=int, default=0, help="positions a PromptCache holds before the prompt")
    args = p.parse_args()
    import torch
    from qwen_lab import kernels, pages
    from qwen_lab.generation import SHORT_PROMPT_POSITIONS, GenerationConfig, PromptCache, generate_stream
    if not kernels.available():
        raise SystemExit(f"the C kernels do not run here ({kernels.status()}): nothing to measure")
    if not all(2 <= n <= kernels.FEW_MAX for n in args.lengths):
        raise SystemExit(f"--lengths: each between 2 and {kernels.FEW_MAX} (the walk's most rows)")
    model, tok = model_and_tokenizer(args)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    probe = pages.huge_empty((weight_bytes // 4,), torch.float32).fill_(1.0)
    config = GenerationConfig(max_new_tokens=1, do_sample=False, eos_token_id=[])
    prefix = [100 + (7 * i) % 5000 for i in range(args.cached)]
    ways = {"torch": 1, "walk": kernels.FEW_MAX}

    def first_token(few_rows: int, prompt: list[int]) -> tuple[float, int]:
        kernels.configure(few_rows=few_rows)
        cache = None
        if prefix:
            cache = PromptCache()
            generate_stream(model, tok, prefix, config, cache=cache).result
        r = generate_stream(model, tok, prefix + prompt, config, cache=cache).result
        assert r.cached_tokens == len(prefix), r.cached_tokens
        return r.ttft_s, r.prefill_threads

    print(cpu_description())
    print(f"model: {args.model}, {args.dtype}; {args.cached} positions cached before the prompt; "
          f"{args.rounds} rounds alternating; probe: torch.sum over {weight_bytes / 2**20:.0f} MiB")
    print(f"  {'tokens':>6} {'torch':>10} {'walk':>10} {'speed-up':>9}   probe GB/s (range)   prompt threads")
    try:
        first_token(ways["walk"], list(range(300, 304)))  # warm-up: plans measured, kernels built
        for n in args.lengths:
            prompt = list(range(300, 300 + n))
            times: dict[str, list[float]] = {name: [] for name in ways}
            probes, threads = [], {}
            for _ in range(args.rounds):
                probes.append(sum_speed(probe) / 1e9)
                for name, few_rows in ways.items():
                    seconds, threads[name] = first_token(few_rows, prompt)
                    times[name].append(seconds)
            a, b = statistics.median(times["torch"]), statistics.median(times["walk"])
            print(f"  {n:6d} {a * 1e3:7.1f} ms {b * 1e3:7.1f} ms {a / b:8.2f}x   {statistics.median(probes):5.1f} "
                  f"({min(probes):.1f}-{max(probes):.1f})        {threads['torch']} / {threads['walk']}"
                  + ("   (both torch's: past SHORT_PROMPT_POSITIONS)" if args.cached + n > SHORT_PROMPT_POSITIONS else ""),
                  flush=True)
    finally:
        kernels.configure()


if __name__ == "__main__":
    main()
