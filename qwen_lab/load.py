"""Step 2 — load: config.json -> architecture -> weights, without wasting memory.

1. ``config.json``'s ``architectures`` picks the implementation from
   ``ARCHITECTURES`` (the seed: "look at ``architectures`` to choose the model").
2. The model is built on PyTorch's *meta* device: shapes only, no memory, no
   random initialisation that the checkpoint would overwrite anyway.
3. Each tensor of the ``.safetensors`` files is a view on a memory map of the
   file: nothing is read until it is used, and when the file's dtype is the one
   asked for, no byte is copied at all.
4. On a CPU, the linear layers multiply one vector (a decode step) with the C
   kernel of ``qwen_lab.kernels``, which streams weights near memory speed. Where
   that kernel cannot be built, large float32 matrices are instead stored
   column-major if this machine's BLAS was measured to multiply a vector
   faster that way (same shapes, same math: only the memory order differs).

>>> from qwen_lab.hub import resolve
>>> model = load_model(resolve("qwen-lab/tiny-chat"))
>>> type(model).__name__
'Qwen2ForCausalLM'
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import mmap
import struct
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .kernels import native_bf16  # noqa: F401  (here for readers of step 2)
from .errors import CheckpointError, UnsupportedArchitectureError
from .hub import ModelFiles
from .model import Qwen2Config, Qwen2ForCausalLM, RotaryEmbedding

#: architecture name in config.json -> (config class, model class)
ARCHITECTURES: dict[str, tuple[type, type[nn.Module]]] = {
    "Qwen2ForCausalLM": (Qwen2Config, Qwen2ForCausalLM),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYOUTS = ("auto", "row", "column")
MATVECS = ("auto", "torch")

#: Column-major storage is only considered for float32 matrices at least this large: smaller
#: ones stay in the CPU cache, where the layout makes no difference worth measuring.
COLUMN_MAJOR_MIN_BYTES = 8 * 2**20

# safetensors dtype tags -> torch dtypes (the ones a language model checkpoint uses)
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_config(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}; download the model again") from e


def architecture_of(config: dict) -> str:
    """The supported architecture ``config.json`` names, or a clear error."""
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return name
    supported = ", ".join(sorted(ARCHITECTURES))
    shown = ", ".join(names) if names else "no architecture"
    raise UnsupportedArchitectureError(f"config.json names {shown}; qwen_lab supports {supported}")


def build_model(config: dict, device: str | torch.device = "meta") -> nn.Module:
    """The model ``config`` describes, on ``device`` (``meta``: shapes only, no memory)."""
    config_cls, model_cls = ARCHITECTURES[architecture_of(config)]
    with torch.device(device):
        return model_cls(config_cls.from_dict(config))


def checkpoint_dtype(config: dict) -> torch.dtype | None:
    """The dtype ``config.json`` says the weights were saved in (``torch_dtype``, or ``dtype``)."""
    name = config.get("torch_dtype") or config.get("dtype")
    return DTYPES.get(name) if isinstance(name, str) else None


def choose_dtype(dtype: str | torch.dtype, device: torch.device, saved: torch.dtype | None = None) -> torch.dtype:
    """The dtype to compute in. ``auto``:

    * on CUDA, bfloat16 as the seed's Candle code does;
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
            return torch.bfloat16
        return saved if saved in (torch.bfloat16, torch.float32) else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` file, as views on a memory map.

    The format: 8 bytes little-endian header length N, N bytes of JSON
    ``{name: {dtype, shape, data_offsets: [begin, end]}}``, then the raw data.
    The map is copy-on-write, so a tensor can even be modified in place
    without touching the file.
    """
    return _map_safetensors(path)[0]


def _map_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
    """The tensors, and the address range of the mapping they view."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < 8:
                raise CheckpointError(f"{path} is truncated ({size} bytes): download it again")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{path} is truncated or not a safetensors file "
                                      f"(header of {n} bytes in a {size}-byte file): download it again")
            header = json.loads(f.read(n))
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} has a corrupt header ({e}): download it again") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt header (not a JSON object): download it again")
    header.pop("__metadata__", None)
    tensors, data_start = {}, 8 + n
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm)) if size else 0
    for name, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: entry {name!r} is corrupt or of an unsupported dtype ({e})") from e
        count = 1
        for d in shape:
            count *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != count * itemsize or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape}: file is corrupt")
        if data_start + end > size:
            raise CheckpointError(f"{path} is truncated: tensor {name!r} ends at byte {data_start + end} "
                                  f"of a {size}-byte file; download it again")
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        elif (data_start + begin) % itemsize:  # unaligned data: torch cannot view it, so copy
            raw = bytes(mm[data_start + begin:data_start + end])
            tensors[name] = torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)
        else:
            tensors[name] = torch.frombuffer(mm, dtype=dtype, count=count, offset=data_start + begin).reshape(shape)
    return tensors, (base, base + size)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True) if hasattr(mmap, "MADV_DONTNEED") else None


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


@functools.lru_cache(maxsize=None)
def column_major_is_faster(out_features: int, in_features: int) -> bool:
    """Does this machine multiply a vector faster by an (out x in) float32 matrix stored column-major?

    Decoding is one matrix-vector product per weight matrix, and BLAS libraries differ in which
    storage order they stream faster (MKL on AMD CPUs: column-major, for the wide matrices).
    Measured once per shape, on a slice tall enough to leave the cache.
    """
    rows = min(out_features, 16384)
    row_major = torch.randn(rows, in_features)
    column_major = torch.empty(in_features, rows).copy_(row_major.t()).t()  # same matrix, other order
    x = torch.randn(1, in_features)

    def best(w):
        F.linear(x, w)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            F.linear(x, w)
            times.append(time.perf_counter() - t)
        return min(times)

    return best(column_major) < 0.9 * best(row_major)


def column_major_weights(model: nn.Module, dtype: torch.dtype, device: torch.device,
                         layout: str = "auto", kernel: bool = False) -> set[str]:
    """Names of the ``nn.Linear`` weights to store column-major (the math is unchanged).

    ``auto``: float32 on the CPU, large matrices, where measured faster, unless the C
    ``kernel`` will multiply them (it reads rows); ``row``: none; ``column``: every
    linear weight (for tests and experiments).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    chosen = set()
    for name, p in model.named_parameters():  # a tied lm_head appears once, as the embedding
        if id(p) not in linear or layout == "row":
            continue
        if layout == "column" or (dtype == torch.float32 and device.type == "cpu" and not kernel
                                  and p.numel() * 4 >= COLUMN_MAJOR_MIN_BYTES and column_major_is_faster(*p.shape)):
            chosen.add(name)
    return chosen


def load_weights(model: nn.Module, files: list[Path], dtype: torch.dtype, device: torch.device,
                 column_major: set[str] = frozenset()) -> None:
    """Put the checkpoint's tensors into a meta-device ``model``, checking names and shapes.

    Tied weights (``lm_head`` sharing ``embed_tokens``) are one parameter in
    the model; a checkpoint may or may not also store ``lm_head.weight``.
    Weights named in ``column_major`` keep their shape but are stored transposed.
    """
    expected = dict(model.named_parameters())  # tied parameters appear once
    tied = getattr(model.config, "tie_word_embeddings", False)
    tensors: dict[str, torch.Tensor] = {}
    mapped = []
    for f in files:
        file_tensors, address_range = _map_safetensors(f)
        tensors.update(file_tensors)
        mapped.append(address_range)
    where = files[0].parent if files else "the checkpoint"
    for name in expected:
        if name not in tensors:
            raise CheckpointError(f"{where}: tensor {name!r} is missing from the weights; "
                                  f"is the checkpoint complete and made for this config.json?")
    for name, t in tensors.items():
        if name not in expected and not (tied and name == "lm_head.weight"):
            raise CheckpointError(f"{where}: unexpected tensor {name!r} in the weights; "
                                  f"does config.json describe this checkpoint?")
        if name in expected and tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, "
                                  f"config.json implies {tuple(expected[name].shape)}")
    for name in expected:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        view = tensors.pop(name)
        if name in column_major:  # transpose in the file's dtype (fewer bytes to move), then convert
            value = view.t().contiguous().to(device=device, dtype=dtype).t()
        else:  # .to() is a no-op (no copy) when dtype and device already match the file
            value = view.to(device=device, dtype=dtype)
        if value.data_ptr() != view.data_ptr() and view.is_contiguous():
            _release(view, mapped)
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Buffers are not in the checkpoint: rebuild them on the real device.
    rotary = model.model.rotary_emb
    with torch.device(device):
        model.model.rotary_emb = RotaryEmbedding(rotary.inv_freq.shape[0] * 2, model.config.rope_theta)


def load_model(files: ModelFiles, dtype: str | torch.dtype = "auto",
               device: str | torch.device | None = None, layout: str = "auto",
               matvec: str = "auto") -> nn.Module:
    """Build the architecture ``config.json`` names and fill it from the safetensors files.

    ``dtype``: ``auto`` (see ``choose_dtype``), or float32 / bfloat16 / float16.
    ``layout``: how linear weights are stored in memory (see ``column_major_weights``).
    ``matvec``: ``auto`` multiplies single rows on the CPU with ``qwen_lab.kernels``'s C
    kernel where it is available; ``torch`` always uses ``F.linear``.
    """
    if matvec not in MATVECS:
        raise ValueError(f"matvec {matvec!r} is not one of {', '.join(MATVECS)}")
    device = torch.device(device) if device is not None else default_device()
    config = read_config(files.config)
    dtype = choose_dtype(dtype, device, checkpoint_dtype(config))
    model = build_model(config, "meta")
    kernel = matvec == "auto" and device.type == "cpu" and dtype in kernels.DTYPES and kernels.available()
    load_weights(model, files.weights, dtype, device, column_major_weights(model, dtype, device, layout, kernel))
    if kernel:
        kernels.use_kernel(model)
    return model.eval()


def count_parameters(model: nn.Module) -> int:
    """Parameters, each tied matrix counted once (works on the meta device too)."""
    return sum(p.numel() for p in model.parameters())
