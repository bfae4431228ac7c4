"""Notebook 03's forward pass by hand, against transformers, on tiny random checkpoints it writes.

The notebook's code cells tagged ``forward-pass-definitions`` are run here as they stand
(``rms_norm``, ``project_qkv``, ``rope_cos_sin``, ``rotate``, ``attend``, ``attention``, ``mlp``,
``decoder_layer``, ``forward``), then fed *transformers'* weights (its ``state_dict`` uses the
same names as the checkpoint) for Qwen2 (q/k/v biases), Llama (no biases, Llama 3's rotary
scaling, a head_dim of its own) and Qwen3 (q/k norms, attention wider than the hidden size),
tied and untied. Compared: the logits, every layer's output, the attention weights the
notebook draws, and the rotary tables. Without transformers those comparisons skip; the checks
that need only torch still run. The notebook itself checks the same functions against qwen_lab's
own model when nbval runs it.
"""
import ast
import json
from pathlib import Path

import pytest
import torch

from qwen_lab.load import build_model, read_config

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "03_forward_pass.ipynb"
TAG = "forward-pass-definitions"
FUNCTIONS = {"rms_norm", "linear", "project_qkv", "rope_cos_sin", "rotate", "attend", "attention", "mlp",
             "decoder_layer", "forward"}
#: the architectures of test_model.ARCHITECTURES (which needs transformers to import)
CASES = [(arch, tie) for arch in ("Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM") for tie in (True, False)]


def definition_cells() -> list[str]:
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    return ["".join(c["source"]) for c in cells
            if c["cell_type"] == "code" and TAG in c.get("metadata", {}).get("tags", [])]


@pytest.fixture(scope="module")
def nb():
    """The notebook's definitions, executed in a fresh namespace (nothing else of the notebook runs)."""
    namespace: dict = {}
    exec(compile("\n\n".join(definition_cells()), str(NOTEBOOK), "exec"), namespace)
    return namespace


def test_definition_cells_define_the_pass_and_nothing_else():
    """Only imports and functions: a definition that read the notebook's variables (W, cfg, model...)
    would work in the notebook and break here, or silently use the wrong model."""
    sources = definition_cells()
    assert sources, f"no code cell of {NOTEBOOK.name} is tagged {TAG!r}"
    defined = set()
    for source in sources:
        for node in ast.parse(source).body:
            assert isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef)), \
                f"a {TAG} cell runs code at top level (line {node.lineno}): {ast.unparse(node)[:60]}"
            if isinstance(node, ast.FunctionDef):
                defined.add(node.name)
    assert defined == FUNCTIONS


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{'tied' if t else 'untied'}" for a, t in CASES])
def case(request, tmp_path_factory, tokenizer):
    """(transformers model, its weights by name, qwen_lab's reading of its config.json)."""
    transformers = pytest.importorskip("transformers")
    from test_model import write_checkpoint  # transformers builds the model and writes the files
    architecture, tie = request.param
    directory = write_checkpoint(tmp_path_factory.mktemp(architecture), architecture, tie, tokenizer, seed=4)
    # eager attention: the only implementation that returns the attention weights
    reference = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                                  attn_implementation="eager").eval()
    assert type(reference).__name__ == architecture
    cfg = build_model(read_config(directory / "config.json")).config
    return reference, reference.state_dict(), cfg


def prompt(vocab: int, n: int = 21) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(7))


def test_the_weights_carry_what_each_architecture_needs(case):
    """The notebook finds its switches in the weights: biases for Qwen2 only, q/k norms for Qwen3 only."""
    reference, W, _ = case
    name = type(reference).__name__
    assert ("model.layers.0.self_attn.q_proj.bias" in W) == (name == "Qwen2ForCausalLM")
    assert ("model.layers.0.self_attn.q_norm.weight" in W) == (name == "Qwen3ForCausalLM")
    assert "lm_head.weight" in W  # tied or not, the name is there


