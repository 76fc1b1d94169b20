"""
common.py: the one-process torchrun environment, the finiteness guard, the metrics log.
    python -m pytest tests/test_common.py -q
"""
import json
import os

import pytest
import torch

import common as C


def test_single_process_env_acts_as_one_torchrun_rank(monkeypatch):
    """`python train_grpo.py --engine=vllm` on a GPU: vLLM's external_launcher reads RANK (KeyError before)."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "")  # recorded, so that teardown removes what single_process_env sets
        monkeypatch.delenv(k)
    C.single_process_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
    assert int(os.environ["MASTER_PORT"]) > 0
    monkeypatch.setenv("RANK", "3")  # under torchrun: nothing is touched
    monkeypatch.setenv("MASTER_PORT", "1234")
    C.single_process_env()
    assert os.environ["RANK"] == "3" and os.environ["MASTER_PORT"] == "1234"


def test_finite_guards_pushes_and_checkpoints():
    model = torch.nn.Linear(3, 2)
    assert C.finite(model, "checkpointed") is model
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    assert not C.params_finite(model)
    with pytest.raises(RuntimeError, match="non-finite weights in the policy: not checkpointed"):
        C.finite(model, "checkpointed")


def test_metrics_log_writes_rank0_only(tmp_path):
    log = C.MetricsLog(str(tmp_path), is_main=True)
    log.write({"step": 1, "loss": 0.5}, 1)
    log.close()
    other = C.MetricsLog(str(tmp_path / "x"), is_main=False)  # other ranks write nothing (no folder needed)
    other.write({"step": 1}, 1)
    other.close()
    assert [json.loads(line) for line in open(tmp_path / "metrics.jsonl")] == [{"step": 1, "loss": 0.5}]


def test_busy_seconds_counts_overlapping_kernels_once():
    """profiled's "GPU busy" line: the union of the kernels' (start, end) microseconds, so two streams running at
    once count once and idle gaps not at all."""
    assert C.busy_seconds([]) == 0.0
    assert C.busy_seconds([(20, 30), (0, 10), (5, 15), (1, 3)]) == pytest.approx(25e-6)  # [0, 15) + [20, 30)
    assert C.busy_seconds([(0, 1_000_000), (1_000_000, 1_500_000)]) == pytest.approx(1.5)
