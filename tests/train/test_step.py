"""The step's loss is the per-token mean over all micro-batches and workers: gradients of grad_accum=k x
batch b equal those of one batch of k*b, whatever the padding of each micro-batch; 2 DDP workers equal 1."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from pipelines.train.checkpoints import unwrap
from pipelines.train.step import StepStats, micro_batch_backward, scale_to_token_mean
from tests.conftest import random_text, tiny_model

PAD = 1024
T = 24  # frames per row, before padding
LENGTHS = [24, 3, 17, 6]  # real frames per row: the micro-batches below differ a lot in padding
CAPTIONS = [5, 2, 7, 3]


def _rows(indices: list[int]) -> dict[str, torch.Tensor]:
    """Rows of a fixed toy dataset, collated as the training reader does (BOS = pad id, right padding)."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, PAD, (len(LENGTHS), T), generator=g)
    text, mask = random_text(CAPTIONS, seed=1)
    tokens = torch.full((len(indices), T + 1), PAD)
    for out, i in enumerate(indices):
        tokens[out, 1 : LENGTHS[i] + 1] = codes[i, : LENGTHS[i]]
    S = max(CAPTIONS[i] for i in indices)  # each batch pads its captions to its own longest
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "text": text[indices, :S],
        "text_mask": mask[indices, :S],
    }


def _grads(model, micro_batches: list[list[int]], world: int = 1, sync_last_only: bool = False) -> tuple:
    stats = StepStats()
    for n, rows in enumerate(micro_batches):
        sync = not sync_last_only or n == len(micro_batches) - 1
        micro_batch_backward(model, _rows(rows), stats, pad_id=PAD, label_smoothing=0.1, amp=None, sync=sync)
    step = stats.reduced(torch.device("cpu"))
    params = list(unwrap(model).parameters())
    scale_to_token_mean(params, step, world)
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return grads, step


def test_accumulation_equals_one_batch(arch):
    model = tiny_model(arch)
    whole, whole_step = _grads(model, [[0, 1, 2, 3]])
    accumulated, step = _grads(model, [[0, 1], [2, 3]])
    swapped, _ = _grads(model, [[1, 3], [0], [2]])  # other micro-batch sizes and order: same step
    assert step.tokens == whole_step.tokens == sum(LENGTHS)
    assert abs(step.mean_loss - whole_step.mean_loss) < 1e-5
    worst = max((a - w).abs().max().item() for a, w in zip(accumulated, whole, strict=True))
    print(f"max |grad(accumulated) - grad(one batch)| = {worst:.2e}")
    for a, s, w in zip(accumulated, swapped, whole, strict=True):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s, w, rtol=1e-4, atol=1e-6)


def test_mean_of_micro_batch_means_would_differ(arch):
    """The old loss, a mean of per-micro-batch means, gives other gradients on this data (so the test above can
    fail): its tokens in the short micro-batch weigh 27/23 times more than those in the long one."""
    model = tiny_model(arch)
    whole, _ = _grads(model, [[0, 1, 2, 3]])
    for rows in ([0, 1], [2, 3]):
        b = _rows(rows)
        (model(b["inputs"], b["text"], b["text_mask"], targets=b["targets"], label_smoothing=0.1).loss / 2).backward()
    old = [p.grad for p in model.parameters()]
    worst = max(((o - w).abs().max() / w.abs().max()).item() for o, w in zip(old, whole, strict=True))
    assert worst > 1e-2, worst


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = torch.nn.parallel.DistributedDataParallel(tiny_model("simba"))
        rows = [[0], [1]] if rank == 0 else [[2], [3]]  # rank 0 holds 27 tokens, rank 1 holds 23
        grads, step = _grads(model, rows, world=2, sync_last_only=True)
        torch.save({"grads": grads, "tokens": step.tokens, "loss": step.mean_loss}, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_ddp_workers_equal_one(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    whole, whole_step = _grads(tiny_model("simba"), [[0, 1, 2, 3]])
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert saved["tokens"] == whole_step.tokens  # the all-reduced count of the whole step
        assert abs(saved["loss"] - whole_step.mean_loss) < 1e-5
        for g, w in zip(saved["grads"], whole, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
