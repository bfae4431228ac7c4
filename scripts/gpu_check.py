"""Every check that needs a GPU, in one command (``make gpu-check``), sized to fit a few minutes.

    python scripts/gpu_check.py [--out DIR] [--quick]

1. the device: name, compute capability, the dtype ``auto`` picks there (bf16 from 8.0 up,
   float16 below), torch and CUDA versions;
2. the device-agnostic tests on CUDA (``tests/test_static_decode.py``, ``tests/test_gpu.py``:
   greedy tokens of the CUDA-graph path equal the eager path's, float32 and float16 (the dtype
   ``auto`` picks on a GPU without bf16, Colab's T4); the panel, its Stop, and the
   CLI decode through the graph; notebooks' code patterns);
3. the benchmark of issue 15: random weights at Qwen2.5-1.5B's shapes, bf16, a 512-token
   prompt and 256 new tokens, greedy: qwen_lab (CUDA graph), qwen_lab eager, and
   transformers' eager ``generate``, side by side in this one process, with the share of the
   GPU's memory bandwidth (measured here by a device-to-device copy) that each reaches; and the
   captured step replayed back to back, without the Python loop around it (the GPU's own rate);
4. (not with ``--quick``) the CPU kernels on this machine's processor (``tests/test_kernels.py`` and
   ``tests/test_tuning.py``, 2 threads): GPU machines' server CPUs often have the AVX-512 /
   AVX512-BF16 that CI's lacks;
5. (not with ``--quick``) the notebooks (English edition) executed on CUDA, nbval in lax mode
   (outputs may differ in the last digits from the CPU-made ones, errors may not); skipped, and
   said so, where nbval is not installed; then the same notebooks on a model loaded in bfloat16 and
   in float16, as a real model's learner runs them there (``tests/test_notebooks_in_low_precision.py``:
   an A100's or H100's bf16, a T4's float16; about 1.5 minutes);
6. (with ``--cpu-bench``, about 5 more minutes) the CPU's decode benchmarks on 2 of its cores, as on
   the 2-core machine class (GPU machines' server CPUs are the other CPU family the kernels must
   serve): ``bench_step.py`` (a generation's token step and the whole-stack call against a read probe,
   and the whole-stack call without the 8-row walks where tuning chose them, 0.5B shapes, both dtypes)
   ``bench_overhead.py`` (time outside the C calls per token) and ``bench_prompt.py`` (a short prompt's
   first token, torch's products against the kernels' few-rows walk, whose rules were chosen on AMD Zen 4).

Results are printed and, with ``--out``, written to ``DIR/gpu_check.json`` and ``.md`` after
every step, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def device_report() -> dict:
    import torch
    from qwen_lab.load import choose_dtype
    if not torch.cuda.is_available():  # one line, before anything is written
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        sys.exit(f"gpu_check: error: no CUDA GPU is visible to torch {torch.__version__} ({build}): run `make "
                 f"gpu-check` on a machine with an NVIDIA GPU, in a .venv made with a CUDA build of torch "
                 f"(on Linux, PyPI's torch==2.13.0)")
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    return {"gpu": props.name, "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
            "memory_gib": round(props.total_memory / 2**30, 1), "auto_dtype": str(choose_dtype("auto", device)),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}


def run_step(name: str, argv: list[str], timeout: int, **env: str) -> dict:
    # qwen_lab importable from this checkout, installed or not (a notebook's kernel starts in notebooks/)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    start = time.monotonic()
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, QWEN_LAB_MODEL="qwen-lab/tiny-chat", HF_HUB_OFFLINE="1",
                                       PYTHONPATH=path, **env))
        ok, output = done.returncode == 0, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        ok, output = False, f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout} s"
    print(f"[{'ok' if ok else 'FAILED'}] {name} ({time.monotonic() - start:.0f} s)\n{output[-3000:] if not ok else ''}",
          flush=True)
    step = {"name": name, "ok": ok, "seconds": round(time.monotonic() - start, 1), "tail": output[-1500:]}
    if not ok:  # the whole of it: the first failure's cause is rarely in the tail
        step["output"] = output[:300_000]
    return step


def copy_bandwidth(gib: float = 2.0) -> float:
    """Bytes per second a device-to-device copy moves (read + write counted), best of 5."""
    import torch
    a = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * a.numel() / best


def agreeing(a: list[int], b: list[int]) -> int:
    """How many tokens two generations share before they first differ."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def greedy(decoder, ids: list[int], n: int) -> list[int]:
    """``n`` greedy tokens from a ``StaticDecoder``: the argmax of each step, nothing else."""
    logits, out = decoder.prefill(ids), []
    for pos in range(len(ids), len(ids) + n):
        out.append(int(logits.argmax()))
        logits = decoder.step(out[-1], pos)
    return out


