"""
bench.py at its CPU smoke sizes (--tiny): the GRPO-step bench runs train_grpo.py (through the 78 GiB-cap prelude,
bench.CAP_80GB) in both layouts and reports the fields the README's tables are made of; the patch-embedding bench
times both kernels.
    python -m pytest tests/test_bench.py -q
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import bench
import vlm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_bench_runs_both_layouts_and_reports_the_tables_fields(tmp_path):
    out = tmp_path / "bench.jsonl"
    subprocess.run([sys.executable, "bench.py", "train", "--tiny=True", "--steps=2", "--packing=[true,false]",
                    '--alloc_conf=["expandable_segments:True"]', '--compile_blocks=["norms"]',
                    '--vision_mlp=["padded"]', f"--out={out}"], cwd=ROOT, check=True, timeout=600, capture_output=True)
    results = {r["bench"]: r for r in map(json.loads, out.read_text().splitlines())}
    step = results["train_step"]
    assert [(r["group_packing"], r["alloc_conf"], r["compile_blocks"], r["vision_mlp"]) for r in step["rows"]] == \
        [(True, "expandable_segments:True", "norms", "padded"), (False, "expandable_segments:True", "norms", "padded")]
    fields = {"rollout_s", "update_s", "step_s", "update_tokens_per_s", "update_useful_tokens_per_s", "peak_GiB",
              "update_useful_MFU", "update_MFU"}
    for row in step["rows"]:
        assert fields <= row.keys() and row["update_s"] > 0 and row["step_s"] >= row["update_s"]
    packed, unpacked = step["rows"]
    # update_MFU's FLOPs are bench.update_flops of what the row reports (NaN MFU on a CPU, the count is not)
    model, _ = bench.make_model("tiny", "", device="meta")
    counts = bench.flop_params(model)
    for row in (packed, unpacked):
        tokens = row["update_useful_tokens_per_s" if row["group_packing"] else "update_tokens_per_s"] * row["update_s"]
        assert row["update_flops"] == pytest.approx(bench.update_flops(counts, tokens, 2, 4, row["response_len"],
                                                                       row["group_packing"], row["patches"]))
    assert unpacked["update_flops"] > packed["update_flops"]  # the prompt and the tower n times
    # per update: the same sequences (n x (prompt + response) tokens) in both layouts; computed, a packed group
    # has each prompt once (useful tokens), the unpacked rows have it n times
    per_update = [r["update_tokens_per_s"] * r["update_s"] for r in (packed, unpacked)]
    assert abs(per_update[0] - per_update[1]) < 0.01 * per_update[0]  # times are logged rounded
    assert packed["update_useful_tokens_per_s"] * packed["update_s"] < per_update[1]
    assert results["longest_fwd_bwd"]["rows"]


def test_patch_bench_times_both_kernels(tmp_path):
    """bench.py patch: the Conv3d and its GEMM (vlm.PatchProjection) on the same weights, forward and forward +
    backward, one row each per patch count."""
    out = tmp_path / "bench.jsonl"
    subprocess.run([sys.executable, "bench.py", "patch", "--tiny=True", "--patches=[64,128]", f"--out={out}"],
                   cwd=ROOT, check=True, timeout=300, capture_output=True)
    rows = json.loads(out.read_text().splitlines()[-1])["rows"]
    assert [(r["patches"], r["kernel"]) for r in rows] == [(n, k) for n in (64, 128)
                                                           for k in ("Conv3d", "PatchProjection (GEMM)")]
    assert all(r["forward_ms"] > 0 and r["forward_backward_ms"] > r["forward_ms"] for r in rows)


def test_mlp_bench_times_each_width(tmp_path):
    """bench.py mlp: the vision tower's gated MLP at each width, forward and forward + backward, one row each."""
    out = tmp_path / "bench.jsonl"
    subprocess.run([sys.executable, "bench.py", "mlp", "--tiny=True", "--widths=[128,136]", f"--out={out}"],
                   cwd=ROOT, check=True, timeout=300, capture_output=True)
    rows = json.loads(out.read_text().splitlines()[-1])["rows"]
    assert [r["width"] for r in rows] == [128, 136]
    assert all(r["forward_ms"] > 0 and r["forward_backward_ms"] > r["forward_ms"] and r["forward_TFLOPs"] > 0
               for r in rows)


def test_memory_plan_agrees_with_its_measured_peaks(tmp_path):
    """bench.py memory: the formula within 5% of every measured peak it is checked against (and past 78 GiB where
    the measurement ran out of memory); the 7B plan has a row per layout, frame count and SP size."""
    out = tmp_path / "bench.jsonl"
    subprocess.run([sys.executable, "bench.py", "memory", f"--out={out}"], cwd=ROOT, check=True, timeout=300,
                   capture_output=True)
    plan = json.loads(out.read_text().splitlines()[-1])
    assert len(plan["check_3b"]) == 14
    for row in plan["check_3b"]:
        if row["measured_GiB"] == "OOM":
            assert row["pred/meas"] == "agrees (> 78)", row
        else:
            assert 0.95 <= row["pred/meas"] <= 1.05, row
    assert len(plan["rows"]) == 2 * 3 * 4


