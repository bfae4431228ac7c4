"""What a generated token spends outside the C calls: Python, the token's choice, the loop.

    python benchmarks/bench_overhead.py            # random weights at Qwen2.5-0.5B's shapes, bf16
    python benchmarks/bench_overhead.py --model 1.5b --dtype float32

A decode step on a CPU is the time its weights take to stream from memory; everything between two
steps' C calls (``qwen_stack_step`` and, on the forward's way, the head's product) is time in which
the memory streams nothing. This script generates greedily (EOS ignored) and times every one of
those C calls from Python; per token, the rest of the token's time is "outside". Three ways,
alternating in one process, several rounds:

- ``generate``: what ``generate_stream`` does: ``kernels.TokenStep`` (one C call a token, checked
  once per generation) and the greedy choice by ``kernels.argmax``;
- ``token step, torch's choice``: the same step, the choice by torch's operations (as before
  ``kernels.argmax``);
- ``forward, torch's choice``: the model's forward for every token (``kernels.DecoderModel``: the
  checks, the embedding, the rotary angles, the final norm and the head as modules) and torch's
  choice (as before ``kernels.TokenStep``).

Medians over the tokens of each round, then over the rounds.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_contention import cpu_description, generation_arguments, model_and_tokenizer  # noqa: E402


def main() -> None:
    p = generation_arguments(__doc__)
    p.add_argument("--prompt-tokens", type=int, default=256)
    args = p.parse_args()
    from qwen_lab import kernels, sampling
    from qwen_lab.generation import GenerationConfig, generate_stream
    model, tok = model_and_tokenizer(args)
    if not kernels.in_use(model):
        raise SystemExit(f"the C kernels do not run here ({kernels.status()}): nothing to measure")
    lib = kernels._library()
    calls: list[tuple[float, float, bool]] = []  # (start, end, a stack call?) of every timed C call

    def timed(fn, stack: bool):
        def call(*a):
            start = time.perf_counter()
            done = fn(*a)
            calls.append((start, time.perf_counter(), stack))
            return done
        return call

    lib.qwen_stack_step = timed(lib.qwen_stack_step, True)
    for key, fn in list(lib.gemv.items()):  # the head's product, on the forward's way
        lib.gemv[key] = timed(fn, False)
    token_step, greedy = vars(kernels.TokenStep)["for_model"], sampling._greedy  # the classmethod itself
    ways = {"generate": (token_step, greedy),
            "token step, torch's choice": (token_step, lambda *a: None),
            "forward, torch's choice": (classmethod(lambda cls, *a: None), lambda *a: None)}
    prompt = list(range(100, 100 + args.prompt_tokens))
    config = GenerationConfig(max_new_tokens=args.tokens, do_sample=False, eos_token_id=[])
    generate_stream(model, tok, prompt[:16], config.replace(max_new_tokens=4)).result  # warm-up
    outside: dict[str, list[float]] = {name: [] for name in ways}
    per_token: dict[str, list[float]] = {name: [] for name in ways}
    tokens = None
    try:
        for _ in range(args.rounds):
            for name, (step, choose) in ways.items():
                kernels.TokenStep.for_model, sampling._greedy = step, choose
                calls.clear()
                result = generate_stream(model, tok, prompt, config).result
                assert tokens is None or result.token_ids == tokens, "the ways chose different tokens"
                tokens = result.token_ids
                starts = [i for i, c in enumerate(calls) if c[2]]  # one stack call per generated token
                gaps = [(calls[b][0] - calls[a][0]) - sum(end - start for start, end, _ in calls[a:b])
                        for a, b in zip(starts, starts[1:])]
                outside[name].append(statistics.median(gaps))
                per_token[name].append(1 / result.decode_tokens_per_s)
    finally:
        kernels.TokenStep.for_model, sampling._greedy = token_step, greedy
    print(cpu_description())
    print(f"model: {args.model}, {args.dtype}; {args.prompt_tokens}-token prompt, {args.tokens} new tokens, "
          f"{args.rounds} rounds alternating; the same tokens every way")
    print(f"  {'way':<28} {'outside the C calls':>20} {'token':>9} {'share':>6}   (medians; outside's range)")
    for name in ways:
        out, whole = statistics.median(outside[name]), statistics.median(per_token[name])
        print(f"  {name:<28} {out * 1e3:17.2f} ms {whole * 1e3:6.1f} ms {out / whole:6.1%}   "
              f"({min(outside[name]) * 1e3:.2f}-{max(outside[name]) * 1e3:.2f} ms)")


if __name__ == "__main__":
    main()
