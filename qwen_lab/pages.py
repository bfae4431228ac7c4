"""Memory in 2 MiB pages for the weights a decode step streams (Linux's transparent huge pages).

Used by ``load`` (the weights it converts, and the file mappings it advises), by ``layers`` (the KV
caches, which attention reads whole every token), and by ``tuning``
(which times its candidate plans on memory of the same kind as the weights they will run on:
a plan chosen on 4 KiB pages was measured slower on the 2 MiB pages the model has,
``benchmarks/RESULTS.md``).
"""
from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages() -> bool:
    """Whether weights are asked for in 2 MiB pages (Linux's transparent huge pages) here.

    Decoding reads every weight once a token; read in 4 KiB pages, the memory streams slower,
    since each new page needs its own address translation and the CPU's prefetchers stop at its
    edge. Measured on an AMD EPYC (Zen 4), 2 threads, one process, alternating: a one-row product
    of a Qwen2.5-0.5B MLP matrix in 2 MiB pages against 4 KiB pages, 42 against 34 GB/s (float32)
    and 52 against 40 (bf16); ``torch.sum``, 65 against 48 (``benchmarks/RESULTS.md``). So:

    * a converted weight (a bf16 file loaded as float32) is copied into memory advised with
      ``MADV_HUGEPAGE``, 2 MiB-aligned;
    * a file's mapping is advised the same way: pages read from disk then come as 2 MiB pieces of
      the page cache, still shared by every process mapping the file (pages already cached in
      smaller pieces stay as they are until the system drops them: ``load.cached_in_huge_pages``).

    Off where the system says ``never`` (``/sys/kernel/mm/transparent_hugepage/enabled``), and with
    ``QWEN_LAB_HUGE_PAGES=0`` (to measure the difference). Weights loaded onto a GPU are the GPU's
    memory: ``load_weights`` asks only for a CPU's.
    """
    return huge_pages_and_why()[0]


def huge_pages_and_why() -> tuple[bool, str]:
    """``huge_pages()``, and why, in words (``qwen-lab doctor``'s *pages* line)."""
    if os.environ.get("QWEN_LAB_HUGE_PAGES", "").strip() == "0":
        return False, "QWEN_LAB_HUGE_PAGES=0 turns 2 MiB pages off"
    try:
        setting = THP_SETTING.read_text().strip() if hasattr(mmap, "MADV_HUGEPAGE") else None
    except OSError:
        setting = None
    if setting is None:
        return False, "this system has no transparent huge pages"
    if "[never]" in setting:
        return False, (f"transparent huge pages are off ({setting}), and decoding streams the weights slower "
                       f"(benchmarks/RESULTS.md); to turn them on, as root: echo madvise > {THP_SETTING}")
    return True, f"transparent huge pages: {setting}"


def advise_huge(mm: mmap.mmap, start: int, length: int) -> None:
    if length >= HUGE_PAGE and huge_pages():
        try:
            mm.madvise(mmap.MADV_HUGEPAGE, start, length)
        except OSError:  # advice only: a kernel without it maps 4 KiB pages, as before
            pass


def huge_empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in 2 MiB-aligned memory advised to use huge pages (``huge_pages``) where
    it is that large; otherwise as torch allocates it. Its pages come when first written."""
    huge = _huge(shape, dtype)
    return torch.empty(shape, dtype=dtype) if huge is None else huge


def huge_zeros(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """``huge_empty``'s memory holding zeros: memory fresh from the system is zeros already, so its pages
    are not written here, and come when first written (a KV cache of many positions takes the memory of
    those it holds). Otherwise ``torch.zeros``."""
    huge = _huge(shape, dtype)
    return torch.zeros(shape, dtype=dtype) if huge is None else huge


def _huge(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
    """A CPU tensor in fresh anonymous memory (zeros), 2 MiB-aligned and advised as huge pages; None where
    it is under 2 MiB or huge pages are not asked for here."""
    count, itemsize = 1, torch.empty((), dtype=dtype).element_size()
    for size in shape:
        count *= size
    if count * itemsize < HUGE_PAGE or not huge_pages():
        return None
    try:
        mm = mmap.mmap(-1, count * itemsize + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:  # no address space for it (ulimit -v): torch's allocation then says so as it always did
        return None
    offset = -ctypes.addressof(ctypes.c_char.from_buffer(mm)) % HUGE_PAGE
    whole = count * itemsize // HUGE_PAGE * HUGE_PAGE  # the tail, under 2 MiB, in small pages: no page half empty
    advise_huge(mm, offset, whole)  # before any page is touched: the first writes then fault in 2 MiB pages
    return torch.frombuffer(mm, dtype=dtype, count=count, offset=offset).view(shape)  # keeps mm alive


def huge_copy(view: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A copy of ``view`` as ``dtype`` on the CPU, in ``huge_empty`` memory."""
    return huge_empty(view.shape, dtype).copy_(view)


__all__ = ["HUGE_PAGE", "THP_SETTING", "advise_huge", "huge_copy", "huge_empty", "huge_pages", "huge_pages_and_why",
           "huge_zeros"]
