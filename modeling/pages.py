"""Transparent huge pages for the tensors a CPU decoding step streams (Linux).

A decoding step reads every weight and the whole recurrent state (or KV cache) once, in order. With the
kernel's 4 KiB pages, such a stream misses the TLB once per page, and under a hypervisor each miss walks two
page tables. Backing the same memory with 2 MiB pages removes almost all of those misses: on the 2-core AMD
Zen 4 VMs here the mid-size compiled SiMBA step got 1.2-1.3x faster (bench/generate.py, side by side in one
process), the paper-size one 1.3x, and the eager steps 6-17%. `TextToMusicLM.prefill`, which builds every
decoding state, calls `use_huge_pages` on the weights and that state.

`use_huge_pages(tensors)` asks the kernel to back the memory already holding `tensors` with huge pages, in
place: the same addresses and tensors (the kernel copies each region into a huge page), so parameters stay the
parameters an optimizer holds. For every 2 MiB-aligned
region that the tensors touch it calls `madvise(MADV_HUGEPAGE)` (future faults and khugepaged may use huge
pages there, even where THP is `madvise`-only, the common default) and then `madvise(MADV_COLLAPSE)` (Linux
6.1+: collapse the region into a huge page now, synchronously). Regions are rounded outwards to 2 MiB, so a
neighbouring allocation in the same region gets huge pages too, which is harmless. Where a region cannot be
collapsed (not all mapped, no free huge page, an older kernel) it keeps 4 KiB pages and the tensors work as
before: huge pages only ever change speed, never results.

Decoding states are allocated on huge pages from the start (`zeros`), so there is nothing to collapse, and
nothing to copy, per generation. `SIMBA_HUGE_PAGES=off` (or `with huge_pages_off():`) turns all of it off
(for comparisons: bench/generate.py times both in one run).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import mmap
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

HUGE_PAGE_BYTES = 2 << 20  # the PMD size with 4 KiB base pages (x86-64; arm64 with 4 KiB pages)
HUGE_PAGES_ENV = "SIMBA_HUGE_PAGES"
# Linux's madvise advice values (uapi/asm-generic/mman-common.h).
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
# Smaller tensors are left alone unless a larger one shares their region: collapsing a region for a few KiB
# would not be worth the 2 MiB it can pin.
MIN_TENSOR_BYTES = 64 << 10


@dataclass(frozen=True)
class HugePages:
    """What `use_huge_pages` did: regions collapsed into huge pages, regions left with small pages, and why."""

    regions: int = 0
    collapsed: int = 0
    reason: str = ""  # why nothing (or not everything) was collapsed; "" when every region was
    seconds: float = 0.0  # what the madvise calls took (the kernel copies each region into a huge page)

    @property
    def bytes(self) -> int:
        return self.collapsed * HUGE_PAGE_BYTES

    def __str__(self) -> str:
        text = f"{self.collapsed}/{self.regions} regions of 2 MiB on huge pages ({self.seconds:.2f} s)"
        return f"{text}: {self.reason}" if self.reason else text


@functools.cache
def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc.madvise


def huge_page_problem() -> str | None:
    """Why huge pages cannot be used in this process (not Linux, THP off, turned off by us), or None."""
    if os.environ.get(HUGE_PAGES_ENV, "").strip().lower() in ("off", "0", "false", "no"):
        return f"turned off by {HUGE_PAGES_ENV}"
    return _machine_problem()


@functools.cache  # a property of the machine
def _machine_problem() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"transparent huge pages are Linux-only (this is {sys.platform})"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as file:
            mode = file.read()
    except OSError:
        return "this kernel has no transparent huge pages"
    if "[never]" in mode:
        return "transparent huge pages are off on this machine (/sys/kernel/mm/transparent_hugepage/enabled: never)"
    try:  # 2 MiB with 4 KiB base pages (x86-64, most arm64); other page sizes are left alone
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as file:
            pmd = int(file.read())
    except (OSError, ValueError):
        pmd = HUGE_PAGE_BYTES
    if pmd != HUGE_PAGE_BYTES or mmap.PAGESIZE != 4096:
        return f"this kernel's pages ({mmap.PAGESIZE} B base, {pmd} B huge) are not the 4 KiB / 2 MiB handled here"
    return None


@contextlib.contextmanager
def huge_pages_off():
    """Within the block no huge pages are used or allocated, as under `SIMBA_HUGE_PAGES=off` (for comparisons)."""
    old = os.environ.get(HUGE_PAGES_ENV)
    os.environ[HUGE_PAGES_ENV] = "off"
    try:
        yield
    finally:
        if old is None:
            del os.environ[HUGE_PAGES_ENV]
        else:
            os.environ[HUGE_PAGES_ENV] = old


def _regions(tensors: Iterable[Tensor]) -> list[int]:
    """Start addresses of the 2 MiB-aligned regions holding the storages of the (large enough) CPU tensors."""
    starts = set()
    for tensor in tensors:
        if tensor.device.type != "cpu":
            continue
        storage = tensor.untyped_storage()
        if storage.nbytes() < MIN_TENSOR_BYTES:
            continue
        first = storage.data_ptr() // HUGE_PAGE_BYTES
        last = (storage.data_ptr() + storage.nbytes() - 1) // HUGE_PAGE_BYTES
        starts.update(range(first * HUGE_PAGE_BYTES, (last + 1) * HUGE_PAGE_BYTES, HUGE_PAGE_BYTES))
    return sorted(starts)


def use_huge_pages(tensors: Iterable[Tensor]) -> HugePages:
    """Back the memory of `tensors` (CPU, at least MIN_TENSOR_BYTES each) with huge pages, in place.

    Safe to call again on the same tensors (a collapsed region stays collapsed) and on any tensors: results
    never change, only speed. Returns what was done, with the reason for any region left on small pages.
    """
    problem = huge_page_problem()
    regions = _regions(tensors)
    if problem or not regions:
        return HugePages(len(regions), 0, problem or "")
    madvise = _madvise()
    collapsed, failures, t0 = 0, set(), time.perf_counter()
    for start in regions:
        # HUGEPAGE first: COLLAPSE itself ignores the THP mode, but later faults (e.g. after a fork's copy on
        # write) and khugepaged honour it.
        madvise(start, HUGE_PAGE_BYTES, MADV_HUGEPAGE)
        if madvise(start, HUGE_PAGE_BYTES, MADV_COLLAPSE) == 0:
            collapsed += 1
        else:
            failures.add(errno.errorcode.get(ctypes.get_errno(), "?"))
    seconds = time.perf_counter() - t0
    if not failures:
        return HugePages(len(regions), collapsed, seconds=seconds)
    # EINVAL also comes from a region not wholly mapped (the outward rounding can reach past a mapping's end).
    reason = f"the others stay on 4 KiB pages, madvise(MADV_COLLAPSE): {', '.join(sorted(failures))}"
    if failures == {"EINVAL"} and not collapsed:  # khugepaged may still collapse the regions, later
        reason += " (MADV_COLLAPSE needs Linux 6.1+)"
    return HugePages(len(regions), collapsed, reason, seconds)


def zeros(*size, dtype: torch.dtype | None = None, device=None) -> Tensor:
    """`torch.zeros`, on huge pages from the first touch where it can be (a CPU tensor of a huge page or more).

    Decoding states are allocated per generation and streamed every step. Such a tensor gets an anonymous mapping of
    its own, advised `MADV_HUGEPAGE` before anything touches it: the kernel then faults 2 MiB pages straight in,
    already zero. Collapsing 4 KiB pages afterwards (`use_huge_pages`) copies every region instead: ~2.5 s per GiB
    on the AMD VMs here, against ~0.06 s this way. (Memory from the C allocator is no good for this: it may reuse
    pages that were touched before.) The mapping is unmapped when the tensor's storage is freed.
    """
    dtype = dtype or torch.get_default_dtype()
    shape = torch.Size(size[0] if len(size) == 1 and not isinstance(size[0], int) else size)
    nbytes = shape.numel() * dtype.itemsize
    on_cpu = device is None or torch.device(device).type == "cpu"
    if not on_cpu or nbytes < HUGE_PAGE_BYTES or huge_page_problem() is not None:
        return torch.zeros(shape, dtype=dtype, device=device)
    # Private anonymous memory (Python's default for fileno -1 is shared, i.e. shmem), with room to start on 2 MiB.
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(mapping, dtype=torch.uint8)  # its storage keeps the mapping alive
    offset = -raw.data_ptr() % HUGE_PAGE_BYTES
    _madvise()(raw.data_ptr() + offset, -(-nbytes // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES, MADV_HUGEPAGE)
    return raw[offset : offset + nbytes].view(dtype).view(shape)
