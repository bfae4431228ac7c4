"""Untrusted Jinja, run on a budget of time and memory (the machinery behind ``chat_template``).

A chat template comes from a downloaded repository: it is a program written by a stranger.
Jinja's immutable sandbox keeps it away from Python's internals, but not from the machine's
time and memory: ``{% for i in range(10**5) %}{% for j in range(10**5) %}...`` runs for
minutes, ``{{ 'a' * 10**10 }}`` asks for 10 GB, and ``{{ 9**(9**9) }}`` hangs while the
template *compiles* (Jinja folds constant arithmetic ahead of time). So the template gets
three layers, outermost first:

1. **A worker process.** Templates compile and render in a small ``python -I`` process that
   imports jinja2 and this module, nothing else (no torch: it starts in 0.1-0.2 s, and adds
   0.3-0.5 ms to a render of the Qwen2.5 template, measured on 2 shared cores). The
   parent kills it when a render runs past ``Budget.seconds`` and starts a fresh one for the
   next render; the OS refuses it memory past ``Budget.memory_mib`` (``RLIMIT_AS``, where the
   platform enforces it: Linux). Only this layer really bounds a render: nothing inside a
   process can interrupt a loop over a list or one huge C-level allocation, but a process can
   be killed from outside. One worker serves the whole process, caching compiled templates.
   It is a fresh interpreter started with ``subprocess`` (exec), never a bare ``fork`` of a
   parent that may hold torch's thread pools (a Jupyter kernel), and it exits when the parent
   does (its stdin closes).
2. **Size checks in the sandbox** (``Sandbox``): the operators and functions that multiply a
   size (``'a' * n``, ``x ** n``, ``'%*d'``, ``'{:>n}'.format``, ``center(n)``,
   ``tojson(indent=n)``, ``lipsum(n)``...) refuse, *before* making it, a result longer than
   ``Budget.max_chars``. The usual attacks then get a precise one-line error instead of
   "out of memory", and platforms without ``RLIMIT_AS`` (macOS, Windows) keep a bound on them.
3. **Jinja's immutable sandbox**, made loud: an unsafe attribute raises instead of rendering
   as an empty string.

Every failure reaches the caller as one ``TemplateError`` line.

>>> render("{{ greeting }}, {{ name }}!", {"greeting": "Hello", "name": "world"})
'Hello, world!'
>>> render("{{ 'a' * 10**10 }}", {})  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
qwen_lab.errors.TemplateError: the chat template tried to make a string of ~10,000,000,000 characters, over ...
"""
from __future__ import annotations

import atexit
import json
import math
import os
import queue
import re
import string
import subprocess
import sys
import tempfile
import threading
import time
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jinja2
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import TemplateError

try:
    import resource  # POSIX only: the OS limits of the worker
except ImportError:  # Windows: the deadline and the size checks still hold
    resource = None


@dataclass(frozen=True)
class Budget:
    """What one compile-and-render of an untrusted template may use.

    The defaults are generous for a chat prompt (the Qwen2.5 template renders a 50-message
    conversation in a few milliseconds and a few MB) and small enough to fail fast on a hostile
    one. A genuine template that needs more can be given it: ``ChatTemplate(source,
    budget=Budget(seconds=30))``, or for every template ``sandbox.DEFAULT_BUDGET = Budget(...)``.
    """

    seconds: float = 5.0        #: wall-clock time to compile and render, in the worker
    memory_mib: int = 256       #: memory the worker may take on top of its own (RLIMIT_AS, Linux)
    max_chars: int = 10_000_000  #: longest output, and longest string or list made on the way

    def __post_init__(self) -> None:
        if not (self.seconds > 0 and self.memory_mib > 0 and self.max_chars > 0):
            raise ValueError(f"a template budget must be positive, not {self}")


#: The budget of a ``ChatTemplate`` made without one.
DEFAULT_BUDGET = Budget()

#: Integers past this many digits are refused (Python itself refuses to print past 4300).
MAX_DIGITS = 10_000

#: How deep the data given to a template may nest (deeper: most likely a list containing itself).
MAX_DEPTH = 100


# ---------------------------------------------------------------- layer 3 + 2: the sandbox itself

class BudgetError(jinja2.exceptions.SecurityError):
    """A template asked for a string, list or number over its budget; raised before it is made."""


