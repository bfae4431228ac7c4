"""The ``qwen-lab`` command: the seed's program, in Python.

    qwen-lab generate --model Qwen/Qwen2.5-1.5B-Instruct --prompt "Hello"
    qwen-lab template --model qwen-lab/tiny-chat --messages chat.json
    qwen-lab download --model Qwen/Qwen2.5-1.5B-Instruct
    qwen-lab download --cache-dir /srv/hf Qwen/Qwen2.5-1.5B-Instruct Qwen/Qwen2.5-0.5B-Instruct
    qwen-lab doctor [--cache-dir /srv/hf] [--wheelhouse DIR] [MODEL ...]
    qwen-lab tune --kernel-cache /srv/qwen-lab/kernel-cache --threads 2 qwen-lab/tiny-chat Qwen/Qwen2.5-1.5B-Instruct

``generate`` writes the reply, and only the reply, to stdout; ``--stats``
adds one JSON line on stderr. Errors are one line on stderr (a newline in a
name they quote written as ``\\n``) and exit code 1 (``--debug`` shows the
traceback).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from .errors import QwenLabError, one_line, shown
from .hub import EMBEDDED_MODEL_ID

DEFAULT_SYSTEM = None  # None: the template's own default (Qwen's "You are Qwen, created by Alibaba Cloud...")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-lab", description="Chat-model generation from a model's own files.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    def template_var_arg(sp):
        sp.add_argument("--template-var", action="append", default=[], metavar="NAME=VALUE", type=_template_var,
                        help="a variable for the chat template, e.g. enable_thinking=false (Qwen3); "
                             "VALUE is read as JSON when it can be (false, 3, \"text\"), else as text; repeatable")

    def model_arg(sp):
        sp.add_argument("--model", default=EMBEDDED_MODEL_ID,
                        help=f"Hub repo id or local directory (default: the embedded {EMBEDDED_MODEL_ID})")
        sp.add_argument("--revision", default=None, help="branch, tag or commit on the Hub")
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    g = sub.add_parser("generate", help="stream a reply to stdout")
    model_arg(g)
    g.add_argument("--prompt", required=True, help="the user message (or the whole prompt with --raw)")
    g.add_argument("--system", default=DEFAULT_SYSTEM, help="system prompt (default: the template's own)")
    g.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is available")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: on CUDA bfloat16 (float16 on GPUs older than compute capability 8.0, such as the T4); "
                        "on a CPU the checkpoint's own dtype (bfloat16 or float32; float32 for others)")
    g.add_argument("--temperature", type=float, help="0 means greedy (default: generation_config.json)")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--repeat-penalty", type=float, help="repetition penalty (1 = off)")
    g.add_argument("--repeat-last-n", type=int, help="penalise only the last N tokens (default: all)")
    g.add_argument("--seed", type=int, default=299792458, help="sampling seed (default as in Candle's example)")
    g.add_argument("--max-new-tokens", type=int, default=512)
    g.add_argument("--eos-token", action="append", metavar="TOKEN",
                   help="stop on this token; repeatable; replaces the EOS list of generation_config.json")
    g.add_argument("--ignore-eos", action="store_true", help="never stop on EOS: run to --max-new-tokens")
    g.add_argument("--show-special", action="store_true", help="print special tokens such as <|im_end|>")
    g.add_argument("--raw", action="store_true", help="send --prompt as is, without the chat template")
    template_var_arg(g)
    g.add_argument("--stats", action="store_true", help="one JSON line of figures on stderr at the end")
    g.add_argument("--top-logprobs", type=int, default=0, metavar="K",
                   help="for each new token, one JSON line on stderr: its log-probability and the K likeliest "
                        "tokens (0-20) of the distribution it was chosen from")

    t = sub.add_parser("template", help="print the rendered prompt for a conversation")
    model_arg(t)
    t.add_argument("--messages", required=True, type=Path, help="JSON file: a list of {role, content}")
    t.add_argument("--tools", type=Path, help="JSON file: a list of tool schemas")
    t.add_argument("--no-generation-prompt", action="store_true", help="do not append the assistant header")
    template_var_arg(t)

    d = sub.add_parser("download", help="fetch models' files, check them, and print where each landed",
                       description="Fetch each model's files into the Hugging Face cache (or check the ones already "
                                   "there, fetching a damaged one again), then print one local folder per model. "
                                   "To fill a shared cache for a room with no network: run it once with --cache-dir "
                                   "DIR, then use the models with HF_HUB_CACHE=DIR HF_HUB_OFFLINE=1.")
    d.add_argument("models", nargs="*", metavar="MODEL", help="Hub repo ids or local directories")
    d.add_argument("--model", action="append", default=[], dest="more_models", metavar="MODEL",
                   help=f"one more model; repeatable (default, with no model at all: {EMBEDDED_MODEL_ID})")
    d.add_argument("--revision", default=None, help="branch, tag or commit on the Hub (for every model)")
    d.add_argument("--cache-dir", type=Path, help="the cache to fill (default: HF_HUB_CACHE, ~/.cache/huggingface/hub)")
    d.add_argument("--force-download", action="store_true", help="fetch every file afresh, even if cached")
    d.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    r = sub.add_parser("doctor", help="say, offline, whether this machine is ready for the walkthrough",
                       description="One line per check (ok, warn or FAIL): the models cached and complete, the "
                                   "dtype, device and kernels that will run, threads, memory, Jupyter and "
                                   "ipywidgets; exit code 1 if a check failed. Nothing touches the network.")
    r.add_argument("models", nargs="*", metavar="MODEL",
                   help="models that must be ready (default: QWEN_LAB_MODEL; without it, the walkthrough's model, "
                        "only a warning if it is absent)")
    r.add_argument("--model", action="append", default=[], dest="more_models", metavar="MODEL",
                   help="one more model; repeatable")
    r.add_argument("--cache-dir", type=Path, help="the cache to look in (default: HF_HUB_CACHE)")
    r.add_argument("--wheelhouse", type=Path, metavar="DIR",
                   help="also check that pip can install the kit from DIR alone (make wheelhouse builds it)")
    r.add_argument("--verify", action="store_true", help="also hash every cached file (about 1 s per GB)")
    r.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    u = sub.add_parser("tune", help="compile the decode kernels and measure their plans for models, once",
                       description="Compile the C decode kernels and measure, afresh, the fastest plan for each "
                                   "weight shape of the models (reading only their config.json), with THREADS "
                                   "threads, into a cache folder. For a room: fill a shared folder once, on the quiet "
                                   "server, with the learners' thread count; learners read it through "
                                   "QWEN_LAB_SHARED_CACHE instead of each compiling and measuring at once.")
    u.add_argument("models", nargs="+", metavar="MODEL", help="Hub repo ids (in the cache) or local directories")
    u.add_argument("--kernel-cache", type=Path, metavar="DIR",
                   help="the folder to fill (default: this user's own, QWEN_LAB_CACHE or ~/.cache/qwen_lab)")
    u.add_argument("--threads", type=int, metavar="N",
                   help="the threads each learner decodes with (plans are kept per thread count; default: "
                        "QWEN_LAB_THREADS, else the CPUs this process may use)")
    u.add_argument("--cache-dir", type=Path, help="the Hugging Face cache holding the models (default: HF_HUB_CACHE)")
    u.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return p


def _template_var(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE (e.g. enable_thinking=false)")
    if name in ("messages", "tools", "documents", "add_generation_prompt"):
        raise argparse.ArgumentTypeError(f"{name} is set by qwen-lab itself, not by --template-var")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise QwenLabError(f"cannot read {what} file {path}: {e.strerror}") from e
    except (ValueError, RecursionError) as e:
        reason = "it is nested too deeply" if isinstance(e, RecursionError) else e
        raise QwenLabError(f"{what} file {path} is not valid JSON: {reason}") from None


def cmd_template(args) -> None:
    from .chat_template import ChatTemplate
    from .hub import resolve
    messages = _read_json(args.messages, "messages")
    tools = _read_json(args.tools, "tools") if args.tools else None
    template = ChatTemplate.from_files(resolve(args.model, args.revision))
    sys.stdout.write(template.render(messages, add_generation_prompt=not args.no_generation_prompt, tools=tools,
                                     **dict(args.template_var)))


def cmd_download(args) -> int:
    """Each model in turn: its folder on stdout, or one error line on stderr; exit 1 if any failed.

    One line per model: a folder whose name holds a newline (or another character that is not
    printable) is written as the shell would quote it (``errors.shown``)."""
    from .hub import resolve
    failed = 0
    for model in [*args.models, *args.more_models] or [EMBEDDED_MODEL_ID]:
        try:
            files = resolve(model, args.revision, cache_dir=args.cache_dir, force_download=args.force_download,
                            check_cache=True)
        except (QwenLabError, ValueError, OSError) as e:
            if args.debug:
                raise
            print(one_line(f"qwen-lab: error: {e}"), file=sys.stderr)
            failed += 1
        except KeyboardInterrupt:
            print("qwen-lab: error: download interrupted; the files already downloaded are kept: run the "
                  "command again to fetch the rest", file=sys.stderr)
            return 130
        else:
            print(shown(files.root), flush=True)
    return 1 if failed else 0


def cmd_doctor(args) -> int:
    """One line per check on stdout; exit 1 if any failed."""
    from .doctor import run
    checks = run([*args.models, *args.more_models], args.cache_dir, args.wheelhouse, args.verify)
    for check in checks:
        print(check.line(), flush=True)
    return 1 if any(c.status == "FAIL" for c in checks) else 0


def cmd_tune(args) -> int:
    """One line per step on stdout (a warning on stderr); the folder filled, or one error line."""
    from . import kernels
    from .shared_cache import prepare

    def say(line: str) -> None:
        print(one_line(f"qwen-lab: {line}" if line.startswith("warning:") else line),
              file=sys.stderr if line.startswith("warning:") else sys.stdout, flush=True)
    threads = kernels.num_threads() if args.threads is None else args.threads
    prepare(args.kernel_cache or kernels.cache_dir(), args.models, threads, args.cache_dir, say)
    return 0


def cmd_generate(args) -> None:
    from .generation import ChatModel
    chat = ChatModel.load(args.model, dtype=args.dtype, device="cpu" if args.cpu else None, revision=args.revision)
    overrides = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                     repetition_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed,
                     max_new_tokens=args.max_new_tokens, top_logprobs=args.top_logprobs or None)
    if args.temperature is not None and args.temperature > 0:
        overrides["do_sample"] = True
    if args.eos_token:
        ids = []
        for token in args.eos_token:
            token_id = chat.tokenizer.token_to_id(token)
            if token_id is None:
                raise QwenLabError(f"--eos-token {token!r} is not a token of {chat.name}'s vocabulary")
            ids.append(token_id)
        overrides["eos_token_id"] = ids
    if args.ignore_eos:
        overrides["eos_token_id"] = []
    if args.raw:
        prompt = args.prompt
    else:
        prompt = ([{"role": "system", "content": args.system}] if args.system is not None else [])
        prompt.append({"role": "user", "content": args.prompt})

    cancel = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())  # Ctrl-C stops after the current token
    try:
        stream = chat.stream(prompt, cancel=cancel, skip_special_tokens=not args.show_special,
                             template_vars=dict(args.template_var), **overrides)
        shown = 0
        for delta in stream:
            sys.stdout.write(delta)
            sys.stdout.flush()
            shown = _print_choices(chat, stream.choices, shown)
        result = stream.result
        _print_choices(chat, stream.choices, shown)
    finally:
        signal.signal(signal.SIGINT, previous)
    sys.stdout.write("\n")
    if args.stats:  # what ran, too: the figures depend on it
        from . import kernels
        stats = result.stats()
        stats["dtype"] = str(chat.model.lm_head.weight.dtype).removeprefix("torch.")
        stats["matvec"] = "qwen_lab" if kernels.in_use(chat.model) else "torch"
        if kernels.in_use(chat.model):  # which way each weight shape is multiplied here (qwen_lab.tuning)
            from .tuning import describe
            stats["matvec_plans"] = describe(chat.model)
        print(json.dumps(stats), file=sys.stderr)


def _print_choices(chat, choices, shown: int) -> int:
    """One JSON line on stderr per token not yet shown: what was chosen, and the likeliest alternatives."""
    import math

    def entry(token_id, prob):
        return {"token": token_id, "text": chat.tokenizer.decode([token_id]),
                "logprob": round(math.log(prob), 6) if prob > 0 else None}

    for c in choices[shown:]:
        line = {**entry(c.token_id, c.prob), "top": [entry(i, p) for i, p in c.alternatives]}
        print(json.dumps(line, ensure_ascii=False), file=sys.stderr, flush=True)
    return len(choices)


def _fail(message: str) -> int:
    if sys.stderr is not None:
        print(one_line(f"qwen-lab: error: {message}"), file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = {"generate": cmd_generate, "template": cmd_template, "download": cmd_download,
               "doctor": cmd_doctor, "tune": cmd_tune}[args.command]
    if sys.stdout is None:  # started with stdout closed (`>&-`): nowhere to write the result
        return _fail("standard output is closed: there is nowhere to write the result; redirect it to a file")
    try:
        code = command(args)
    except (QwenLabError, ValueError) as e:
        if args.debug:
            raise
        return _fail(str(e))
    except BrokenPipeError:  # `qwen-lab generate ... | head` closed the pipe: not an error
        return 0
    except KeyboardInterrupt:  # Ctrl-C while loading (during generation it stops the reply instead)
        if args.debug:
            raise
        print("qwen-lab: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
