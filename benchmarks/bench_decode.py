"""Decode speed of qwen_lab against transformers, on the same weights, in one run.

    python benchmarks/bench_decode.py                       # Qwen2.5-0.5B shapes, random weights
    python benchmarks/bench_decode.py --config benchmarks/configs/qwen2.5-1.5b.json
    python benchmarks/bench_decode.py --model Qwen/Qwen2.5-0.5B-Instruct   # a real checkpoint

Each measurement runs in a fresh process (so load time and peak RSS are its own), alternating
qwen_lab and transformers for several rounds; medians are reported. Memory-bandwidth utilisation =
weight bytes read per token x tokens/s / the read bandwidth measured in this same run (before each
round and in each worker right after it decodes; the median is used, the range is reported).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"


def machine() -> str:
    from qwen_lab.kernels import cpu_model
    model = cpu_model() or "unknown CPU"
    import torch
    from qwen_lab.load import native_bf16
    model += " (bf16 in hardware)" if native_bf16() else " (no bf16 instructions)"
    return (f"{model}, {os.cpu_count()} logical cores, torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads, Python {platform.python_version()}")


def make_checkpoint(config_path: Path) -> Path:
    """Random weights at the exact shapes of ``config_path``, saved once as bf16 safetensors."""
    import torch
    from safetensors.torch import save_file
    from qwen_lab.load import build_model, read_config
    config = read_config(config_path)
    out = CACHE / config_path.stem
    if (out / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(config, "meta")
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, p in model.named_parameters():
        t = torch.randn(p.shape, generator=generator, dtype=torch.float32).mul_(0.02)
        if "norm" in name:
            t.fill_(1.0)
        state[name] = t.to(torch.bfloat16)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}, indent=2))
    return out


def cache_like_a_download(files: list[Path]) -> str:
    """Each weights file cached in 2 MiB pieces, as a download or a first read from disk leaves it, and a line
    saying how much of it a mapping gets in 2 MiB pages.

    A file written in small pieces (``save_file`` above, ``tar -xf``, ``cp``) stays cached in those pieces
    until the system drops them, and a mapping of it then gets 4 KiB pages (``load.cached_in_huge_pages``):
    this benchmark's checkpoint, written hours before, mapped 28% in 2 MiB pages, and side by side a 0.5B
    bf16 token step read the same checkpoint in 4 KiB pages at 75% of a 64 GB/s probe against 83% in 2 MiB
    pages (AMD EPYC Zen 4, benchmarks/RESULTS.md). A user's download gets 2 MiB pages; so a file mapped less
    than 90% in them is dropped from the cache (``posix_fadvise``: only pages no process maps) and read
    afresh, 16 MiB a read."""
    from qwen_lab.load import cached_in_huge_pages
    total = huge = 0
    redone = []
    for path in files:
        size, seen = path.stat().st_size, cached_in_huge_pages(path)
        if seen is not None and seen[1] < 0.9 * (size - size % (2 << 20)):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                while os.read(fd, 16 << 20):
                    pass
            finally:
                os.close(fd)
            seen = cached_in_huge_pages(path)
            redone.append(path.name)
        total += size
        huge += seen[1] if seen is not None else 0
    return (f"weights: {huge / 2**20:,.0f} of {total / 2**20:,.0f} MiB map in 2 MiB pages"
            + (f" (dropped from the cache and read afresh: {', '.join(redone)})" if redone else ""))


def probe_memory(gib: float = 1.0):
    """``gib`` of float32 ones in memory like the weights' (``pages.huge_empty``), for ``read_bandwidth``."""
    import torch
    from qwen_lab.pages import huge_empty
    return huge_empty((int(gib * 2**30 / 4),), torch.float32).fill_(1.0)


def read_bandwidth(gib: float = 1.0, reps: int = 5, memory=None) -> float:
    """Bytes per second that summing a large float32 tensor reads (the best of ``reps``), in memory like the
    weights' (2 MiB pages where ``pages.huge_pages()``: a probe in 4 KiB pages reads slower, up to a
    quarter on an AMD EPYC Zen 4, and would flatter the kernels that read 2 MiB pages). ``memory``: such a
    tensor to sum (``probe_memory``), for a caller that probes many times; else ``gib`` of it, made here."""
    x = probe_memory(gib) if memory is None else memory
    x.sum()
    return max(sum_speed(x) for _ in range(reps))


