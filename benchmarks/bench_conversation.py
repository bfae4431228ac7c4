"""A conversation's wait for each reply's first token, with the KV cache kept between turns and without.

    python benchmarks/bench_conversation.py                  # random weights at Qwen2.5-0.5B's shapes, bf16
    python benchmarks/bench_conversation.py --model 1.5b --turns 6

Every turn of a chat re-sends the whole conversation. Without a kept cache the prompt is prefilled
from its first token each time, so the wait for the first token grows with the conversation; with
``generation.PromptCache`` (what the chat panel keeps) a turn prefills only its new message. Turn by
turn, in one process, the same prompt both ways, alternating which goes first: a user message of
``--message`` random tokens with a chat template's few tokens around it, then a greedy reply of
``--tokens`` tokens (EOS ignored) that joins the conversation. Prints each turn's prompt length and
the time to the first token both ways.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_contention import cpu_description, generation_arguments, model_and_tokenizer  # noqa: E402


def main() -> None:
    p = generation_arguments(__doc__)
    p.set_defaults(tokens=32)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--message", type=int, default=60, help="tokens of each user message")
    args = p.parse_args()
    import torch
    from qwen_lab.generation import GenerationConfig, PromptCache, generate_stream
    model, tok = model_and_tokenizer(args)
    vocab = model.config.vocab_size
    rng = random.Random(0)
    start_turn, end_turn = [vocab - 3, vocab - 4], [vocab - 5]  # stand-ins for <|im_start|>user\n ... <|im_end|>
    config = GenerationConfig(max_new_tokens=args.tokens, do_sample=False, eos_token_id=[])
    cache, conversation = PromptCache(), []
    name = args.model if args.model == "tiny-chat" else f"random weights at Qwen2.5-{args.model.upper()}'s shapes"
    print(f"{cpu_description()}; torch {torch.__version__}; {name}, {args.dtype}; "
          f"{args.message}-token messages, {args.tokens}-token replies")
    print(f"{'turn':>4} {'prompt':>7} {'kept':>6} {'first token, kept cache':>24} {'from scratch':>13}")
    generate_stream(model, tok, [rng.randrange(vocab - 10) for _ in range(args.message)], config).result  # warm-up
    totals = [0.0, 0.0]
    for turn in range(args.turns):
        conversation += start_turn + [rng.randrange(vocab - 10) for _ in range(args.message)] + end_turn
        times, results = {}, {}
        for way in (["kept", "scratch"] if turn % 2 else ["scratch", "kept"]):
            result = generate_stream(model, tok, conversation, config, cache=cache if way == "kept" else None).result
            times[way], results[way] = result.ttft_s, result
        kept = results["kept"]
        print(f"{turn + 1:>4} {kept.prompt_tokens:>7} {kept.cached_tokens:>6} {times['kept']:>22.2f} s "
              f"{times['scratch']:>11.2f} s", flush=True)
        totals[0] += times["kept"]
        totals[1] += times["scratch"]
        conversation += kept.token_ids
    print(f"{'all':>4} {'':>7} {'':>6} {totals[0]:>22.2f} s {totals[1]:>11.2f} s")


if __name__ == "__main__":
    main()