def _too_big(size: int, what: str, limit: int, unit: str = "characters") -> BudgetError:
    # ``size`` is an estimate from the arguments (the object is never made), hence the ~.
    return BudgetError(f"the chat template tried to make a {what} of ~{size:,} {unit}, over its budget of {limit:,}, "
                       f"and was stopped: it is broken or hostile; do not use this model's template")


class _Namespace(jinja2.utils.Namespace):
    """Jinja's ``namespace()`` minus underscore names, which could reach Python internals."""

    def __init__(*args, **kwargs):  # noqa: N805 - same signature trick as jinja2.utils.Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")


class Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, made loud, with size checks on everything that multiplies a size.

    ``filters`` and ``globals`` add to Jinja's defaults; the known amplifying filters among
    them (``center``, ``indent``, ``tojson``, ``join``...) are wrapped with their size check.
    ``max_chars`` is set per render by the worker.
    """

    # Jinja calls call_binop() for these instead of the operator; it also stops it from folding
    # them into constants at compile time, which is where ``9**9**9`` used to hang.
    intercepted_binops = frozenset(["+", "*", "**", "%"])

    def __init__(self, *, filters: dict | None = None, globals: dict | None = None, **options) -> None:
        super().__init__(**options)
        self.max_chars = DEFAULT_BUDGET.max_chars
        self.filters.update(filters or {})
        self.globals.update(namespace=_Namespace, dict=lambda *a, **k: dict(*a, **k), **(globals or {}))
        self.globals["lipsum"] = self._sized(self.globals["lipsum"], _lipsum_size, "string")
        for name, (size, what) in _FILTER_SIZES.items():
            if name in self.filters:
                self.filters[name] = self._sized(self.filters[name], size, what)

    def unsafe_undefined(self, obj, attribute):
        # The stock sandbox quietly renders {{ x.__class__ }} as ''; a template that tries it is hostile.
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__} object is unsafe")

    def check(self, size: int, what: str) -> None:
        """Refuse to make a ``what`` ("string" or "list") of ``size`` characters or items, if over budget."""
        if size > self.max_chars:
            raise _too_big(size, what, self.max_chars, "characters" if what == "string" else "items")

    def call_binop(self, context, operator, left, right):
        if operator == "**" and _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
            digits = int(right * math.log10(abs(left))) + 1
            if digits > MAX_DIGITS:
                raise _too_big(digits, "number", MAX_DIGITS, "digits")
        elif operator == "*":
            if _is_int(left) and _is_int(right) and left and right:
                digits = int(math.log10(abs(left)) + math.log10(abs(right))) + 1
                if digits > MAX_DIGITS:
                    raise _too_big(digits, "number", MAX_DIGITS, "digits")
            else:
                seq, n = (left, right) if _is_int(right) else (right, left)
                if _is_int(n) and isinstance(seq, (str, list, tuple)):
                    self.check(len(seq) * n, "string" if isinstance(seq, str) else "list")
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            self.check(len(left) + len(right), "string" if isinstance(left, str) else "list")
        elif operator == "%" and isinstance(left, str):
            self.check(_printf_size(left, right), "string")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - names as in the base class
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format in a function
        if isinstance(method, types.BuiltinMethodType) and isinstance(method.__self__, str):
            size = _STR_METHOD_SIZES.get(method.__name__)
            if size is not None:
                args = list(args)
                __self.check(size(method.__self__, args, kwargs), "string")
        return super().call(__context, __obj, *args, **kwargs)

    def _sized(self, function: Callable, size: Callable, what: str) -> Callable:
        """``function`` (a filter or global) refusing calls whose result ``size`` says is too long.

        ``size(args, kwargs, limit)`` estimates the result's length from the arguments (it may stop
        counting past ``limit``); ``args`` leaves out what Jinja passes first to some filters.
        """
        passes_context = hasattr(function, "jinja_pass_arg")  # @pass_environment etc: args[0] is Jinja's

        def sized(*args, **kwargs):
            args = list(args)
            user = args[1:] if passes_context else args
            self.check(size(user, kwargs, self.max_chars), what)
            args[1 if passes_context else 0:] = user  # size() may have turned an iterator into a list
            return function(*args, **kwargs)

        sized.__dict__.update(function.__dict__)  # keeps jinja_pass_arg: Jinja passes what it passed
        sized.__name__ = getattr(function, "__name__", "sized")
        return sized


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int(x, default: int = 0) -> int:
    return x if _is_int(x) else default


def _str_len(x) -> int:
    return len(x) if isinstance(x, str) else 0


def _arg(args: list, kwargs: dict, index: int, name: str, default=None):
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _number(digits: str) -> int:
    return int(digits) if len(digits) < 19 else 10**18


_PRINTF_FIELD = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _printf_size(fmt: str, values) -> int:
    """An upper bound of the padding ``fmt % values`` adds (widths, precisions, ``*`` arguments)."""
    size, stars = len(fmt), False
    for match in _PRINTF_FIELD.finditer(fmt):
        for group in match.groups():
            if group == "*":
                stars = True
            elif group:
                size += _number(group)
    if stars:
        values = values if isinstance(values, (tuple, list)) else [values]
        size += sum(abs(v) for v in values if _is_int(v))
    return size


def _format_size(fmt: str, args, kwargs) -> int:
    """The same for ``str.format``: widths written in the format spec, or taken from the arguments."""
    size = len(fmt)
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return size  # malformed: format() itself will say so
    for _, _, spec, _ in fields:
        if not spec:
            continue
        size += sum(_number(d) for d in re.findall(r"\d+", spec))
        if "{" in spec:  # nested field: the width is an argument
            values = list(args) + list(kwargs.values())
            if len(values) == 1 and isinstance(values[0], dict):  # format_map
                values = list(values[0].values())
            size += sum(abs(v) for v in values if _is_int(v))
    return size


def _replace_size(s: str, old, new, count) -> int:
    if not isinstance(old, str) or not isinstance(new, str):
        return len(s)
    hits = len(s) + 1 if old == "" else s.count(old)
    if _is_int(count) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(len(new) - len(old), 0)


def _join_size(separator, args: list) -> int:
    if not args:
        return 0
    if not isinstance(args[0], (str, list, tuple, dict)):
        args[0] = list(args[0])  # an iterator: read once, here, and passed on as a list
    items = args[0]
    return sum(_str_len(x) for x in items) + max(len(items) - 1, 0) * _str_len(separator)


def _translate_size(s: str, table) -> int:
    longest = max((_str_len(v) for v in table.values()), default=1) if isinstance(table, dict) else 1
    return len(s) * max(longest, 1)


def _width(s: str, width) -> int:
    return max(len(s), _int(width))


# str methods reachable from a template that can make a string longer than their inputs:
# name -> size(the string, args, kwargs).
_STR_METHOD_SIZES = {
    "center": lambda s, a, k: _width(s, _arg(a, k, 0, "width")),
    "ljust": lambda s, a, k: _width(s, _arg(a, k, 0, "width")),
    "rjust": lambda s, a, k: _width(s, _arg(a, k, 0, "width")),
    "zfill": lambda s, a, k: _width(s, _arg(a, k, 0, "width")),
    "expandtabs": lambda s, a, k: len(s) + s.count("\t") * max(_int(_arg(a, k, 0, "tabsize", 8)), 0),
    "replace": lambda s, a, k: _replace_size(s, _arg(a, k, 0, "old"), _arg(a, k, 1, "new"), _arg(a, k, 2, "count")),
    "join": lambda s, a, k: _join_size(s, a),
    "translate": lambda s, a, k: _translate_size(s, _arg(a, k, 0, "table")),
    "format": lambda s, a, k: _format_size(s, a, k),
    "format_map": lambda s, a, k: _format_size(s, a, k),
}


def _text(x) -> str:
    """``x`` if it is a string; other values are sized by their arguments only (str() could be huge)."""
    return x if isinstance(x, str) else ""


def _indent_size(a, k, limit) -> int:
    s, width = _text(_arg(a, k, 0, "s")), _arg(a, k, 1, "width", 4)
    per_line = len(width) if isinstance(width, str) else max(_int(width), 0)
    return len(s) + (s.count("\n") + 1) * per_line


def _wordwrap_size(a, k, limit) -> int:
    s, width = _text(_arg(a, k, 0, "s")), max(_int(_arg(a, k, 1, "width", 79)), 1)
    wrapstring = _arg(a, k, 3, "wrapstring") or "\n"
    lines = len(s.split()) + len(s) // width + s.count("\n") + 1
    return len(s) + lines * _str_len(wrapstring)


def _tojson_size(a, k, limit) -> int:
    indent = _arg(a, k, 2, "indent")
    indent = len(indent) if isinstance(indent, str) else max(_int(indent), 0)
    separators = _arg(a, k, 3, "separators") or (", ", ": ")
    per_item = sum(_str_len(x) for x in separators) if isinstance(separators, (list, tuple)) else 0
    return _json_size(_arg(a, k, 0, "value"), indent, per_item, limit)


def _json_size(value, indent: int, per_item: int, limit: int) -> int:
    """About how long ``json.dumps(value, indent=indent)`` is; stops counting past ``limit``.

    Walks the value without recursion, so shared references (``[[x] * 1000] * 1000``) count as
    what they expand to, and nesting cannot overflow the stack here.
    """
    size, stack = 0, [(value, 0)]
    while stack and size <= limit:
        value, depth = stack.pop()
        size += 1 + indent * depth + per_item + 2  # newline, indentation, separator, quotes/brackets
        if isinstance(value, str):
            size += len(value)
        elif isinstance(value, dict):
            size += sum(_str_len(key) + 2 for key in value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1) for v in value)
        else:
            size += 24
    return size


def _lipsum_size(a, k, limit) -> int:
    n, maximum = _int(_arg(a, k, 0, "n", 5)), _int(_arg(a, k, 3, "max", 100))
    return max(n, 0) * max(maximum, 0) * 12  # words of up to 11 letters, and a space


def _replace_filter_size(a, k, limit) -> int:
    return _replace_size(_text(_arg(a, k, 0, "s")), _arg(a, k, 1, "old"), _arg(a, k, 2, "new"), _arg(a, k, 3, "count"))


# Filters that can make a result longer than their inputs: name -> (size(args, kwargs, limit), what).
_FILTER_SIZES = {
    "center": (lambda a, k, limit: _int(_arg(a, k, 1, "width", 80)), "string"),
    "indent": (_indent_size, "string"),
    "wordwrap": (_wordwrap_size, "string"),
    "tojson": (_tojson_size, "string"),
    "replace": (_replace_filter_size, "string"),
    "join": (lambda a, k, limit: _join_size(_arg(a, k, 1, "d", ""), a), "string"),
    "format": (lambda a, k, limit: _printf_size(_text(_arg(a, k, 0, "value")), a[1:] or k), "string"),
    "batch": (lambda a, k, limit: _int(_arg(a, k, 1, "linecount")), "list"),
    "slice": (lambda a, k, limit: _int(_arg(a, k, 1, "slices")), "list"),
}


# ---------------------------------------------------------------- layer 1: the worker process
# The parent sends one JSON line per render: {"source", "context", "seconds", "memory_mib",
# "max_chars"}; the worker answers one JSON line, {"text": ...} or {"error": ...}, with "exit": true
# when it ends after this reply (after running out of memory, or grown by a budget's worth).
# JSON both ways: the worker runs hostile code, so nothing it sends is ever unpickled.

_START_TIMEOUT = 60.0  # seconds for the worker to start (imports on a cold, busy machine)
_CACHE_SIZE = 16  # compiled templates the worker keeps


def render(source: str, context: dict, budget: Budget | None = None,
           environment: Callable[[], Sandbox] = Sandbox) -> str:
    """Compile ``source`` in the environment ``environment()`` makes and render it with ``context``.

    Runs in the worker process, under ``budget`` (``DEFAULT_BUDGET`` if None). ``context`` must
    be JSON data; ``environment`` a module-level function (the worker imports it by name).
    """
    budget = budget or DEFAULT_BUDGET
    try:
        request = json.dumps({"source": source, "context": context, "seconds": budget.seconds,
                              "memory_mib": budget.memory_mib, "max_chars": budget.max_chars}).encode()
    except (TypeError, ValueError, RecursionError) as e:
        raise TemplateError(f"the template's input cannot be passed to the sandbox: {e}") from e
    factory = f"{environment.__module__}:{environment.__qualname__}"
    with _lock:
        for _ in range(2):  # a second try if the worker was gone (killed from outside while idle)
            worker = _workers.get(factory)
            if worker is None or worker.process.poll() is not None:
                _workers[factory] = worker = _Worker(factory)
            reply = worker.ask(request, budget)
            if reply is not None:
                break
        else:
            raise TemplateError("the chat template's worker process keeps exiting before it reads a request")
    if isinstance(reply.get("text"), str):
        return reply["text"]
    raise TemplateError(str(reply.get("error", "the chat template's worker sent a malformed reply")))


_lock = threading.Lock()  # one render at a time per process: a worker serves one request at a time
_workers: dict[str, "_Worker"] = {}  # environment factory -> its worker


@atexit.register
def _close_workers() -> None:
    for worker in list(_workers.values()):
        worker.close(kill=False)
    _workers.clear()


def _forget_workers() -> None:
    """In a forked child: the parent's workers (and maybe a held lock) are the parent's."""
    global _lock, _workers
    _lock, _workers = threading.Lock(), {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)


# The package's __init__ imports torch; the worker must not. It registers an empty `qwen_lab`
# package, so `qwen_lab.sandbox` and the environment's module import alone.
_BOOT = ("import json, sys, types; package = types.ModuleType('qwen_lab'); package.__path__ = [sys.argv[1]]; "
         "sys.modules['qwen_lab'] = package; sys.path[:0] = json.loads(sys.argv[3]); "
         "from qwen_lab.sandbox import serve; serve(sys.argv[2])")


class _Worker:
    """The parent's handle on one worker process."""

    def __init__(self, factory: str) -> None:
        self.stderr = tempfile.TemporaryFile()  # read only to explain a worker that would not start
        path = [p for p in sys.path if p and os.path.isdir(p)]  # `-I`: the parent's path, not the cwd
        started = time.perf_counter()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOT, str(Path(__file__).parent), factory, json.dumps(path)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                start_new_session=os.name == "posix")  # Ctrl-C in a terminal is the parent's, not the worker's
        except OSError as e:
            raise TemplateError(f"cannot start the chat template's worker process ({sys.executable}): "
                                f"{e.strerror or e}") from e
        self.lines: queue.Queue = queue.Queue()
        self.line_limit = 1 << 20  # a reply line longer than this is a protocol error (a compromised worker)
        threading.Thread(target=self._read, name="qwen-lab-template-worker", daemon=True).start()
        try:
            ready = self._receive(_START_TIMEOUT)
        except queue.Empty:
            ready = None
        except BaseException:
            self.close()
            raise
        if ready is None or not ready.get("ready"):
            self.close()
            raise TemplateError(f"cannot start the chat template's worker process: {self._stderr_tail()}")
        #: seconds from Popen to ready (reported by benchmarks and tests)
        self.start_seconds = time.perf_counter() - started

    def _read(self) -> None:
        try:
            for line in iter(lambda: self.process.stdout.readline(self.line_limit), b""):
                self.lines.put(line)
        finally:
            self.lines.put(None)

    def _receive(self, timeout: float) -> dict | None:
        """The next reply; None if the worker died; raises queue.Empty when ``timeout`` passes."""
        line = self.lines.get(timeout=timeout)
        if line is None or not line.endswith(b"\n"):
            return None
        try:
            reply = json.loads(line)
        except ValueError:
            return None
        return reply if isinstance(reply, dict) else None

    def ask(self, request: bytes, budget: Budget) -> dict | None:
        """The worker's reply to ``request``; None if the worker was gone before it could read it."""
        # A \ud83c\udf1e escape is 12 bytes for one character of output.
        self.line_limit = max(self.line_limit, 13 * budget.max_chars + 4096)
        try:
            self.process.stdin.write(request + b"\n")
            self.process.stdin.flush()
        except OSError:
            self.close()
            return None
        except BaseException:  # Ctrl-C half-way through a request: the worker's state is unknown
            self.close()
            raise
        try:
            reply = self._receive(budget.seconds)
        except queue.Empty:
            self.close()
            raise TemplateError(
                f"the chat template used more than {budget.seconds:g} s and was stopped: it is broken or hostile; "
                f"do not use this model's template (a genuine one can be given more: Budget(seconds=...))") from None
        except BaseException:  # Ctrl-C while waiting: the worker's state is unknown
            self.close()
            raise
        if reply is None:
            status = self.close()
            raise TemplateError(
                f"the chat template's worker process died (exit status {status}) while rendering: the template is "
                f"broken or hostile, or used more than {budget.memory_mib} MiB; do not use this model's template")
        if reply.get("exit"):  # the worker ends after this reply; the next render starts another
            self.close()
        return reply

    def close(self, kill: bool = True) -> int | None:
        """Stop the worker (killed, or asked to by closing its stdin) and return its exit status."""
        try:
            if kill:
                self.process.kill()
            self.process.stdin.close()
            self.process.wait(timeout=1)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        self.stderr.close()
        return self.process.returncode

    def _stderr_tail(self) -> str:
        try:
            self.stderr.seek(0)
            lines = self.stderr.read().decode(errors="replace").strip().splitlines()
        except (OSError, ValueError):
            lines = []
        return lines[-1] if lines else f"it exited with status {self.process.poll()}"


