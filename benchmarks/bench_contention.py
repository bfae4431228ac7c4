"""Speed when the CPU is shared: qwen_lab and transformers, quiet, beside a busy program, and
as N learners' kernels generating at the same time on one machine.

    python benchmarks/bench_contention.py                          # everything (about 20 minutes)
    python benchmarks/bench_contention.py --models tiny-chat --scenarios quiet,busy

Scenarios: ``quiet`` (one generating process alone), ``busy`` (one generating process beside a
busy loop, like a browser or a second notebook at work), and ``N`` (N generating processes at
once: N learners' kernels on one server). Models: the embedded ``tiny-chat`` and random weights at
Qwen2.5-0.5B's shapes; dtypes bfloat16 and float32.

Every process loads the model, then all start together: for ``--window`` seconds each runs
prompts (prefill only) back to back, then, for another window, replies (decode). Per-process
speed is its tokens over the time its own calls took (what a learner sees); the aggregate is
all the processes' tokens over the wall time from the first start to the last end (what the
machine delivers). "vs quiet" compares aggregates with one process alone. Memory: after the runs each process reports its PSS (proportional set size: a page
shared by k processes counts 1/k in each), so the sum over processes is what they really
take together; the weights file's pages are shared when nobody converts them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_decode import _word_tokenizer, make_checkpoint, weights_only  # noqa: E402

PROMPT_TOKENS = 64  # per prefill unit
REPLY_TOKENS = 16   # per decode unit (after a 16-token prompt)


def cpu_description() -> str:
    """The CPU's model name and the instruction sets that matter to the kernels."""
    from qwen_lab.kernels import cpu_flags, cpu_model
    name, flags = cpu_model() or "unknown CPU", cpu_flags()
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(shown) or 'no AVX2'}), {os.cpu_count()} logical CPUs"


def model_dir(name: str) -> Path:
    if name == "tiny-chat":
        from qwen_lab.hub import EMBEDDED_MODEL_DIR
        return EMBEDDED_MODEL_DIR
    return make_checkpoint(HERE / "configs" / f"qwen2.5-{name}.json")


