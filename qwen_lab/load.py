"""Step 2 — load: config.json -> architecture -> weights, without wasting memory.

1. ``config.json``'s ``architectures`` picks the implementation from
   ``ARCHITECTURES`` (the seed: "look at ``architectures`` to choose the model");
   every value the model needs is checked, with its field named, before anything is built.
2. The model is built on PyTorch's *meta* device: shapes only, no memory, no
   random initialisation that the checkpoint would overwrite anyway.
3. Each tensor of the ``.safetensors`` files is a view on a memory map of the
   file: nothing is read until it is used, and when the file's dtype is the one
   asked for, no byte is copied at all — and every process that loads the same
   file shares the same pages of memory. Weights are asked for in 2 MiB pages
   where the system allows it (``pages.huge_pages``): decoding streams every weight once
   a token, and memory read in 4 KiB pages is slower.
4. The model owns what is not in the file: which weights are tied, the rotary
   frequencies (``tie_weights``, ``reset_buffers``); loading asks it, so the same code
   loads every architecture.
5. ``qwen_lab.runtime.convert_for_runtime`` then swaps in this machine's faster
   twins of some layers (the C decode kernels on a CPU), in one explicit step.

>>> from qwen_lab.hub import resolve
>>> model = load_model(resolve("qwen-lab/tiny-chat"))
>>> type(model).__name__
'Qwen2ForCausalLM'
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import mmap
import os
import struct
import weakref
from pathlib import Path

import torch
from torch import nn

from . import runtime
from .architectures import ARCHITECTURES
from .errors import CheckpointError, SettingError, UnsupportedArchitectureError
from .hub import ModelFiles, open_regular, read_json_object
from .kernels import native_bf16  # noqa: F401  (re-exported: notebook 2 asks what the CPU does well)
from .layers import CausalLM
from .pages import HUGE_PAGE, advise_huge, huge_copy, huge_pages

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MATVECS = runtime.MATVECS

# safetensors dtype tags -> torch dtypes (the ones a language model checkpoint uses)
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
#: A safetensors header larger than this is not a language model's (Qwen2.5-1.5B's is 30 kB).
MAX_HEADER_BYTES = 100_000_000


def read_config(path: str | Path) -> dict:
    return read_json_object(path, "the model's configuration")


def architecture_of(config: dict) -> str:
    """The supported architecture ``config.json`` names, or a clear error listing the supported ones."""
    names = config.get("architectures") or []
    if isinstance(names, str):  # a hand-written config may give one name instead of a list
        names = [names]
    if not isinstance(names, list):
        raise CheckpointError(f"config.json: architectures must be a list of names, not {names!r}")
    for name in names:
        if isinstance(name, str) and name in ARCHITECTURES:
            return name
    supported = ", ".join(sorted(ARCHITECTURES))
    shown = _short(", ".join(map(str, names)), quote=False) if names else "no architecture"
    raise UnsupportedArchitectureError(f"config.json names {shown}; qwen_lab supports {supported}")


def build_model(config: dict, device: str | torch.device = "meta") -> CausalLM:
    """The model ``config`` describes, on ``device`` (``meta``: shapes only, no memory)."""
    model_cls = ARCHITECTURES[architecture_of(config)]
    cfg = model_cls.config_class.from_dict(config)  # validates every field first
    with torch.device(device):
        return model_cls(cfg)


def checkpoint_dtype(config: dict) -> torch.dtype | None:
    """The dtype ``config.json`` says the weights were saved in (``torch_dtype``, or ``dtype``)."""
    name = config.get("torch_dtype") or config.get("dtype")
    return DTYPES.get(name) if isinstance(name, str) else None


def choose_dtype(dtype: str | torch.dtype, device: torch.device, saved: torch.dtype | None = None) -> torch.dtype:
    """The dtype to compute in. ``auto``:

    * on CUDA, bfloat16 where the GPU computes it natively (compute capability 8.0 and up:
      A100, H100, RTX 30xx...), as the seed's Candle code does; float16 on older GPUs
      (Colab's T4), which emulate bf16;
    * on a CPU, the dtype the weights were ``saved`` in when it is bfloat16 or float32. A
      bf16 checkpoint then stays the file's own bytes, memory-mapped: no conversion, half
      the memory of float32, and the same pages shared by every process that loads it (30
      learners on one server hold one copy). Decoding streams half the bytes per token. On
      CPUs without bf16 instructions, prompts are computed in float32 from the bf16 weights
      one matrix at a time (``kernels.Linear``), as fast as a float32 model
      (``benchmarks/RESULTS.md``). float16 and unknown checkpoints load as float32.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
        return saved if saved in (torch.bfloat16, torch.float32) else torch.float32
    if dtype not in DTYPES:
        raise SettingError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def suggested_dtype(model: str) -> str:
    """The dtype the notebooks and the panel load ``model`` in.

    ``float32`` for the embedded tiny-chat: 8 MB either way, and float32 gives the same
    outputs on every CPU, so a notebook's saved outputs match what a learner's machine prints
    (bf16 rounds differently with and without bf16 instructions). ``auto`` for a real model:
    its bf16 file stays mapped and shared between learners (``choose_dtype``), where float32
    would be a private copy twice its size in every kernel (6 GB for Qwen2.5-1.5B).

    >>> suggested_dtype("qwen-lab/tiny-chat"), suggested_dtype("Qwen/Qwen2.5-1.5B-Instruct")
    ('float32', 'auto')
    """
    from .hub import EMBEDDED_MODEL_ID
    return "float32" if str(model) == EMBEDDED_MODEL_ID else "auto"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(device: str | torch.device | None) -> torch.device:
    """``None``: CUDA when there is a GPU, else the CPU; a name is checked against this machine."""
    if device is None:
        return default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise SettingError(f"device {device!r} is not a device name such as 'cpu', 'cuda' or 'cuda:1'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingError("device 'cuda' was asked for but this machine has no usable CUDA GPU: use 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SettingError(f"device {str(device)!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise SettingError(f"device {str(device)!r}: qwen_lab runs on 'cpu' or 'cuda'")
    return device


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` file, as views on a memory map.

    The format: 8 bytes little-endian header length N, N bytes of JSON
    ``{name: {dtype, shape, data_offsets: [begin, end]}}``, then the raw data.
    The map is copy-on-write, so a tensor can even be modified in place
    without touching the file.
    """
    return _map_safetensors(path)[0]


def read_safetensors_header(path: str | Path) -> dict:
    """The JSON header of a ``.safetensors`` file, reading nothing else: 8 bytes, then the header.

    Each tensor's ``dtype``, ``shape`` and ``data_offsets`` (its byte range after the header),
    and the file's ``__metadata__``. Reading the whole file to look at its table of contents
    would load every weight: 3 GB for Qwen2.5-1.5B, whose header is 30 kB. The header is
    checked as loading checks it (its length fits the file and the budget, it is a JSON
    object), with the same one-line ``CheckpointError``; the entries are checked at load.

    >>> from qwen_lab.hub import resolve
    >>> header = read_safetensors_header(resolve("qwen-lab/tiny-chat").weights[0])
    >>> header["__metadata__"], header["model.norm.weight"]
    ({'format': 'pt'}, {'dtype': 'BF16', 'shape': [192], 'data_offsets': [4036608, 4036992]})
    """
    path = Path(path)
    try:
        with open_regular(path) as f:
            return _read_header(f, path, os.fstat(f.fileno()).st_size)[0]
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e


def _read_header(f, path: Path, size: int) -> tuple[dict, int]:
    """The header of the open safetensors file ``f`` (of ``size`` bytes), and its length."""
    if size < 8:
        raise CheckpointError(f"{path} is truncated ({size} bytes): download it again")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > size - 8 or n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path} is truncated or not a safetensors file (its header cannot fit in "
                              f"{size:,} bytes): download it again")
    try:
        header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{path} has a corrupt header (not valid JSON): download it again") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt header (not a JSON object): download it again")
    return header, n


class WeightFile:
    """A file whose memory map a model's weights view (a file loaded in its own dtype on a CPU: no copy).

    Those weights are read from the file's pages for as long as the model lives, and the pages are the
    file's: rewritten in place meanwhile (``cp new.safetensors model.safetensors`` first cuts the file to
    nothing), the next read of a weight killed the process (SIGBUS: "the kernel died", nothing said).
    So the file stays open (``fd``; closed with this object) and ``check_weight_files`` compares what
    ``fstat`` says of it now with what it said at the load (``size``, ``mtime_ns``). ``span``: the
    addresses of its mapping. (A rewrite that lands during a token's own reads still kills the process:
    the check leaves that window of one token, and a model's own forward, outside ``generation``, unchecked.)
    """

    __slots__ = ("path", "fd", "size", "mtime_ns", "span", "__weakref__")

    def __init__(self, path: Path, fd: int) -> None:
        weakref.finalize(self, os.close, fd)
        st = os.fstat(fd)
        self.path, self.fd, self.size, self.mtime_ns, self.span = path, fd, st.st_size, st.st_mtime_ns, (0, 0)

    def viewed_by(self, model: nn.Module) -> bool:
        lo, hi = self.span
        return any(lo <= p.data_ptr() < hi for p in model.parameters())

    def __reduce__(self):  # a copy of the model (copy.deepcopy, pickle) copies its weights: nothing to watch
        return _unwatched, (self.path,)


def _unwatched(path: Path) -> WeightFile:
    """A ``WeightFile`` that watches nothing (``fd`` None): a copied model's, whose weights are its own."""
    f = WeightFile.__new__(WeightFile)
    f.path, f.fd, f.size, f.mtime_ns, f.span = path, None, 0, 0, (0, 0)
    return f


def _changed_weight_file(model: nn.Module) -> tuple[WeightFile, os.stat_result | OSError] | None:
    """The first file the model's weights are read from that changed on disk since the load, and its ``fstat``
    (or the error ``fstat`` raised: a file on NFS removed or replaced on the server answers ESTALE, and its
    pages can no more be read than a truncated file's)."""
    for f in model.__dict__.get("_weight_files", ()):
        if f.fd is None:
            continue
        try:
            now = os.fstat(f.fd)
        except OSError as e:
            if f.viewed_by(model):
                return f, e
            continue
        if (now.st_size, now.st_mtime_ns) != (f.size, f.mtime_ns) and f.viewed_by(model):
            return f, now
    return None


def weight_files_changed(model: nn.Module) -> bool:
    """Whether ``check_weight_files(model)`` would refuse: a loader that keeps its models (``ChatPanel.load``)
    asks, so that loading the model again, as the refusal says, loads it anew rather than giving it back."""
    return _changed_weight_file(model) is not None


def check_weight_files(model: nn.Module) -> None:
    """One line (``CheckpointError``) where a file the model's weights are read from changed on disk since the
    load (``WeightFile``): reading them could kill the process. ``generation`` asks before the prompt and
    before every token; a few microseconds."""
    changed = _changed_weight_file(model)
    if changed is not None:
        f, now = changed
        if isinstance(now, OSError):
            raise CheckpointError(f"{f.path} can no longer be read from ({now.strerror or now}: removed or replaced "
                                  f"since the model was loaded from it?), and its weights are read from that file: "
                                  f"load the model again") from now
        what = f"{now.st_size:,} bytes now, {f.size:,} then" if now.st_size != f.size else \
            f"the same {f.size:,} bytes, modified since"
        raise CheckpointError(f"{f.path} was changed on disk after the model was loaded from it ({what}), "
                              f"and its weights are read from that file: load the model again (to update a "
                              f"model folder in use, copy each new file in under another name and rename it "
                              f"into place)")


def _map_safetensors(path: str | Path, keep: bool = False
                     ) -> tuple[dict[str, torch.Tensor], tuple[int, int], WeightFile | None]:
    """The tensors, the address range of the mapping they view, and (``keep``) the file kept open as a
    ``WeightFile``. Nothing of a file that is not a valid safetensors file is shown in an error (it might
    not be a model file at all)."""
    path = Path(path)
    try:
        with open_regular(path) as f:  # a pipe would block the open forever
            size = os.fstat(f.fileno()).st_size
            header, n = _read_header(f, path, size)
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            kept = WeightFile(path, os.dup(f.fileno())) if keep else None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    advise_huge(mm, 0, len(mm))  # the file's pages, as read from disk, in 2 MiB pieces (still shared)
    header.pop("__metadata__", None)
    tensors, data_start, spans = {}, 8 + n, []
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm)) if size else 0
    if kept is not None:
        kept.span = (base, base + size)
    for name, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape, (begin, end) = _whole_numbers(info["shape"]), _whole_numbers(info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: entry {_short(name)} is corrupt or of an unsupported dtype "
                                  f"({_short(str(e), quote=False)})") from None
        if any(d < 0 for d in shape):
            raise CheckpointError(f"{path}: tensor {_short(name)} has a negative dimension {_short(shape)}: "
                                  f"file is corrupt")
        count = 1
        for d in shape:
            count *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != count * itemsize or begin < 0:
            raise CheckpointError(f"{path}: tensor {_short(name)} has {end - begin} bytes for shape {_short(shape)}: "
                                  f"file is corrupt")
        if data_start + end > size:
            raise CheckpointError(f"{path} is truncated: tensor {_short(name)} ends at byte {data_start + end:,} "
                                  f"of a {size:,}-byte file; download it again")
        spans.append((begin, end, name))
        if count == 0:
            try:
                tensors[name] = torch.empty(shape, dtype=dtype)
            except RuntimeError:  # no bytes, yet strides torch cannot count: [0, 2**62, 2**62]
                raise CheckpointError(f"{path}: tensor {_short(name)} has the shape {_short(shape)}, which no "
                                      f"model has: file is corrupt") from None
        elif (data_start + begin) % itemsize:  # unaligned data: torch cannot view it, so copy
            raw = bytes(mm[data_start + begin:data_start + end])
            tensors[name] = torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)
        else:
            tensors[name] = torch.frombuffer(mm, dtype=dtype, count=count, offset=data_start + begin).reshape(shape)
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:  # two names for the same bytes: a crafted or damaged file
            raise CheckpointError(f"{path}: tensors {_short(first)} and {_short(second)} overlap in the file: "
                                  f"file is corrupt")
    return tensors, (base, base + size), kept


def _short(value, limit: int = 100, quote: bool = True) -> str:
    """``value`` for an error message (its ``repr``, or as is with ``quote=False``), cut to ``limit``
    characters: a hostile file's names and shapes can be megabytes long, and a message is one line."""
    text = repr(value) if quote else str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _whole_numbers(values) -> list[int]:
    if not isinstance(values, list) or not all(type(v) is int for v in values):
        raise ValueError(f"expected a list of whole numbers, got {str(values)[:40]}")
    return values


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True) if hasattr(mmap, "MADV_DONTNEED") else None

#: madvise's "fault these pages in as a read would" (Linux 5.14), which fails where a read would raise SIGBUS
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


def cached_in_huge_pages(path: str | Path) -> tuple[int, int] | None:
    """How the page cache holds a weights file now: ``(bytes in memory, of them in 2 MiB pieces)``.

    A file is cached in the pieces it was written or read in, and a mapping gets pages no larger
    than those pieces, advised or not, until the system drops them. ``tar -xf`` and copies write in
    small pieces: a 512 MiB file mapped right after its extraction got 0 MiB in 2 MiB pages here
    (Linux 6.18, ext4), 512 MiB once dropped and read afresh; huggingface_hub writes a download 10
    MiB at a time, and 514 of a 515 MiB download's MiB got 2 MiB pages (the tail is under 2 MiB).

    Counted over the file's 2 MiB blocks that are wholly in memory (``mincore``), nothing read
    from disk: the file is mapped as ``read_safetensors`` maps it, each such block is faulted in as a
    read would (``MADV_POPULATE_READ``), and ``/proc/self/smaps`` says how much maps in 2 MiB pages
    (``FilePmdMapped``). ``None`` where it cannot be told (huge pages off, no ``mincore``, a mapping
    not 2 MiB-aligned, the file truncated while looked at: a read would have killed the process).
    """
    if _libc is None or not huge_pages():
        return None
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size < HUGE_PAGE:
            return 0, 0
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        start, per_block = ctypes.addressof(ctypes.c_char.from_buffer(mm)), HUGE_PAGE // mmap.PAGESIZE
        resident = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
        if start % HUGE_PAGE or _libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(size), resident):
            return None
        resident, whole = bytes(resident), b"\x01" * per_block
        blocks = [b for b in range(size // HUGE_PAGE) if resident[b * per_block:(b + 1) * per_block] == whole]
        advise_huge(mm, 0, size)
        for b in blocks:  # in memory already: mapped, in a 2 MiB page where the cache holds it so
            try:  # asked of the kernel, which says EFAULT where a read would raise SIGBUS: the file shrank since
                mm.madvise(MADV_POPULATE_READ, b * HUGE_PAGE, HUGE_PAGE)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    return None  # truncated while looked at: what it holds cannot be told
                mm[b * HUGE_PAGE]  # a kernel before 5.14: read a byte
        return len(blocks) * HUGE_PAGE, _smaps_kib(start, "FilePmdMapped") * 1024
    finally:
        mm.close()


def _smaps_kib(address: int, field: str) -> int:
    """A ``kB`` field of this process's mapping starting at ``address`` (``/proc/self/smaps``)."""
    found = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            found = int(head.split("-")[0], 16) == address
        elif found and head == field + ":":
            return int(line.split()[1])
    return 0


def _release(view: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """Tell the kernel the mapped pages under ``view`` are no longer needed.

    Once a tensor has been converted (bf16 file -> f32 model), its bytes in
    the file's mapping are dead weight in memory; dropping them keeps peak
    memory near the converted weights instead of weights + file. The mapping
    is private and unmodified, so a page touched again is simply re-read.
    """
    first, last = view.data_ptr(), view.data_ptr() + view.numel() * view.element_size()
    if _libc is None or not any(lo <= first and last <= hi for lo, hi in mapped):
        return  # not a view on a file mapping (e.g. an unaligned tensor that was copied)
    page = mmap.PAGESIZE
    start = -(-first // page) * page
    end = last // page * page
    if end > start:
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


def load_weights(model: CausalLM, files: list[Path], dtype: torch.dtype, device: torch.device,
                 declared: torch.dtype | None = None) -> None:
    """Put the checkpoint's tensors into a meta-device ``model``, checking names, shapes and dtypes.

    The model says which of its parameters are tied (``tied_weights``): a checkpoint may
    store those once or twice. What is not in the checkpoint, the model rebuilds itself
    (``tie_weights``, ``reset_buffers``). ``declared`` is the dtype config.json names.
    """
    expected = dict(model.named_parameters())  # tied parameters appear once
    aliases = model.tied_weights()
    tensors: dict[str, torch.Tensor] = {}
    shard_of: dict[str, Path] = {}
    mapped, kept = [], []
    for f in files:
        file_tensors, address_range, weight_file = _map_safetensors(f, keep=True)
        kept.append(weight_file)
        twice = next((name for name in file_tensors if name in tensors), None)
        if twice is not None:  # which copy would count would depend on the order of the files
            raise CheckpointError(f"{f.parent}: tensor {_short(twice)} is stored in both {shard_of[twice].name} and "
                                  f"{f.name}: the shards contradict each other; download the model again")
        tensors.update(file_tensors)
        shard_of.update(dict.fromkeys(file_tensors, f))
        mapped.append(address_range)
    where = files[0].parent if files else "the checkpoint"
    for name in expected:
        if name not in tensors:
            raise CheckpointError(f"{where}: tensor {_short(name)} is missing from the weights; "
                                  f"is the checkpoint complete and made for this config.json?")
    for name, t in tensors.items():
        if name not in expected and name not in aliases:
            raise CheckpointError(f"{where}: unexpected tensor {_short(name)} in the weights; "
                                  f"does config.json describe this checkpoint?")
        want = expected.get(name, expected.get(aliases.get(name, "")))
        if tuple(t.shape) != tuple(want.shape):
            raise CheckpointError(f"{where}: tensor {_short(name)} has shape {_short(tuple(t.shape))}, "
                                  f"config.json implies {tuple(want.shape)}")
        if not t.is_floating_point():
            raise CheckpointError(f"{where}: tensor {_short(name)} holds {t.dtype} values, not weights")
        if {t.dtype, declared} == {torch.float16, torch.bfloat16}:  # same size, different meaning
            raise CheckpointError(f"{where}: config.json says the weights are {declared} but {_short(name)} is stored "
                                  f"as {t.dtype}: one of them is mislabelled; download the model again")
    for name in expected:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        view = tensors.pop(name)
        if device.type == "cpu" and view.dtype != dtype:
            value = huge_copy(view, dtype)
        else:
            value = view.to(device=device, dtype=dtype)  # no copy when dtype and device already match the file
        if value.data_ptr() != view.data_ptr() and view.is_contiguous():
            _release(view, mapped)
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    model.tie_weights()
    model.reset_buffers(device)
    model._weight_files = [f for f in kept if f.viewed_by(model)]  # the others close: nothing reads them


def check_memory(model: CausalLM, dtype: torch.dtype, device: torch.device, saved: torch.dtype | None) -> None:
    """Refuse, with the figures, to convert weights into more memory than this machine has.

    A bf16 file loaded as bf16 on a CPU needs nothing extra (its pages are mapped, and can be
    dropped and re-read by the system under pressure); a conversion makes a private copy.
    ``saved`` is the dtype the files really store (``stored_dtype``), None when they mix.
    """
    need = sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        where, hint = "free on the GPU", "use a smaller model"
    elif dtype == saved:
        return
    else:
        free = available_memory()
        where, hint = "available", "load it in the file's own dtype (dtype='auto' or 'bfloat16'), or a smaller model"
    if free is not None and need > free:
        raise CheckpointError(f"the weights need {need / 2**30:.1f} GiB as {str(dtype)[6:]} but only "
                              f"{free / 2**30:.1f} GiB is {where}: {hint}")


def stored_dtype(files: list[Path]) -> torch.dtype | None:
    """The one dtype every tensor of ``files`` is stored in, from their headers alone; None if they mix.

    config.json's ``torch_dtype`` is only a label, and labels can be wrong: a bf16 file labelled
    float32 and loaded as float32 is a conversion into twice the file's size, which the memory
    check must see. Reading the headers costs a few kB per file.
    """
    found = set()
    for f in files:
        for name, info in read_safetensors_header(f).items():
            if name != "__metadata__" and isinstance(info, dict):
                tag = info.get("dtype")
                found.add(_ST_DTYPES.get(tag) if isinstance(tag, str) else None)
    return found.pop() if len(found) == 1 else None


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (``MemAvailable``), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def load_model(files: ModelFiles, dtype: str | torch.dtype = "auto",
               device: str | torch.device | None = None, matvec: str = "auto") -> CausalLM:
    """Build the architecture ``config.json`` names and fill it from the safetensors files.

    ``dtype``: ``auto`` (see ``choose_dtype``), or float32 / bfloat16 / float16.
    ``matvec``: ``auto`` converts the model for this machine's runtime (``qwen_lab.runtime``:
    the C decode kernels on a CPU); ``torch`` uses torch's own products throughout; ``none``
    keeps the plain reference model. ``model.runtime`` lists what was replaced.
    """
    if matvec not in MATVECS:
        raise SettingError(f"matvec {matvec!r} is not one of {', '.join(MATVECS)}")
    device = parse_device(device)
    config = read_config(files.config)
    saved = checkpoint_dtype(config)
    dtype = choose_dtype(dtype, device, saved)
    model = build_model(config, "meta")
    check_memory(model, dtype, device, stored_dtype(files.weights))
    load_weights(model, files.weights, dtype, device, saved)
    model.runtime = runtime.convert_for_runtime(model, device, matvec)
    return model.eval()


def count_parameters(model: nn.Module) -> int:
    """Parameters, each tied matrix counted once (works on the meta device too)."""
    return sum(p.numel() for p in model.parameters())


__all__ = ["ARCHITECTURES", "DTYPES", "WeightFile", "architecture_of", "available_memory", "build_model",
           "check_weight_files", "checkpoint_dtype", "choose_dtype", "count_parameters", "default_device",
           "load_model", "load_weights", "read_config", "read_safetensors", "read_safetensors_header",
           "suggested_dtype", "weight_files_changed"]
