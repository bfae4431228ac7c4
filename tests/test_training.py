"""The tiny-chat pipeline still runs end to end (2 steps instead of 1,800) and writes a loadable repo."""
import json

from qwen_lab.generation import ChatModel
from training import corpus
from training.evaluate import write_model_card
from training.train import main as train


def test_held_out_phrasings_never_appear_in_training():
    train_questions = {m["content"] for conv in corpus.conversations(seed=0, n=3000) for m in conv
                       if m["role"] == "user"}
    for _, question, _ in corpus.evaluation_questions():
        assert question not in train_questions


def test_pipeline_writes_a_hub_layout_with_a_model_card(tmp_path):
    out = tmp_path / "tiny"
    train(["--out", str(out), "--steps", "2", "--batch", "2"])
    assert {p.name for p in out.iterdir()} >= {"config.json", "generation_config.json", "tokenizer.json",
                                                "tokenizer_config.json", "model.safetensors", "README.md",
                                                "training.json"}
    card = (out / "README.md").read_text()
    assert "2 steps of AdamW" in card and "<!-- evaluation -->" in card
    write_model_card({"held_out_questions": 1, "held_out_accuracy": 0.5, "ends_with_im_end_within_64": 1.0,
                      "eos_pitfall_prompts": 1, "runs_past_im_end_with_endoftext_only": 1.0,
                      "goes_wrong_without_add_generation_prompt": 0.0}, out)
    assert "| 50.0% | ≥ 90% |" in (out / "README.md").read_text()
    chat = ChatModel.load(str(out), dtype="float32", device="cpu")
    assert chat.generate([{"role": "user", "content": "Hi"}], max_new_tokens=3).generated_tokens <= 3
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 2
