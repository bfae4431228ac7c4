"""The decode step with its weights in 2 MiB pages against 4 KiB pages, alternating in one process.

    python benchmarks/bench_pages.py                          # Qwen2.5-0.5B shapes, bf16 and f32
    python benchmarks/bench_pages.py --config benchmarks/configs/qwen2.5-1.5b.json

``pages.huge_pages``: a converted weight is copied into memory advised with ``MADV_HUGEPAGE``, and a
file's mapping is advised the same way. Two copies of the same model are loaded in this process:

- ``2 MiB pages``: as ``load_model`` loads it;
- ``4 KiB pages``: loaded with ``QWEN_LAB_HUGE_PAGES=0``; a weight the file's mapping holds as it is
  (bf16 loaded as bf16) is then copied into memory torch allocates (4 KiB pages unless the system
  gives every allocation huge pages: its setting is printed), since the page cache, which both
  copies' mappings share, may already hold the file in 2 MiB pieces.

Each copy's token step (``kernels.TokenStep``, what ``generate`` decodes with) is timed in turn,
each right after a read probe (``torch.sum`` over as many bytes in 4 KiB pages, and over as many in
2 MiB pages): the bandwidth moves from second to second on a shared machine, and alternating is what
makes the columns comparable. How much of each copy really sits in huge pages is read from
``/proc/self/smaps_rollup`` as it loads (AnonHugePages, FilePmdMapped).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def huge_kib() -> int:
    fields = {line.split(":")[0]: int(line.split()[1]) for line in open("/proc/self/smaps_rollup")
              if line.split(":")[0] in ("AnonHugePages", "FilePmdMapped")}
    return sum(fields.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=HERE / "configs" / "qwen2.5-0.5b.json")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--steps", type=int, default=4, help="decode steps per measurement")
    args = p.parse_args()

    import torch
    from bench_decode import machine, make_checkpoint, sum_speed, weights_only
    from qwen_lab import kernels, pages
    from qwen_lab.load import load_model

    directory = make_checkpoint(args.config)
    print(machine())
    print(f"transparent huge pages: {pages.THP_SETTING.read_text().strip()}; model: random weights, shapes of "
          f"{args.config.stem}; {args.rounds} rounds of {args.steps} steps each way, alternating")
    for dtype in args.dtypes.split(","):
        copies = {}
        for name, off in (("4 KiB pages", True), ("2 MiB pages", False)):
            before = huge_kib()
            os.environ["QWEN_LAB_HUGE_PAGES"] = "0" if off else "1"
            model = load_model(weights_only(directory), dtype, "cpu")
            os.environ.pop("QWEN_LAB_HUGE_PAGES")
            if off:  # weights still on the file's mapping: into torch's own memory
                for module in model.modules():
                    for key, param in list(module._parameters.items()):
                        if param is not None:
                            module._parameters[key] = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
                model.tie_weights()
            for param in model.parameters():
                param.sum()  # every page in now
            caches = model.new_caches(1, 300 + args.rounds * args.steps * 2)
            with torch.inference_mode():
                model(torch.arange(100, 356)[None], caches, 0, last_only=True)
            copies[name] = model, caches, kernels.TokenStep.for_model(model, caches), (huge_kib() - before) / 2**20
        model = copies["2 MiB pages"][0]
        nbytes = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                     if isinstance(m, torch.nn.Linear))
        probe_small = torch.ones(nbytes // 4)
        probe_huge = pages.huge_copy(torch.ones(nbytes // 4, dtype=torch.bfloat16), torch.float32)
        times = {name: [] for name in copies}
        reads = {name: [] for name in copies}
        huge_reads = []
        pos = 256
        torch.set_num_threads(kernels.num_threads())
        for _ in range(args.rounds):
            huge_reads.append(sum_speed(probe_huge))
            for name, (_, _, step, _) in copies.items():
                torch.set_num_threads(kernels.num_threads())
                reads[name].append(sum_speed(probe_small))
                torch.set_num_threads(1)  # as generation decodes: torch on one thread, the kernels on all
                start = time.perf_counter()
                for i in range(args.steps):
                    step(5, pos + i)
                times[name].append((time.perf_counter() - start) / args.steps)
            pos += args.steps
        print(f"\n{dtype}: {nbytes / 1e9:.2f} GB of weights per token; read probe in 2 MiB pages: median "
              f"{statistics.median(huge_reads) / 1e9:.1f} GB/s")
        print(f"  {'way':<14} {'in huge pages':>14} {'ms/step':>9} {'tok/s':>7} {'GB/s':>6} {'read GB/s':>10} "
              f"{'used':>6}   (4 KiB probe; medians)")
        for name, (_, _, _, huge_gib) in copies.items():
            t = statistics.median(times[name])
            used = statistics.median(nbytes / s / r for s, r in zip(times[name], reads[name]))
            print(f"  {name:<14} {huge_gib:11.2f} GiB {t * 1e3:9.1f} {1 / t:7.2f} {nbytes / t / 1e9:6.1f} "
                  f"{statistics.median(reads[name]) / 1e9:10.1f} {used:6.0%}")
        del copies, model


if __name__ == "__main__":
    main()
