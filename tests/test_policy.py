"""
policy.py: micro-batches that every rank steps through together, and Seq's defaults. (The forward itself,
`sequences_logprobs`, `fill_logprobs`, `build_policy` and the format warm-up run in tests/test_train_grpo.py's
training runs, on 1 and 2 gloo ranks, and in tests/test_sp.py under SP.)
    python -m pytest tests/test_policy.py -q
"""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import policy as P


def test_micro_batches_one_process():
    seqs = list(range(5))
    assert P.micro_batches(seqs, 2) == [[0, 1], [2, 3], [4]]
    assert P.micro_batches(seqs, 8) == [[0, 1, 2, 3, 4]]
    assert P.micro_batches([], 2) == []


def _worker(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        seqs = list(range(5 if rank == 0 else 1))  # rank 0 holds 3 micro-batches, rank 1 one
        out[rank] = P.micro_batches(seqs, 2)
    finally:
        dist.destroy_process_group()


def test_micro_batches_pad_every_rank_to_the_same_count(tmp_path):
    """FSDP2 runs collectives inside each forward: a rank with fewer micro-batches must still step through as
    many (None marks a padding micro-batch, trained with zero weight), or the others wait forever."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, str(tmp_path / "pg"), out), nprocs=2, join=True)
        assert out[0] == [[0, 1], [2, 3], [4]]
        assert out[1] == [[0], None, None]


def test_micro_size_rounds_up_to_whole_groups_with_group_packing():
    class Cfg:
        micro_batch_size, n, group_packing = 12, 8, False
    assert P.micro_size(Cfg) == 12
    Cfg.group_packing = True
    assert P.micro_size(Cfg) == 16           # a group's prompt is then never split over two micro-batches
    Cfg.micro_batch_size = 16
    assert P.micro_size(Cfg) == 16


def test_seq_defaults():
    s = P.Seq(prompt=None, response_ids=[1, 2], advantages=torch.zeros(2))
    assert s.reward == 0.0 and s.engine_logprobs is None and s.logp_old is None and s.logp_ref is None
