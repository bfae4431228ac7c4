"""What "Show inside" costs: decoding with and without the top-5 alternatives of every token.

    python benchmarks/bench_inside.py            # random weights at Qwen2.5-0.5B's shapes, bf16
    python benchmarks/bench_inside.py --model tiny-chat

Alternates the two settings in one process, several rounds, greedy, EOS ignored, and prints the
median milliseconds per token of each and the difference (one softmax and one top-k over the
vocabulary per token).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_contention import cpu_description, model_dir  # noqa: E402
from bench_decode import _word_tokenizer, weights_only  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="0.5b", help="tiny-chat, 0.5b or 1.5b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    from qwen_lab.generation import GenerationConfig, generate_stream
    from qwen_lab.load import load_model
    model = load_model(weights_only(model_dir(args.model)), args.dtype, "cpu")
    tok = _word_tokenizer(model.config.vocab_size)
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