def test_a_killed_bench_leaves_no_subprocess(tmp_path):
    """bench.die_with_parent: a bench killed mid-run (SIGKILL, as a time limit may) takes its subprocess with it, so
    no leftover run shares the GPU with the next measurement."""
    pid_file, parent_script = tmp_path / "child.pid", tmp_path / "parent.py"
    child_code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    parent_script.write_text("import subprocess, sys\nimport bench\n"
                             f"subprocess.run([sys.executable, '-c', {child_code!r}],"
                             " preexec_fn=bench.die_with_parent)\n")
    parent = subprocess.Popen([sys.executable, str(parent_script)], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    for _ in range(50):   # the kernel delivers the child's SIGKILL as the parent exits
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"subprocess {child} outlived its killed bench")


@pytest.mark.parametrize("packing", [True, False])
def test_attended_pairs_counts_the_group_mask(packing):
    """bench.attended_pairs (the attention term of the update's MFU) equals the visible pairs of the real masks:
    vlm.group_attention_mask for two packed rows, a causal mask per unpacked row."""
    P, R, n, prompts = 37, 5, 3, 2
    if packing:
        prompt = (torch.ones(P, dtype=torch.long), torch.zeros(3, P, dtype=torch.long))
        one = vlm.pack_groups([[1] * R] * n, [0] * n, [prompt], 0)
        visible = int((vlm.group_attention_mask(one.segments, torch.float32) == 0).sum()) * prompts
        tokens = prompts * (P + n * R)
    else:
        visible = prompts * n * int(torch.ones(P + R, P + R).tril().sum())
        tokens = prompts * n * (P + R)
    assert bench.attended_pairs(tokens, prompts, n, R, packing) == visible


def test_flop_params_of_the_3b_and_7b_shapes():
    """bench.flop_params: the input embedding does no FLOPs (a lookup) and lm_head is counted apart, tied (3B:
    151,936 x 2,048 = 311,164,928 of the 3,085,938,688 language-model parameters) or not (7B: its embedding is left
    out altogether); the merger (5,120 x 5,120 + 5,120 x out, biases, ln_q) apart from the per-patch tower."""
    for shape, body, head, merger in (("3b", 3085938688 - 311164928, 151936 * 2048, 36708608),
                                      ("7b", 7070619136 - 152064 * 3584, 152064 * 3584, 44574464)):
        model, _ = bench.make_model(shape, "", device="meta")
        c = bench.flop_params(model)
        assert (c.body, c.head, c.merger, c.merge) == (body, head, merger, 4), shape
        assert c.tower + c.merger == sum(p.numel() for p in model.model.visual.parameters())
        assert c.tower == 1505280 + 32 * 19702200  # patch embedding + 32 blocks


# a made-up shape small enough to count by hand
SMALL = bench.FlopParams(body=1000, head=100, layers=2, hidden=8, tower=50, merger=20, merge=4)


def test_lm_flops_counts_the_head_on_scored_tokens_only():
    """6 x body x tokens + 6 x head x scored: the 3B shape's forward + backward of 32,768 tokens with 1,024
    response tokens (bench.py longest), by hand. Counting lm_head on every token would add 6 x 311,164,928 x
    31,744 = 5.9e13 (and 6 N T with all of N = 3,085,938,688: 6.07e14 instead of 5.47e14)."""
    c = bench.FlopParams(body=2774773760, head=311164928, layers=36, hidden=2048)
    assert bench.lm_flops(c, 32768, 1024) == 6 * 2774773760 * 32768 + 6 * 311164928 * 1024 == 547454516723712
    assert bench.lm_flops(SMALL, 11, 6) == 66000 + 3600
    # + attention: 12 x 36 x 2,048 x 32,768^2 / 2 (6 L h S^2)
    assert bench.attention_flops(c, 32768 ** 2 / 2) == 474989023199232


def test_update_flops_by_hand():
    """bench.update_flops (bench.py train's update_MFU) for 1 prompt of P = 5 tokens, n = 2 responses of R = 3
    tokens, 8 patches, on SMALL (body 1,000, head 100, 2 layers x hidden 8, tower 50 per patch, merger 20 per 4
    patches). Packed: one row of 5 + 2 x 3 = 11 tokens, 5 x 6 / 2 + 2 x (3 x 5 + 3 x 4 / 2) = 57 visible pairs, the
    tower once:
        6 x 1,000 x 11 + 6 x 100 x 6 + 12 x 2 x 8 x 57 + 6 x (50 x 8 + 20 x 2) = 66,000 + 3,600 + 10,944 + 2,640
    Unpacked: 2 rows of 8 tokens, 2 x 8 x 9 / 2 = 72 pairs, the tower twice:
        6 x 1,000 x 16 + 3,600 + 12 x 2 x 8 x 72 + 2 x 2,640 = 96,000 + 3,600 + 13,824 + 5,280
    The head only on the 6 response tokens: on every token it would be 6 x 100 x 11 (or 16)."""
    assert bench.update_flops(SMALL, 11, 1, 2, 3, True, 8) == 83184
    assert bench.update_flops(SMALL, 16, 1, 2, 3, False, 8) == 118704
    # a frozen tower: forward only, 2 x (50 x 8 + 20 x 2)
    assert bench.update_flops(SMALL, 11, 1, 2, 3, True, 8, trained_tower=False) == 83184 - 2640 + 880