def test_logits_equal_transformers(nb, case):
    reference, W, cfg = case
    ids = prompt(cfg.vocab_size)
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
        got = nb["forward"](ids, W, cfg)
    assert got.shape == (len(ids), cfg.vocab_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_each_layer_and_its_attention_weights_equal_transformers(nb, case):
    """Layer by layer from transformers' own inputs, so a mistake is caught where it is made."""
    reference, W, cfg = case
    ids = prompt(cfg.vocab_size, n=13)
    with torch.no_grad():
        out = reference(ids[None], output_hidden_states=True, output_attentions=True)
        hidden = [h[0] for h in out.hidden_states]  # the embedding, each layer's input..., the final norm
        inv_freq = nb["rope_frequencies"](cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        cos, sin = nb["rope_cos_sin"](torch.arange(len(ids)), inv_freq, torch.float32)
        torch.testing.assert_close(hidden[0], W["model.embed_tokens.weight"][ids])
        for i in range(cfg.num_hidden_layers):
            x, weights = nb["decoder_layer"](hidden[i], W, i, cfg, cos, sin)
            if i + 1 < cfg.num_hidden_layers:
                torch.testing.assert_close(x, hidden[i + 1], rtol=1e-5, atol=1e-5)
            else:  # transformers' last hidden state is after the final norm
                torch.testing.assert_close(nb["rms_norm"](x, W["model.norm.weight"], cfg.rms_norm_eps), hidden[-1],
                                           rtol=1e-5, atol=1e-5)
            assert weights.shape == (cfg.num_attention_heads, len(ids), len(ids))
            torch.testing.assert_close(weights, out.attentions[i][0], rtol=1e-5, atol=1e-6)
            assert torch.all(weights.triu(1) == 0)  # the causal mask: nothing from later tokens


def test_rotary_tables_and_norm_equal_transformers(nb, case):
    """cos and sin (Llama 3's scaled frequencies included), and RMSNorm against transformers' module."""
    reference, W, cfg = case
    positions = torch.arange(40)
    x = torch.randn(1, 40, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cos_ref, sin_ref = reference.model.rotary_emb(x, positions[None])
        inv_freq = nb["rope_frequencies"](cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        cos, sin = nb["rope_cos_sin"](positions, inv_freq, torch.float32)
        torch.testing.assert_close((cos, sin), (cos_ref[0], sin_ref[0]))
        norm = reference.model.layers[1].post_attention_layernorm
        torch.testing.assert_close(nb["rms_norm"](x[0], norm.weight, cfg.rms_norm_eps), norm(x)[0])


def test_rotation_keeps_lengths_and_depends_on_distance_only(nb):
    """What the notebook's plot shows, as a check: q·k after the turn is a function of m − n."""
    inv_freq = nb["rope_frequencies"](32, 10000.0)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(32, generator=g, dtype=torch.float64), torch.randn(32, generator=g, dtype=torch.float64)

    def turned(vector, position):
        cos, sin = nb["rope_cos_sin"](torch.tensor([position]), inv_freq.double(), torch.float64)
        return nb["rotate"](vector, cos[0], sin[0])

    torch.testing.assert_close(turned(a, 1234).norm(), a.norm())
    scores = [float(turned(a, start + 5) @ turned(b, start)) for start in (0, 17, 900)]
    assert scores[0] == pytest.approx(scores[1], rel=1e-6) and scores[0] == pytest.approx(scores[2], rel=1e-5)
    assert float(turned(a, 6) @ turned(b, 0)) != pytest.approx(scores[0], rel=1e-3)  # a different distance


def test_attend_groups_query_heads_on_their_key_value_head(nb):
    """4 query heads on 2 KV heads: heads 0 and 1 read KV head 0, heads 2 and 3 read KV head 1."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(n, 6, 8, generator=g) for n in (4, 2, 2))
    y, weights = nb["attend"](q, k, v)
    for head in range(4):
        kv = head // 2
        expected = torch.nn.functional.scaled_dot_product_attention(q[head:head + 1], k[kv:kv + 1], v[kv:kv + 1],
                                                                    is_causal=True)
        torch.testing.assert_close(y[head], expected[0])
    torch.testing.assert_close(weights.sum(-1), torch.ones(4, 6))