# ---------------------------------------------------------------- inside the worker

def serve(factory: str) -> None:
    """The worker's loop: read a request line, compile (cached) and render, answer a line.

    ``factory`` names the function making the environment, as ``module:function``.
    """
    import importlib
    module, name = factory.split(":")
    environment = getattr(importlib.import_module(module), name)()
    compiled: dict[str, jinja2.Template] = {}
    if resource is not None:  # a worker killed for CPU time leaves no core file behind
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but replies on the protocol's pipe

    def send(reply: dict) -> None:
        out.write(json.dumps(reply).encode() + b"\n")  # ensure_ascii: even lone surrogates pass
        out.flush()

    send({"ready": True})
    start = _address_space()
    for line in sys.stdin.buffer:
        request = json.loads(line)
        reply = _serve_one(environment, compiled, request)
        now = _address_space()
        if start is not None and now is not None and now > start + request["memory_mib"] * 2**20:
            reply["exit"] = True  # grown by a budget (cache, fragments): the limit is relative, so make way
        send(reply)
        if reply.get("exit"):
            return


def _serve_one(environment: Sandbox, compiled: dict, request: dict) -> dict:
    source, budget = request["source"], Budget(request["seconds"], request["memory_mib"], request["max_chars"])
    environment.max_chars = budget.max_chars
    doing = "cannot be compiled"
    try:
        with _os_limits(budget):
            template = compiled.get(source)
            if template is None:
                template = environment.from_string(source)
                if len(compiled) >= _CACHE_SIZE:
                    compiled.pop(next(iter(compiled)))
                compiled[source] = template
            doing = "failed on these messages"
            text = _generate(template, request["context"], budget.max_chars)
    except MemoryError:
        return {"exit": True, "error": (
            f"the chat template used more than {budget.memory_mib} MiB of memory and was stopped: it is broken or "
            f"hostile; do not use this model's template (a genuine one can be given more: Budget(memory_mib=...))")}
    except BudgetError as e:
        return {"error": _one_line(str(e))}
    except jinja2.TemplateSyntaxError as e:
        return {"error": _one_line(f"the chat template has a syntax error at line {e.lineno}: {e.message}")}
    except jinja2.exceptions.SecurityError as e:
        return {"error": _one_line(f"the chat template tried something the sandbox forbids ({e}) and was stopped; "
                                   f"do not use this model's template")}
    except jinja2.TemplateError as e:  # raise_exception('...') and undefined names
        return {"error": _one_line(f"the chat template refused these messages: {e}")}
    except RecursionError:
        return {"error": "the chat template recursed too deeply (through macros or deeply nested data) and was "
                         "stopped: it is broken or hostile; do not use this model's template"}
    except Exception as e:  # a bug in the template (e.g. 'str' + None) surfaces as a Python error
        return {"error": _one_line(f"the chat template {doing}: {type(e).__name__}: {e}")}
    return {"text": text}