def generation_arguments(doc: str) -> argparse.ArgumentParser:
    """The options of a benchmark that generates in one process: --model, --dtype, --tokens, --rounds."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="0.5b", help="tiny-chat, 0.5b or 1.5b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    return p


def model_and_tokenizer(args: argparse.Namespace):
    """The model ``--model`` names, loaded in ``--dtype`` on the CPU, and a tokenizer of its vocabulary."""
    from qwen_lab.load import load_model
    model = load_model(weights_only(model_dir(args.model)), args.dtype, "cpu")
    return model, _word_tokenizer(model.config.vocab_size)


# ---------------------------------------------------------------- one generating process

def pss_bytes() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


class QwenLab:
    def __init__(self, directory: Path, dtype: str):
        from qwen_lab.generation import GenerationConfig, generate_stream
        from qwen_lab.load import load_model
        self.model = load_model(weights_only(directory), dtype, "cpu")
        self.vocab = self.model.config.vocab_size
        self.tok = _word_tokenizer(self.vocab)
        self.config, self.generate_stream = GenerationConfig, generate_stream

    def run(self, prompt: list[int], new_tokens: int) -> tuple[float, float, str]:
        """(prefill seconds, decode seconds, "prefill/decode threads") of one generation."""
        gen = self.config(max_new_tokens=new_tokens, do_sample=False, eos_token_id=[])
        r = self.generate_stream(self.model, self.tok, prompt, gen).result
        threads = f"{getattr(r, 'prefill_threads', '?')}/{getattr(r, 'decode_threads', '?')}"  # ?: an older version
        return r.ttft_s, r.total_s - r.ttft_s, threads


class Transformers:
    def __init__(self, directory: Path, dtype: str):
        import torch
        from transformers import AutoModelForCausalLM
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype)).eval()
        self.vocab = self.model.config.vocab_size

    def run(self, prompt: list[int], new_tokens: int) -> tuple[float, float, str]:
        from transformers.generation.streamers import BaseStreamer
        times = []

        class Clock(BaseStreamer):
            def put(self, value):
                times.append(time.perf_counter())

            def end(self):
                pass

        start = time.perf_counter()
        self.model.generate(self.torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            do_sample=False, eos_token_id=None, pad_token_id=0, streamer=Clock(),
                            temperature=None, top_p=None, top_k=None)
        end = time.perf_counter()
        first = times[1]  # times[0] is the prompt being "put"
        n = self.torch.get_num_threads()
        return first - start, end - first, f"{n}/{n}"


def worker(impl: str, model: str, dtype: str) -> None:
    """Load, say ready, then run the phases the parent asks for (one JSON line each)."""
    import random
    runner = (Transformers if impl == "transformers" else QwenLab)(model_dir(model), dtype)
    rng = random.Random(os.getpid())
    runner.run([rng.randrange(runner.vocab) for _ in range(16)], 2)  # warm-up
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        phase, *rest = line.split()
        deadline = float(rest[0]) if rest else 0.0
        if phase == "quit":
            return
        if phase == "pss":
            print(json.dumps({"pss": pss_bytes()}), flush=True)
            continue
        tokens, busy, units, threads = 0, 0.0, 0, []
        start = time.time()
        while time.time() < deadline or units == 0:
            if phase == "prefill":
                pre, _, t = runner.run([rng.randrange(runner.vocab) for _ in range(PROMPT_TOKENS)], 1)
                tokens, busy = tokens + PROMPT_TOKENS, busy + pre
            else:
                _, dec, t = runner.run([rng.randrange(runner.vocab) for _ in range(16)], REPLY_TOKENS)
                tokens, busy = tokens + REPLY_TOKENS - 1, busy + dec
            units += 1
            threads.append(t)
        common = max(set(threads), key=threads.count)  # the usual choice in this window
        print(json.dumps({"tokens_per_s": tokens / busy, "units": units, "tokens": tokens, "start": start,
                          "end": time.time(), "threads": common}), flush=True)


# ---------------------------------------------------------------- the conductor

#: variants of qwen_lab, to measure what each idea buys: name -> environment
VARIANTS = {"qwen_lab": {}, "qwen_lab-2threads": {"QWEN_LAB_THREADS": "2"}}


def scenario(impl: str, model: str, dtype: str, processes: int, busy: bool, window: float,
             before: Path | None = None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **VARIANTS.get(impl, {}))
    if impl == "qwen_lab-before":  # another checkout of qwen_lab (e.g. the version before this one)
        env["PYTHONPATH"] = str(before)
    cmd = [sys.executable, __file__, "--worker", impl, model, dtype]
    workers = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
               for _ in range(processes)]
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        for w in workers:
            if json.loads(w.stdout.readline() or "{}").get("ready") is not True:
                raise RuntimeError(f"a {impl} worker failed to start")
        out = {}
        for phase in ("prefill", "decode"):
            deadline = time.time() + window
            for w in workers:
                w.stdin.write(f"{phase} {deadline}\n")
                w.stdin.flush()
            out[phase] = [json.loads(w.stdout.readline()) for w in workers]
        for w in workers:
            w.stdin.write("pss\n")
            w.stdin.flush()
        out["pss"] = [json.loads(w.stdout.readline())["pss"] for w in workers]
        for w in workers:
            w.stdin.write("quit\n")
            w.stdin.flush()
            w.wait(60)
        return out
    finally:
        for w in workers:
            w.kill()
        if hog:
            hog.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-chat,0.5b", help="tiny-chat and/or 0.5b, 1.5b (random weights)")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--impls", default="qwen_lab,transformers",
                   help="qwen_lab, transformers, qwen_lab-2threads (QWEN_LAB_THREADS=2: no adapting to others), "
                        "qwen_lab-before (the checkout given by --before)")
    p.add_argument("--before", type=Path, help="a checkout of an earlier qwen_lab, for qwen_lab-before")
    p.add_argument("--scenarios", default="quiet,busy,2,4,8")
    p.add_argument("--window", type=float, default=6.0, help="seconds per phase")
    p.add_argument("--results", type=Path, help="append the Markdown tables to this file")
    p.add_argument("--worker", nargs=3, metavar=("IMPL", "MODEL", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(*args.worker)
        return

    import torch
    header = (f"Machine: {cpu_description()}; torch {torch.__version__}; window {args.window:g} s per phase; "
              f"prompts of {PROMPT_TOKENS} tokens, replies of {REPLY_TOKENS} tokens after a 16-token prompt.")
    print(header, flush=True)
    lines = [header, ""]
    for model in args.models.split(","):
        for dtype in args.dtypes.split(","):
            lines += [f"### {model}, {dtype}", "",
                      "| impl | scenario | prefill tok/s per process (min-max) | aggregate | vs quiet "
                      "| decode tok/s per process (min-max) | aggregate | vs quiet | threads (prompt/reply) "
                      "| PSS GiB per process | PSS GiB, sum |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for impl in args.impls.split(","):
                quiet = None
                for name in args.scenarios.split(","):
                    n, busy = (1, name == "busy") if name in ("quiet", "busy") else (int(name), False)
                    r = scenario(impl, model, dtype, n, busy, args.window, args.before)
                    row = {}
                    for phase in ("prefill", "decode"):
                        rates = [x["tokens_per_s"] for x in r[phase]]
                        # every token the processes made, over the time from the first start to the last end
                        span = max(x["end"] for x in r[phase]) - min(x["start"] for x in r[phase])
                        aggregate = sum(x["tokens"] for x in r[phase]) / span
                        row[phase] = (statistics.median(rates), min(rates), max(rates), aggregate)
                    if name == "quiet":
                        quiet = row
                    ratio = {ph: (row[ph][3] / quiet[ph][3] if quiet else float("nan")) for ph in row}
                    threads = max((x["threads"] for x in r["decode"]), key=[x["threads"] for x in r["decode"]].count)
                    label = {"quiet": "quiet", "busy": "1 busy process beside"}.get(name, f"{n} processes")
                    line = (f"| {impl} | {label} | {row['prefill'][0]:.1f} ({row['prefill'][1]:.1f}-"
                            f"{row['prefill'][2]:.1f}) | {row['prefill'][3]:.1f} | {ratio['prefill']:.0%} | "
                            f"{row['decode'][0]:.2f} ({row['decode'][1]:.2f}-{row['decode'][2]:.2f}) | "
                            f"{row['decode'][3]:.2f} | {ratio['decode']:.0%} | {threads} | "
                            f"{statistics.median(r['pss']) / 2**30:.2f} | {sum(r['pss']) / 2**30:.2f} |")
                    print(line, flush=True)
                    lines.append(line)
            lines.append("")
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    if args.results:
        with open(args.results, "a", encoding="utf-8") as f:
            f.write("\n" + report)


if __name__ == "__main__":
    main()