def sum_speed(memory) -> float:
    """Bytes per second of one ``torch.sum`` over ``memory`` (on torch's threads as they are set), after which
    torch's OpenMP workers have stopped spinning (``threads.wait_until_quiet``): they would share a core with
    whatever is timed next."""
    from qwen_lab.threads import wait_until_quiet
    start = time.perf_counter()
    memory.sum()
    seconds = time.perf_counter() - start
    wait_until_quiet()
    return memory.numel() * memory.element_size() / seconds


def weights_only(directory: Path):
    """``ModelFiles`` for a folder holding config.json and safetensors only (no tokenizer)."""
    from qwen_lab.hub import ModelFiles
    return ModelFiles(root=directory, config=directory / "config.json", tokenizer=directory,
                      tokenizer_config=directory, generation_config=None, chat_template=None,
                      weights=sorted(directory.glob("*.safetensors")))


def _word_tokenizer(vocab_size: int):
    """A tokenizer with one word per id, so generated ids decode whatever the weights are."""
    from tokenizers import Tokenizer, models
    from qwen_lab.tokenizer import Tokenizer as QTokenizer
    return QTokenizer(Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0")), {})


def current_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(impl: str, dtype_name: str, directory: Path, prompt_tokens: int, new_tokens: int) -> dict:
    import torch
    if impl == "transformers":
        import transformers  # noqa: F401  (imported before the baseline, like qwen_lab below)
    else:
        import qwen_lab.generation  # noqa: F401
        from qwen_lab import kernels
        kernels.available()  # build (or find) the kernel before the baseline, outside the timed load
    torch.manual_seed(0)
    baseline_rss = current_rss()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    config = json.loads((directory / "config.json").read_text())
    prompt = torch.randint(0, config["vocab_size"], (1, prompt_tokens), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    if impl in ("qwen_lab", "qwen_lab-torch", "qwen_lab-before"):  # -torch: F.linear instead of the C kernels
        from qwen_lab.generation import GenerationConfig, generate_stream
        from qwen_lab.load import load_model
        model = load_model(weights_only(directory), dtype_name, "cpu", matvec="torch" if impl == "qwen_lab-torch" else "auto")
        load_s = time.perf_counter() - t0
        tok = _word_tokenizer(config["vocab_size"])
        gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=[])
        _ = generate_stream(model, tok, prompt[0, :16].tolist(), GenerationConfig(max_new_tokens=4)).result  # warm-up
        result = generate_stream(model, tok, prompt[0].tolist(), gen).result
        assert result.generated_tokens == new_tokens
        ttft, decode = result.ttft_s, result.decode_tokens_per_s
        prompt_threads = result.prefill_threads  # fewer than torch's when another program held a CPU just then
        params = sum(p.numel() for p in model.parameters())
        elem = model.lm_head.weight.element_size()
    else:
        from transformers import AutoModelForCausalLM
        from transformers.generation.streamers import BaseStreamer
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
        load_s = time.perf_counter() - t0

        class Clock(BaseStreamer):
            def __init__(self):
                self.times = []

            def put(self, value):
                self.times.append(time.perf_counter())

            def end(self):
                pass

        kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, repetition_penalty=1.0,
                      temperature=None, top_p=None, top_k=None)
        model.generate(prompt[:, :16], max_new_tokens=4, **kwargs)  # warm-up
        clock = Clock()
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock, **kwargs)
        end = time.perf_counter()
        assert out.shape[1] - prompt_tokens == new_tokens
        first = clock.times[1]  # times[0] is the prompt being "put"
        ttft, decode = first - start, (new_tokens - 1) / (end - first)
        prompt_threads = torch.get_num_threads()
        params = sum(p.numel() for p in model.parameters())
        elem = next(model.parameters()).element_size()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del model
    return {"impl": impl, "dtype": dtype_name, "load_s": load_s, "ttft_s": ttft,
            "prefill_tokens_per_s": prompt_tokens / ttft, "decode_tokens_per_s": decode,
            "prompt_threads": prompt_threads,
            "weight_bytes": params * elem, "peak_rss_bytes": peak_rss, "baseline_rss_bytes": baseline_rss,
            "bandwidth": read_bandwidth()}  # right after decoding, once peak RSS is recorded


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=HERE / "configs" / "qwen2.5-0.5b.json")
    p.add_argument("--model", help="a real checkpoint (Hub id or folder) instead of random weights")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--before", type=Path, help="a checkout of an earlier qwen_lab, measured as qwen_lab-before")
    p.add_argument("--impls", default="qwen_lab,transformers",
                   help="any of qwen_lab, transformers, qwen_lab-torch (qwen_lab without its C kernels), "
                        "qwen_lab-before (the checkout given by --before)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--results", type=Path, help="append a Markdown report to this file")
    p.add_argument("--worker", nargs=3, metavar=("IMPL", "DTYPE", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        impl, dtype, directory = args.worker
        print(json.dumps(worker(impl, dtype, Path(directory), args.prompt_tokens, args.new_tokens)))
        return

    if args.model:
        from qwen_lab.hub import resolve
        directory, label = resolve(args.model).root, args.model
    else:
        directory, label = make_checkpoint(args.config), f"random weights, shapes of {args.config.stem}"
    pages_line = cache_like_a_download(weights_only(directory).weights if not args.model
                                       else resolve(args.model).weights)
    print(f"{machine()}\nmodel: {label}\n{pages_line}\n", flush=True)
    runs: dict[tuple[str, str], list[dict]] = {}
    bandwidths = []  # measured before every round: on a shared machine it moves
    for r in range(args.rounds):
        bandwidths.append(read_bandwidth())
        for dtype in args.dtypes.split(","):
            for impl in args.impls.split(","):
                cmd = [sys.executable, __file__, "--worker", impl, dtype, str(directory),
                       "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
                env = dict(os.environ, PYTHONPATH=str(args.before)) if impl == "qwen_lab-before" else None
                done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if done.returncode:
                    sys.exit(f"{impl} {dtype} failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                runs.setdefault((impl, dtype), []).append(result)
                bandwidths.append(result["bandwidth"])
                print(f"round {r + 1} {impl:12} {dtype:8} decode {result['decode_tokens_per_s']:6.2f} tok/s  "
                      f"prefill {result['prefill_tokens_per_s']:7.1f} tok/s ({result['prompt_threads']} threads)  "
                      f"load {result['load_s']:.2f} s  "
                      f"read bandwidth just after {result['bandwidth'] / 1e9:.1f} GB/s", flush=True)

    def med(impl, dtype, key):
        return statistics.median(r[key] for r in runs[(impl, dtype)])

    bandwidth = statistics.median(bandwidths)
    lines = [f"### {label}", "", f"Machine: {machine()}; {pages_line}; read bandwidth measured {len(bandwidths)} "
             f"times in this run (before each round and after each measurement): median {bandwidth / 1e9:.1f} "
             f"GB/s, range {min(bandwidths) / 1e9:.1f}-{max(bandwidths) / 1e9:.1f}. "
             f"Prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens "
             f"(greedy, EOS ignored), medians of {args.rounds} alternating rounds, each in a fresh process.", "",
             "| implementation | dtype | load s | peak RSS GiB (above imports) | weights GiB | prefill tok/s | TTFT s "
             "| decode tok/s | bandwidth used (vs median) | (vs probe right after) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for dtype in args.dtypes.split(","):
        for impl in args.impls.split(","):
            weights = runs[(impl, dtype)][0]["weight_bytes"]
            decode = med(impl, dtype, "decode_tokens_per_s")
            above = med(impl, dtype, "peak_rss_bytes") - med(impl, dtype, "baseline_rss_bytes")
            # each run against the bandwidth probed in its own process just after it: the fairest
            # pairing on a machine whose bandwidth moves within seconds
            after = statistics.median(r["weight_bytes"] * r["decode_tokens_per_s"] / r["bandwidth"]
                                      for r in runs[(impl, dtype)])
            lines.append(f"| {impl} | {dtype} | {med(impl, dtype, 'load_s'):.2f} | "
                         f"{med(impl, dtype, 'peak_rss_bytes') / 2**30:.2f} ({above / 2**30:.2f}) | "
                         f"{weights / 2**30:.2f} | "
                         f"{med(impl, dtype, 'prefill_tokens_per_s'):.1f} | {med(impl, dtype, 'ttft_s'):.2f} | "
                         f"{decode:.2f} | {weights * decode / bandwidth:.0%} | {after:.0%} |")
        if {"qwen_lab", "transformers"} <= set(args.impls.split(",")):
            ratio = med("qwen_lab", dtype, "decode_tokens_per_s") / med("transformers", dtype, "decode_tokens_per_s")
            pre = med("qwen_lab", dtype, "prefill_tokens_per_s") / med("transformers", dtype, "prefill_tokens_per_s")
            lines.append(f"| **qwen_lab / transformers** | {dtype} | | | | **{pre:.2f}x** | | **{ratio:.2f}x** | | |")
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    if args.results:
        with open(args.results, "a", encoding="utf-8") as f:
            f.write("\n" + report)


if __name__ == "__main__":
    main()