def benchmark(prompt_tokens: int, new_tokens: int, config_name: str) -> dict:
    import torch
    from bench_decode import _word_tokenizer, make_checkpoint, weights_only
    from qwen_lab.generation import GenerationConfig, generate_stream
    from qwen_lab.load import load_model
    from transformers import AutoModelForCausalLM

    directory = make_checkpoint(ROOT / "benchmarks" / "configs" / f"{config_name}.json")
    prompt = torch.randint(0, 151936, (1, prompt_tokens), generator=torch.Generator().manual_seed(1))
    results = {}
    model = load_model(weights_only(directory), "bfloat16", "cuda")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tok = _word_tokenizer(model.config.vocab_size)
    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=[])
    token_lists = {}
    for label, static in (("qwen_lab cuda-graph", True), ("qwen_lab eager", False)):
        # warm-up at the same length: the graph of this length's bucket is captured here, not in the timed run
        generate_stream(model, tok, prompt[0].tolist(), GenerationConfig(max_new_tokens=8), static=static).result
        r = generate_stream(model, tok, prompt[0].tolist(), gen, static=static).result
        torch.cuda.synchronize()
        results[label] = {"decode_tokens_per_s": r.decode_tokens_per_s, "prefill_tokens_per_s": r.prefill_tokens_per_s,
                          "path": r.decode_path}
        token_lists[label] = r.token_ids
    from qwen_lab.static_decode import StaticDecoder, decoder_for
    static_check = {}
    decoder = decoder_for(model, prompt_tokens + new_tokens)
    if decoder.graph is not None:  # the step alone: what the generation loop's Python costs on top
        decoder.graph.replay()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(200):
            decoder.graph.replay()
        torch.cuda.synchronize()
        results["qwen_lab graph replay only"] = {"decode_tokens_per_s": 200 / (time.perf_counter() - start),
                                                 "prefill_tokens_per_s": float("nan"), "path": "replay x200"}
        start = time.perf_counter()  # what a first reply in a new length bucket pays once
        fresh = StaticDecoder(model, decoder.max_len)
        torch.cuda.synchronize()
        static_check["capture_s"] = round(time.perf_counter() - start, 3)
        del fresh
        # Capture itself changes nothing: the first step's logits equal the same step run uncaptured, bit for
        # bit. Over many greedy tokens of random bf16 weights (near-tied logits) the uncaptured step run twice
        # can part from itself on CUDA, so that run-to-run agreement is printed beside the graph's, as its floor.
        uncaptured = StaticDecoder(model, decoder.max_len, graph=False)
        ids = prompt[0].tolist()
        token = int(decoder.prefill(ids).argmax())
        uncaptured.prefill(ids)
        graph_logits = decoder.step(token, len(ids)).float().clone()
        plain_logits = uncaptured.step(token, len(ids)).float()
        static_check["first_step_max_difference"] = (graph_logits - plain_logits).abs().max().item()
        graph_tokens = greedy(decoder, ids, new_tokens)
        plain_tokens, plain_again = greedy(uncaptured, ids, new_tokens), greedy(uncaptured, ids, new_tokens)
        static_check["tokens_agreeing"] = {"graph vs uncaptured": agreeing(graph_tokens, plain_tokens),
                                           "uncaptured vs itself": agreeing(plain_tokens, plain_again)}
        del uncaptured
    del model, decoder
    torch.cuda.empty_cache()
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).cuda().eval()
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, temperature=None, top_p=None, top_k=None)
    ref.generate(prompt[:, :32].cuda(), max_new_tokens=8, **kwargs)
    torch.cuda.synchronize()
    start = time.perf_counter()
    ref.generate(prompt.cuda(), max_new_tokens=1, min_new_tokens=1, **kwargs)
    torch.cuda.synchronize()
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    ref.generate(prompt.cuda(), max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    results["transformers eager"] = {"decode_tokens_per_s": (new_tokens - 1) / (total - prefill),
                                     "prefill_tokens_per_s": prompt_tokens / prefill, "path": "eager generate"}
    bandwidth = copy_bandwidth()
    for r in results.values():
        r["bandwidth_share"] = weight_bytes * r["decode_tokens_per_s"] / bandwidth
    graph, eager = token_lists["qwen_lab cuda-graph"], token_lists["qwen_lab eager"]
    return {"config": config_name, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "weight_gib": round(weight_bytes / 2**30, 2), "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
            "results": results, "graph_equals_eager": graph == eager,
            "tokens_agreeing_with_eager": agreeing(graph, eager),
            **static_check,
            "speedup_vs_transformers": results["qwen_lab cuda-graph"]["decode_tokens_per_s"]
            / results["transformers eager"]["decode_tokens_per_s"]}


def summary(report: dict) -> str:
    d = report["device"]
    lines = [f"GPU check on {d['gpu']} (compute capability {d['capability']}, torch {d['torch']}, CUDA {d['cuda']}); "
             f"auto dtype: {d['auto_dtype']}; CPU: {d['cpu']}", ""]
    lines += [f"- {s['name']}: {'ok' if s['ok'] else 'skipped' if s['ok'] is None else 'FAILED'}"
              for s in report["steps"]]
    for s in report["steps"]:
        if s.get("figures"):
            lines += ["", f"{s['name']}:", "```", s["figures"].strip(), "```"]
    b = report.get("benchmark")
    if b and "error" in b:
        lines += ["", f"benchmark FAILED: {b['error']}"]
    elif b:
        lines += ["", f"Random weights at {b['config']} shapes, bf16 ({b['weight_gib']} GiB), prompt "
                  f"{b['prompt_tokens']}, {b['new_tokens']} new tokens, greedy; device-to-device copy "
                  f"{b['copy_bandwidth_gb_s']} GB/s", "",
                  "| implementation | path | prefill tok/s | decode tok/s | bandwidth used |", "|---|---|---|---|---|"]
        for name, r in b["results"].items():
            lines.append(f"| {name} | {r['path']} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | "
                         f"{r['bandwidth_share']:.0%} |")
        lines += ["", f"CUDA graph vs transformers: {b['speedup_vs_transformers']:.2f}x; greedy tokens of the graph "
                  f"equal the eager path's: {b['graph_equals_eager']} (the first {b['tokens_agreeing_with_eager']} "
                  f"agree)", f"First step, graph vs the same step uncaptured: largest logit "
                  f"difference {b.get('first_step_max_difference')}; greedy tokens agreeing of {b['new_tokens']}: "
                  f"{b.get('tokens_agreeing')}; capturing a new bucket's graph took {b.get('capture_s')} s"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="write gpu_check.json and gpu_check.md here (after every step)")
    p.add_argument("--quick", action="store_true", help="tests and benchmark only: no CPU kernels, no notebooks")
    p.add_argument("--cpu-bench", action="store_true", help="also the CPU's decode benchmarks, on 2 of its cores")
    args = p.parse_args()
    from bench_contention import cpu_description
    report = {"device": {**device_report(), "cpu": cpu_description()}, "steps": []}
    print(json.dumps(report["device"]), flush=True)

    def save() -> None:  # after every step, so a run cut short still leaves what it measured
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
            (args.out / "gpu_check.md").write_text(summary(report) + "\n")

    py = sys.executable
    report["steps"].append(run_step("device-agnostic tests on CUDA",
                                    [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_static_decode.py",
                                     "tests/test_gpu.py"], 300))
    save()
    try:
        report["benchmark"] = benchmark(512, 256, "qwen2.5-1.5b")
    except Exception as e:  # recorded; the other steps still run
        report["benchmark"] = {"error": f"{type(e).__name__}: {e}"}
    print("\n" + summary(report) + "\n", flush=True)
    save()
    if not args.quick:
        from qwen_lab import kernels
        report["steps"].append(run_step(f"CPU kernels on {report['device']['cpu']} (2 threads)",
                                        [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py",
                                         "tests/test_tuning.py"],
                                        240, QWEN_LAB_THREADS="2"))
        report["device"]["cpu_kernels"] = kernels.status()
        save()
        try:
            import nbval  # noqa: F401
            # the English edition: zh-TW and solutions/ run the same code (tests/test_notebook_editions.py)
            report["steps"].append(run_step("notebooks on CUDA (nbval-lax)",
                                            [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                                             *sorted(str(p) for p in (ROOT / "notebooks").glob("*.ipynb"))], 300))
            save()
            import nbclient  # noqa: F401  (the test executes the notebooks with it; without it, it would skip)
            report["steps"].append(run_step("notebooks on CUDA in bfloat16 and float16",
                                            [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                             "tests/test_notebooks_in_low_precision.py"], 300))
        except ImportError as e:
            report["steps"].append({"name": "notebooks on CUDA", "ok": None, "tail": f"{e.name} is not installed here"})
            print(f"[skipped] notebooks: {e.name} is not installed here (carry its wheels)", flush=True)
    save()
    if args.cpu_bench:
        pin = ["taskset", "-c", "0,1"] if shutil.which("taskset") else []
        for name, script, extra in [("token step vs whole stack", "bench_step.py",
                                     ["--ways", "token step;whole stack in one call;4 rows at most", "--rounds", "8"]),
                                    ("time outside the C calls", "bench_overhead.py", ["--rounds", "3"]),
                                    ("a short prompt, torch against the few-rows walk", "bench_prompt.py",
                                     ["--rounds", "3", "--lengths", "2", "4", "8", "16"])]:
            step = run_step(f"CPU benchmark on 2 cores: {name}", [*pin, py, f"benchmarks/{script}", *extra], 300,
                            QWEN_LAB_THREADS="2", OMP_NUM_THREADS="2")
            step["figures"] = step["tail"]
            report["steps"].append(step)
            save()
    print("\n" + summary(report))
    if not all(s["ok"] is not False for s in report["steps"]) or "error" in report.get("benchmark", {}):
        sys.exit(1)


if __name__ == "__main__":
    main()
