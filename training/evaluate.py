"""Grade the embedded tiny-chat model (greedy decoding) and write the figures into its model card.

    python -m training.evaluate            # prints the figures, updates models/tiny-chat/README.md

Four measurements, the acceptance criteria of the model:

* accuracy on held-out phrasings of the fact and arithmetic questions;
* the share of replies that end with ``<|im_end|>`` within 64 new tokens;
* the EOS pitfall: with the EOS list cut to ``<|endoftext|>`` alone, the share
  of replies that run past ``<|im_end|>`` into a made-up next turn;
* the ``add_generation_prompt`` pitfall: without it, the share of replies that
  go visibly wrong (the model writes a role header or another turn).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from qwen_lab.generation import ChatModel
from qwen_lab.hub import EMBEDDED_MODEL_DIR, EMBEDDED_MODEL_ID

from .corpus import QWEN_SYSTEM, evaluation_questions

MAX_NEW = 64
PITFALL_PROMPTS = 40  # questions used for each pitfall measurement
ROLES = ("assistant", "user", "system")


def conversation(question: str) -> list[dict]:
    return [{"role": "system", "content": QWEN_SYSTEM}, {"role": "user", "content": question}]


def evaluate(chat: ChatModel, limit: int | None = None) -> dict:
    questions = evaluation_questions()[:limit]
    im_end, im_start = chat.tokenizer.token_to_id("<|im_end|>"), chat.tokenizer.token_to_id("<|im_start|>")
    endoftext = chat.tokenizer.token_to_id("<|endoftext|>")
    greedy = dict(do_sample=False, repetition_penalty=1.0, max_new_tokens=MAX_NEW)

    correct, ended, failures = 0, 0, []
    for _, question, answer in questions:
        result = chat.generate(conversation(question), **greedy)
        ok = result.text.strip() == answer
        correct += ok
        ended += result.finish_reason == "eos" and result.token_ids[-1] == im_end
        if not ok:
            failures.append({"question": question, "expected": answer, "got": result.text})

    pitfall_questions = [q for _, q, _ in questions[:PITFALL_PROMPTS]]
    ran_past = 0
    for question in pitfall_questions:
        ids = chat.generate(conversation(question), **greedy, eos_token_id=[endoftext]).token_ids
        # past <|im_end|> and into another turn: an <|im_start|> follows the first <|im_end|>
        ran_past += im_end in ids and im_start in ids[ids.index(im_end) + 1:]

    wrong_without_prompt = 0
    for question in pitfall_questions:
        result = chat.generate(conversation(question), add_generation_prompt=False, skip_special_tokens=False,
                               **greedy)
        text = result.text.lstrip()
        wrong_without_prompt += text.startswith("<|im_start|>") or text.startswith(ROLES)

    n, p = len(questions), len(pitfall_questions)
    return {
        "held_out_questions": n,
        "held_out_accuracy": round(correct / n, 4),
        "ends_with_im_end_within_64": round(ended / n, 4),
        "eos_pitfall_prompts": p,
        "runs_past_im_end_with_endoftext_only": round(ran_past / p, 4),
        "goes_wrong_without_add_generation_prompt": round(wrong_without_prompt / p, 4),
        "failures": failures[:20],
    }


def transformers_agreement(model_dir: Path, prompts: list[str], max_new_tokens: int = 32) -> float:
    """Share of prompts where transformers' greedy output equals qwen_lab's, token for token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    chat = ChatModel.load(str(model_dir), dtype="float32", device="cpu")
    same = 0
    for prompt in prompts:
        messages = conversation(prompt)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.0,
                             pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        ours = chat.generate(messages, do_sample=False, repetition_penalty=1.0, max_new_tokens=max_new_tokens)
        same += out == ours.token_ids
    return same / len(prompts)


def write_model_card(figures: dict, directory: Path) -> None:
    card = directory / "README.md"
    text = card.read_text(encoding="utf-8")
    start, end = "<!-- evaluation -->", "<!-- /evaluation -->"
    table = "\n".join([
        start,
        "| measurement (greedy decoding) | result | target |",
        "|---|---|---|",
        f"| correct answers, {figures['held_out_questions']} held-out phrasings of fact and arithmetic questions "
        f"| {figures['held_out_accuracy']:.1%} | ≥ 90% |",
        f"| replies ending with `<\\|im_end\\|>` within {MAX_NEW} new tokens | "
        f"{figures['ends_with_im_end_within_64']:.1%} | ≥ 95% |",
        f"| EOS list cut to `<\\|endoftext\\|>` alone: replies that run past `<\\|im_end\\|>` into a made-up turn "
        f"({figures['eos_pitfall_prompts']} prompts) | {figures['runs_past_im_end_with_endoftext_only']:.1%} | ≥ 80% |",
        f"| without `add_generation_prompt`: replies that start with a role header or another turn "
        f"({figures['eos_pitfall_prompts']} prompts) | {figures['goes_wrong_without_add_generation_prompt']:.1%} "
        f"| ≥ 80% |",
        *([f"| transformers' greedy output equal to qwen_lab's (token ids, {figures['parity_prompts']} prompts) | "
           f"{figures['transformers_agreement']:.1%} | 100% |"] if "transformers_agreement" in figures else []),
        end,
    ])
    if start in text:
        text = text[:text.index(start)] + table + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + table + "\n"
    card.write_text(text, encoding="utf-8")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=EMBEDDED_MODEL_ID)
    p.add_argument("--no-card", action="store_true", help="print only; do not update the model card")
    args = p.parse_args(argv)
    chat = ChatModel.load(args.model, dtype="float32", device="cpu")
    figures = evaluate(chat)
    prompts = [q for _, q, _ in evaluation_questions()[:20]]
    try:
        figures["transformers_agreement"] = transformers_agreement(chat.files.root, prompts)
        figures["parity_prompts"] = len(prompts)
    except ImportError:
        print("transformers is not installed: parity not measured")
    print(json.dumps({k: v for k, v in figures.items() if k != "failures"}, indent=2))
    for f in figures["failures"][:10]:
        print("  miss:", json.dumps(f, ensure_ascii=False))
    if not args.no_card and args.model == EMBEDDED_MODEL_ID:
        write_model_card(figures, EMBEDDED_MODEL_DIR)
        (EMBEDDED_MODEL_DIR / "evaluation.json").write_text(
            json.dumps({k: v for k, v in figures.items() if k != "failures"}, indent=2) + "\n")


if __name__ == "__main__":
    main()
