"""Huge pages for decoding tensors (modeling/pages.py): really backed by 2 MiB pages (read back from /proc),
in place, values unchanged, and left alone where they cannot or should not be; states allocated on them.

The compiled step's use of them (weights + each new state, results equal to the eager step) is tested in
test_compiled.py, generation's here. Whether they make a step faster is bench/generate.py's business
(`huge_pages_speedup`).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import torch

from modeling.pages import HUGE_PAGE_BYTES, HUGE_PAGES_ENV, huge_page_problem, huge_pages_off, use_huge_pages, zeros
from tests.conftest import random_text, tiny_model

KPF_THP = 22  # /proc/kpageflags bit of a page that belongs to a transparent huge page


def anon_huge_bytes() -> int:
    """The process's anonymous memory on transparent huge pages (/proc/self/smaps_rollup)."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no AnonHugePages line in /proc/self/smaps_rollup")


def thp_share(tensor: torch.Tensor) -> float | None:
    """Share of the tensor's 4 KiB pages that belong to huge pages (pagemap + kpageflags; None: not readable)."""
    start = tensor.data_ptr()  # a contiguous tensor's own bytes (its storage may be larger)
    end = start + tensor.numel() * tensor.element_size()
    pages = range(-(-start // 4096), end // 4096)  # whole pages inside the tensor
    try:
        with open("/proc/self/pagemap", "rb") as pagemap, open("/proc/kpageflags", "rb") as kpageflags:
            huge = 0
            for page in pages:
                pagemap.seek(page * 8)
                entry = struct.unpack("<Q", pagemap.read(8))[0]
                pfn = entry & ((1 << 55) - 1)
                if not entry >> 63 or not pfn:  # not present, or PFNs hidden (not root)
                    return None
                kpageflags.seek(pfn * 8)
                huge += struct.unpack("<Q", kpageflags.read(8))[0] >> KPF_THP & 1
    except OSError:
        return None
    return huge / len(pages)


def kernel_has_collapse() -> bool:
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    return (major, minor) >= (6, 1)


def test_a_tensor_goes_onto_huge_pages_in_place_with_its_values():
    tensor = torch.randn(6 * HUGE_PAGE_BYTES // 4, generator=torch.Generator().manual_seed(0))  # 12 MiB
    before, address = tensor.clone(), tensor.data_ptr()
    report = use_huge_pages([tensor])
    print(report)
    assert torch.equal(tensor, before) and tensor.data_ptr() == address
    assert report.regions in (6, 7)  # 12 MiB from an arbitrary address: 6 regions, 7 when it straddles one more
    if huge_page_problem() is not None or not kernel_has_collapse():
        assert report.collapsed == 0 and report.reason
        pytest.skip(f"no huge pages here: {report.reason}")
    # Every region wholly inside the tensor is collapsed; the two at its ends may reach unmapped memory.
    assert report.collapsed >= report.regions - 2, report
    assert anon_huge_bytes() >= report.bytes  # the kernel says so too
    share = thp_share(tensor)
    print(f"share of the tensor's pages in huge pages (kpageflags): {share}")
    if share is not None:
        assert share > 0.6  # at least the 4 inner regions of 6
    assert use_huge_pages([tensor]).collapsed == report.collapsed  # again: nothing changes, nothing breaks
    assert torch.equal(tensor, before)


def test_zeros_are_faulted_in_on_huge_pages_so_no_collapse_copies_them():
    before = anon_huge_bytes()
    tensor = zeros(20, HUGE_PAGE_BYTES // 4)  # 40 MiB
    assert tensor.shape == (20, HUGE_PAGE_BYTES // 4) and tensor.dtype == torch.float32 and not tensor.any()
    tensor += 1.0  # the first writes fault its pages in (as a prefill writes a decoding state)
    assert torch.equal(tensor, torch.ones(20, HUGE_PAGE_BYTES // 4))
    if huge_page_problem() is not None:
        pytest.skip(f"no huge pages here: {huge_page_problem()}")
    gained = anon_huge_bytes() - before
    share = thp_share(tensor)
    print(f"huge pages gained {gained >> 20} MiB; share of the tensor's pages (kpageflags): {share}")
    assert gained >= 20 * HUGE_PAGE_BYTES  # every region, without any MADV_COLLAPSE
    if share is not None:
        assert share == 1.0
    assert use_huge_pages([tensor]).seconds < 0.05  # nothing left to copy
    assert zeros(3, device="meta").shape == (3,) and not zeros(5).any()  # not CPU, or small: plain zeros
    assert zeros((2, 3), dtype=torch.int64).dtype == torch.int64


def test_small_meta_and_switched_off_tensors_are_left_alone(monkeypatch):
    assert use_huge_pages([torch.ones(100), torch.empty(1 << 24, device="meta")]).regions == 0
    monkeypatch.setenv(HUGE_PAGES_ENV, "off")
    report = use_huge_pages([torch.ones(HUGE_PAGE_BYTES)])
    assert report.collapsed == 0 and report.regions >= 4
    assert HUGE_PAGES_ENV in report.reason and HUGE_PAGES_ENV in str(report)


@pytest.mark.parametrize("arch", ["simba", "transformer"])
def test_generation_puts_weights_and_state_on_huge_pages_and_samples_the_same(arch, monkeypatch):
    import modeling.lm
    import modeling.pages

    monkeypatch.setattr(modeling.pages, "MIN_TENSOR_BYTES", 0)  # the tiny model's tensors count too
    reports = []

    def recording(tensors):
        reports.append(use_huge_pages(list(tensors)))
        return reports[-1]

    monkeypatch.setattr(modeling.lm, "use_huge_pages", recording)
    model = tiny_model(arch)
    text, mask = random_text([3, 5], seed=2)
    opts = dict(n_frames=8, top_k=50, cfg_scale=3.0, seed=5)
    on_huge_pages = model.generate(text, mask, **opts)
    (report,) = reports
    print(report)
    assert report.regions > 0
    if huge_page_problem() is None:
        assert report.collapsed > 0, report
    monkeypatch.setenv(HUGE_PAGES_ENV, "off")
    assert torch.equal(model.generate(text, mask, **opts), on_huge_pages)
    assert reports[-1].collapsed == 0


def test_huge_pages_off_is_a_block_that_restores_the_setting(monkeypatch):
    monkeypatch.delenv(HUGE_PAGES_ENV, raising=False)
    with huge_pages_off():
        assert HUGE_PAGES_ENV in huge_page_problem()
        tensor = zeros(2, HUGE_PAGE_BYTES)  # plain torch.zeros: from the C allocator, not a mapping of its own
        assert tensor.untyped_storage().nbytes() == tensor.numel() * 4
    assert HUGE_PAGES_ENV not in os.environ
    monkeypatch.setenv(HUGE_PAGES_ENV, "on")
    with huge_pages_off():
        pass
    assert os.environ[HUGE_PAGES_ENV] == "on"