def _generate(template: jinja2.Template, context: dict, max_chars: int) -> str:
    """Render piece by piece, checking the output cap as the output grows."""
    parts, size = [], 0
    for piece in template.generate(**context):
        size += len(piece)
        if size > max_chars:
            raise BudgetError(f"the chat template produced over {max_chars:,} characters and was stopped: "
                              f"it is broken or hostile; do not use this model's template")
        parts.append(piece)
    return "".join(parts)


def _one_line(message: str, limit: int = 500) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[:limit] + "…"


@contextmanager
def _os_limits(budget: Budget):
    """The OS's own bounds on this process for one render: memory (address space) and CPU time.

    The address space may grow by ``memory_mib`` over what the worker holds now. The CPU limit
    is a backstop for a worker whose parent died mid-render: the parent's deadline comes first.
    """
    if resource is None:
        yield
        return
    saved = []
    address_space = _address_space()
    if address_space is not None:
        saved.append(_lower(resource.RLIMIT_AS, address_space + budget.memory_mib * 2**20))
    saved.append(_lower(resource.RLIMIT_CPU, int(time.process_time() + budget.seconds) + 2))
    try:
        yield
    finally:
        for limit, previous in saved:
            if limit is not None:
                resource.setrlimit(limit, previous)


def _lower(limit: int, soft: int) -> tuple[int | None, Any]:
    previous = resource.getrlimit(limit)
    hard = previous[1]
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    try:
        resource.setrlimit(limit, (soft, hard))
    except (ValueError, OSError):  # not supported here (macOS and RLIMIT_AS): the other layers remain
        return None, previous
    return limit, previous


def _address_space() -> int | None:
    """This process's virtual memory size in bytes (Linux), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None
