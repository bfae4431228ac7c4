"""One decode step, its ways of running side by side in one process, against the memory's read speed.

    python benchmarks/bench_step.py                          # Qwen2.5-0.5B shapes, bf16 and f32
    python benchmarks/bench_step.py --config benchmarks/configs/qwen2.5-1.5b.json --dtypes bfloat16

A decode step reads every weight once, so its floor is weight bytes / read bandwidth. This script
times the model's one-token forward (the KV cache holding a 256-token prompt, or ``--context``
positions), alternating in rounds between:

- ``token step``: ``kernels.TokenStep``, made once as a generation makes it: the embedding row, the
  stack, the final norm and the head from one C call, with no per-token checks — what ``generate``
  decodes with;
- ``whole stack in one call``: ``kernels.DecoderModel``, every layer's step from one C call, with
  chunks sized per job (up to ``kernels.CHUNK_MAX_BYTES``) — what calling ``load_model``'s model gives;
- ``one call per layer``: ``kernels.DecoderLayer``, one C call per layer from Python (as before the
  whole-stack call);
- ``module by module``: the same kernels called layer part by layer part from Python (the path
  before the one-call step);
- ``64 KB chunks``: the whole-stack step with every chunk 64 KB (the pool's sharing before);
- ``no tail split``: the whole-stack step with a job's last chunks as large as the others
  (``kernels.TAIL_SPLIT`` = 1, as before it);
- ``token step, one claim counter``: the token step with two threads' chunks claimed in one counter's
  order (``kernels.CLAIMS`` = ``counter``, as before halves);
- ``token step, no warming``: the token step with threads that only wait when they have nothing left to
  claim (``kernels.WARM_BYTES`` = 0, as before warming: csrc/pool.c);
- ``token step, --against's kernels`` (with ``--against PATH``): the token step of a second copy of the
  model, with the same plans, made with the C kernels built from another checkout (PATH: the
  ``kernels-<hash>.so`` that checkout built into ``kernels.cache_dir()``, named by its
  ``kernels.library_name()``): a change to ``csrc/`` against the code before it;
- ``bf16 widened, no pairs`` (bf16 only): the whole-stack step with each shape's plan measured without
  the pair variants (``kernels.PAIR_VARIANTS``), i.e. every bf16 weight widened to float32 before its
  multiply-add, as before those variants;
- ``4 rows at most``: the whole-stack step with each shape whose plan walks 8 rows side by side measured
  again without those plans (as before them);

and, in the same rounds, ``torch.sum`` over a float32 tensor of the same bytes as the weights, in
memory like theirs (2 MiB pages where ``pages.huge_pages()``), right before each timed step: the bandwidth a plain read gets at that moment. Utilisation is the
step's weight bytes over its time, over that probe (median of the rounds). On a shared machine the
bandwidth moves from second to second; alternating is what makes the columns comparable. Where some rounds'
probes read more than 10% below the run's fastest, the rounds near the fastest and the others are also
summed up apart (a host's memory can switch speed for minutes at a time).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOKEN_STEP = "token step"
COUNTER = "token step, one claim counter"
COLD = "token step, no warming"
AGAINST = "token step, --against's kernels"
FOUR_ROWS = "4 rows at most"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=HERE / "configs" / "qwen2.5-0.5b.json")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=4, help="decode steps per measurement")
    p.add_argument("--context", type=int, default=256, help="positions already in the KV cache")
    p.add_argument("--ways", help="only these ways, separated by ';' (a name may hold a comma; default: all)")
    p.add_argument("--against", type=Path, help="another checkout's built C kernels (kernels-<hash>.so): their "
                                                "token step as one more way")
    args = p.parse_args()

    import torch
    from bench_decode import cache_like_a_download, machine, make_checkpoint, sum_speed, weights_only
    from qwen_lab import kernels, layers, pages, tuning
    from qwen_lab.load import load_model

    stack, fused = kernels.DecoderModel.forward, kernels.DecoderLayer.forward
    by_layer, by_modules = layers.DecoderModel.forward, layers.DecoderLayer.forward
    every_way = {  # name -> ((the stack's forward, the layer's), kernels.configure's settings, plans: None as loaded)
        TOKEN_STEP: ((stack, fused), {}, None),
        "whole stack in one call": ((stack, fused), {}, None),
        "one call per layer": ((by_layer, fused), {}, None),
        "module by module": ((by_layer, by_modules), {}, None),
        "64 KB chunks": ((stack, fused), {"chunk_max_bytes": kernels.CHUNK_BYTES}, None),
        "no tail split": ((stack, fused), {"tail_split": 1}, None),
        COUNTER: ((stack, fused), {"claims": "counter"}, None),
        COLD: ((stack, fused), {"warm_bytes": 0}, None),
    }
    wanted = [name.strip() for name in args.ways.split(";")] if args.ways else None
    known = {*every_way, "bf16 widened, no pairs", FOUR_ROWS} | ({AGAINST} if args.against else set())
    if wanted and not set(wanted) <= known:
        p.error(f"--ways: no way named {'; '.join(sorted(set(wanted) - known))}; "
                f"the ways are: {'; '.join(sorted(known))}")
    other = None
    if args.against:
        if not args.against.is_file():
            p.error(f"--against: no file {args.against}; build the other checkout's kernels first (its "
                    "qwen_lab.kernels.cache_dir() / library_name() names the file)")
        import ctypes
        try:
            other = kernels._declare(ctypes.CDLL(str(args.against.resolve())))
        except (OSError, kernels.KernelUnavailable) as error:
            raise SystemExit(f"--against: {args.against} cannot be compared with this checkout's: {error}")
    directory = make_checkpoint(args.config)
    print(machine())
    print(cache_like_a_download(weights_only(directory).weights))
    print(f"model: random weights, shapes of {args.config.stem}; KV cache holding {args.context} positions; "
          f"{args.rounds} rounds of {args.steps} steps each way, alternating")
    for dtype in args.dtypes.split(","):
        ways = dict(every_way)
        model = load_model(weights_only(directory), dtype, "cpu")
        linears = [m for m in model.modules() if isinstance(m, kernels.Linear) and m.use_kernel]
        tuned = {m: m.plan for m in linears}
        by_shape = {(m.out_features, m.in_features): m.plan for m in linears}  # the plan tuning chose per shape
        for name, keep in (("bf16 widened, no pairs", lambda p: p.variant not in kernels.PAIR_VARIANTS),
                           (FOUR_ROWS, lambda p: p.rows <= 4)):
            # the tuned plans, each shape's measured again without the walks `keep` drops where it uses one
            if (wanted is not None and name not in wanted) or (dtype != "bfloat16" and name != FOUR_ROWS):
                continue  # not asked for; pairs are bf16's alone
            if all(keep(plan) for plan in by_shape.values()):
                if wanted:
                    print(f"{dtype}: no shape's plan uses what '{name}' leaves out here: no such way")
                continue
            plans = [p for p in tuning.candidates(getattr(torch, dtype)) if keep(p)]
            again = {shape: plan if keep(plan) else tuning.measure(*shape, getattr(torch, dtype), plans)[0]
                     for shape, plan in by_shape.items()}
            ways[name] = ((stack, fused), {}, {m: again[m.out_features, m.in_features] for m in linears})
            print(f"{dtype} plans, tuned / {name}:",
                  ", ".join(f"{o}x{i}: {plan} / {again[o, i]}" for (o, i), plan in by_shape.items() if not keep(plan)))
        if wanted:
            ways = {name: way for name, way in ways.items() if name in wanted}
        nbytes = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                     if isinstance(m, torch.nn.Linear))
        probe = pages.huge_empty((nbytes // 4,), torch.float32).fill_(1.0)  # memory like the weights' (bench_decode)
        against = other is not None and (wanted is None or AGAINST in wanted)
        caches = model.new_caches(1, args.context + args.rounds * (len(ways) + against) * args.steps + 8)
        stepped = bool({TOKEN_STEP, COUNTER, COLD} & set(ways))
        token_step = kernels.TokenStep.for_model(model, caches) if stepped else None
        if stepped and token_step is None:
            raise SystemExit("kernels.TokenStep does not apply to this model here (no kernels?)")
        against_step = None
        if against:
            # a second model, its layers prepared and its step made while the other build is the library
            ours, kernels._outcome = kernels._outcome, lambda: (other, None)
            try:
                twin = load_model(weights_only(directory), dtype, "cpu")
                # the plans of this checkout's model, so that only the code differs (each build's own plans
                # file was measured at another moment, at whatever speed the memory had then)
                for mine, its in zip(linears, (m for m in twin.modules() if isinstance(m, kernels.Linear)
                                               and m.use_kernel)):
                    its.plan = tuned[mine]
                twin_caches = twin.new_caches(1, caches[0].max_len)
                prefill(twin, twin_caches, args.context)
                against_step = kernels.TokenStep.for_model(twin, twin_caches)
            finally:
                kernels._outcome = ours
            if against_step is None or against_step.lib is not other:
                raise SystemExit("--against: the token step does not apply to the second model")
            ways[AGAINST] = ((stack, fused), {}, None)
        times = {name: [] for name in ways}
        reads = {name: [] for name in ways}
        torch.set_num_threads(kernels.num_threads())
        prefill(model, caches, args.context)
        with torch.inference_mode():
            pos = args.context
            token = torch.tensor([[5]])
            for _ in range(args.rounds):
                for name, (forwards, sharing, plans) in ways.items():
                    for m in linears:
                        m.plan = (plans or tuned)[m]
                    torch.set_num_threads(kernels.num_threads())
                    reads[name].append(sum_speed(probe))
                    torch.set_num_threads(1)  # as generation decodes: torch on one thread, the kernels on all
                    kernels.DecoderModel.forward, kernels.DecoderLayer.forward = forwards
                    kernels.configure(**sharing)
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        if name in (TOKEN_STEP, COUNTER, COLD):
                            token_step(5, pos)
                        elif name == AGAINST:
                            against_step(5, pos)
                        else:
                            model(token, caches, pos, last_only=True)
                        pos += 1
                    times[name].append((time.perf_counter() - start) / args.steps)
        kernels.DecoderModel.forward, kernels.DecoderLayer.forward = stack, fused
        kernels.configure()
        for m in linears:
            m.plan = tuned[m]
        print(f"\n{dtype}: {nbytes / 1e9:.2f} GB of weights per token")
        width = max(24, *map(len, ways))
        # A shared host's memory can switch speed for minutes at a time (~35 and ~66 GB/s on an AMD EPYC Zen 4
        # guest): the rounds whose probe read within 10% of the run's fastest are also summed up apart.
        top = max(r for rs in reads.values() for r in rs)
        groups = [("all rounds", lambda r: True)]
        if any(r < 0.9 * top for rs in reads.values() for r in rs):
            groups += [("probe within 10% of its fastest", lambda r: r >= 0.9 * top),
                       ("the other rounds", lambda r: r < 0.9 * top)]
        for title, keep in groups:
            if len(groups) > 1:
                print(f"  {title}:")
            print(f"  {'way':<{width}} {'ms/step':>9} {'tok/s':>7} {'GB/s':>6} {'read GB/s':>10} {'used':>6}   "
                  f"(medians; rounds; step range)")
            for name in ways:
                rounds = [(s, r) for s, r in zip(times[name], reads[name]) if keep(r)]
                if not rounds:
                    continue
                t = statistics.median(s for s, _ in rounds)
                used = statistics.median(nbytes / s / r for s, r in rounds)
                print(f"  {name:<{width}} {t * 1e3:9.1f} {1 / t:7.2f} {nbytes / t / 1e9:6.1f} "
                      f"{statistics.median(r for _, r in rounds) / 1e9:10.1f} {used:6.0%}   "
                      f"({len(rounds)}; {min(s for s, _ in rounds) * 1e3:.1f}-"
                      f"{max(s for s, _ in rounds) * 1e3:.1f} ms)")


def prefill(model, caches: list, context: int) -> None:
    """The prompt's ``context`` positions into ``caches``, 512 at a time."""
    import torch
    with torch.inference_mode():
        for start in range(0, context, 512):
            count = min(512, context - start)
            model(torch.arange(100, 100 + count)[None], caches, start, last_only=True)


if __name__ == "__main__":
    main()
