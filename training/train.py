"""Train the embedded tiny-chat model from nothing, on CPU, reproducibly.

    python -m training.train            # about 25 minutes on 2 cores
    python -m training.evaluate         # the acceptance figures, written into the model card

Steps: synthetic conversations (training/corpus.py) -> rendered with the real
Qwen2.5 chat template -> a byte-level BPE tokenizer trained on them -> a small
Qwen2ForCausalLM (qwen_lab's own model code) trained with AdamW -> written in
the Hub layout to qwen_lab/models/tiny-chat/.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qwen_lab.chat_template import ChatTemplate
from qwen_lab.hub import EMBEDDED_MODEL_DIR
from qwen_lab.tiny import SPECIAL_TOKENS, build_random, save_checkpoint, tiny_config, train_tokenizer

from .corpus import conversations

HERE = Path(__file__).parent
TEMPLATE = (HERE / "qwen2.5_chat_template.jinja").read_text(encoding="utf-8")

# The model: grouped-query attention (4 query heads share 2 kv heads), tied embeddings, like Qwen2.5-0.5B in miniature.
SIZES = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0, max_window_layers=4)
VOCAB_SIZE = 2048
BLOCK = 128


def render_corpus(seed: int) -> list[str]:
    template = ChatTemplate(TEMPLATE)
    rng = random.Random(seed + 1)
    texts = []
    for messages in conversations(seed):
        text = template.render(messages)
        if rng.random() < 0.1:  # some documents end with <|endoftext|>, as in pre-training data
            text += "<|endoftext|>"
        texts.append(text)
    return texts


def token_stream(texts: list[str], tokenizer) -> torch.Tensor:
    ids = []
    for batch in range(0, len(texts), 1000):
        for enc in tokenizer.encode_batch(texts[batch:batch + 1000], add_special_tokens=False):
            ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


def write_card(out: Path, meta: dict, config: dict) -> None:
    """The model card, from training/MODEL_CARD.md; evaluate.py fills in its evaluation table."""
    seen = meta["steps"] * meta["batch"] * meta["block"]
    card = (HERE / "MODEL_CARD.md").read_text(encoding="utf-8").format(
        **meta, **config, parameters_m=meta["parameters"] / 1e6, train_minutes=meta["train_seconds"] / 60,
        tokens_seen=seen, passes=seen / meta["corpus_tokens"])
    (out / "README.md").write_text(card, encoding="utf-8")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=EMBEDDED_MODEL_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    t0 = time.time()
    texts = render_corpus(args.seed)
    plain = [t.replace("<|im_start|>", "").replace("<|im_end|>", "").replace("<|endoftext|>", "") for t in texts]
    tokenizer = train_tokenizer(plain, VOCAB_SIZE)
    data = token_stream(texts, tokenizer)
    print(f"corpus: {len(texts)} conversations, {len(data):,} tokens, vocab {tokenizer.get_vocab_size()}, "
          f"{time.time() - t0:.1f}s", flush=True)

    config = tiny_config(tokenizer.get_vocab_size(), tie=True, **SIZES)
    model = build_random(config, seed=args.seed, std=0.02)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    warmup = 100
    model.train()
    t0 = time.time()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(data) - BLOCK - 1, (args.batch,), generator=gen)
        batch = torch.stack([data[s:s + BLOCK + 1] for s in starts])
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr:.2e}  {time.time() - t0:.0f}s", flush=True)

    model.eval()
    save_checkpoint(model, args.out, tokenizer=tokenizer, chat_template=TEMPLATE)
    meta = {"parameters": n_params, "steps": args.steps, "batch": args.batch, "block": BLOCK, "lr": args.lr,
            "seed": args.seed, "conversations": len(texts), "corpus_tokens": len(data),
            "train_seconds": round(time.time() - t0), "final_loss": round(loss.item(), 4),
            "special_tokens": SPECIAL_TOKENS}
    (args.out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    write_card(args.out, meta, config)
    print(f"saved to {args.out}", flush=True)


if __name__ == "__main__":
    main()
