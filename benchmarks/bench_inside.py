"""What "Show inside" costs: decoding with and without the top-5 alternatives of every token.

    python benchmarks/bench_inside.py            # random weights at Qwen2.5-0.5B's shapes, bf16
    python benchmarks/bench_inside.py --model tiny-chat

Alternates the two settings in one process, several rounds, greedy, EOS ignored, and prints the
median milliseconds per token of each and the difference (one softmax and one top-k over the
vocabulary per token).
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_contention import cpu_description, generation_arguments, model_and_tokenizer  # noqa: E402


def main() -> None:
    args = generation_arguments(__doc__).parse_args()
    from qwen_lab.generation import GenerationConfig, generate_stream
    model, tok = model_and_tokenizer(args)
    prompt = list(range(100, 132))
    times: dict[int, list[float]] = {0: [], 5: []}
    for _ in range(args.rounds):
        for k in times:
            config = GenerationConfig(max_new_tokens=args.tokens, do_sample=False, eos_token_id=[], top_logprobs=k)
            r = generate_stream(model, tok, prompt, config).result
            times[k].append(1000 / r.decode_tokens_per_s)
    plain, inside = statistics.median(times[0]), statistics.median(times[5])
    print(f"{cpu_description()}; {args.model} {args.dtype}, vocabulary {model.config.vocab_size:,}, "
          f"{args.tokens} tokens, medians of {args.rounds} alternating rounds")
    print(f"  without alternatives: {plain:.2f} ms/token  [{min(times[0]):.2f}-{max(times[0]):.2f}]")
    print(f"  with the top 5:       {inside:.2f} ms/token  [{min(times[5]):.2f}-{max(times[5]):.2f}]")
    print(f"  cost: {inside - plain:+.2f} ms/token ({(inside - plain) / plain:+.1%})")


if __name__ == "__main__":
    main()
