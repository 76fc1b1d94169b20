"""
train_sft.py, the SFT stage: the targets it teaches, rows without reasoning, the loss normalisation (by hand,
and its gradient), 2 gloo ranks == 1 rank, exact --resume, and train_grpo.py --init_from continuing from it.
"""
import json
import os
import random
import re
import shutil
from types import SimpleNamespace

import pytest
import torch

import common as C
import policy as P
import train_grpo as T
import train_sft as S
import vlm
from conftest import eval_with_missing_videos, torchrun, write_preset
from data.datasets import Sample


def sft_cfg(run_dir, out, **kw):
    base = dict(out_dir=str(out), data=os.path.join(run_dir, "data", "train.jsonl"),
                eval_data=os.path.join(run_dir, "data", "eval.jsonl"), model=os.path.join(run_dir, "model"),
                num_frames=8, max_pixels=28 * 28, min_pixels=28 * 28, think=False, batch_size=4, micro_batch_size=2,
                lr=1e-3, max_steps=4, eval_every=0, save_every=2, progress=False, gradient_checkpointing=False,
                max_new_tokens=24, eval_batch_size=8)
    base.update(kw)
    return S.Config(**base)


def final_params(out_dir):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(C.latest_checkpoint(out_dir), os.path.join(out_dir, "flat.pt"))
    return torch.load(os.path.join(out_dir, "flat.pt"), weights_only=False)["model"]


def test_targets_by_hand():
    s = Sample(video="v.mp4", problem="What colour?", answer="B", problem_type="multiple_choice",
               reasoning=" the flash was green at 3 seconds\n")
    assert P.target_text(s, "cot", think=True) == \
        "<think> the flash was green at 3 seconds </think> <answer> B </answer>"
    assert P.target_text(s, "cot", think=False) == P.target_text(s, "cot", think=True)  # CoT always reasons
    assert P.target_text(s, "answer", think=True) == "<think> </think> <answer> B </answer>"
    assert P.target_text(s, "answer", think=False) == "<answer> B </answer>"
    letters = {P.target_text(s, "random_letter", False, random.Random(k)) for k in range(40)}
    assert letters == {f"<answer> {x} </answer>" for x in "ABCD"}   # the format warm-up: any letter


def test_rows_without_reasoning_are_skipped_and_a_file_without_any_is_refused():
    rows = [Sample(video="a", problem="q", answer="A", problem_type="multiple_choice", reasoning=r)
            for r in ("because", "", "  ")]
    kept, skipped = S.usable_rows(rows, "cot", "cot.jsonl")
    assert len(kept) == 1 and skipped == 2
    assert S.usable_rows(rows, "answer", "x.jsonl") == (rows, 0)
    with pytest.raises(ValueError, match="x.jsonl: no row has a 'reasoning'"):
        S.usable_rows(rows[1:], "cot", "x.jsonl")
    with pytest.raises(ValueError, match="target"):
        S.check_config(S.Config(target="letters"))


def test_sft_loss_is_the_token_mean_nll_and_its_gradient(tiny_run):
    """Two targets of different lengths: sft_step's loss is -(sum of all target log-probs) / (number of target
    tokens), not the mean of per-sequence means, and one SGD(lr=1) step moves every weight by exactly minus the
    gradient of that hand-written loss."""
    import rollout
    from data.datasets import load_jsonl
    cfg = sft_cfg(tiny_run, "unused", micro_batch_size=1, grad_clip=1e9)
    d = SimpleNamespace(world_size=1, rank=0)
    model, processor = vlm.load_model(cfg.model, "float32")
    policy = C.Root(model)
    samples = load_jsonl(cfg.data)[:2]
    prompts = rollout.prepare_prompts(model, processor, samples, cfg, cfg.think, [])
    texts = [P.target_text(prompts[0].sample, "cot", False), P.target_text(prompts[1].sample, "answer", False)]
    seqs = P.target_seqs(prompts, texts, processor.tokenizer)
    lengths = [len(s.response_ids) for s in seqs]
    assert lengths[0] != lengths[1]
    logp, _, _ = P.sequences_logprobs(policy, seqs, cfg, [])
    hand = -logp.sum() / sum(lengths)                       # token-mean over both targets
    per_seq = -(logp[:lengths[0]].mean() + logp[lengths[0]:].mean()) / 2
    assert abs(hand.item() - per_seq.item()) > 1e-3         # the two normalisations differ here
    model.zero_grad()
    hand.backward()
    expect = {n: p.detach() - p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    res = P.sft_step(policy, torch.optim.SGD(model.parameters(), lr=1.0), seqs, cfg, d, [])
    assert res["loss"] == pytest.approx(hand.item(), rel=1e-5)
    assert res["tokens"] == sum(lengths) and not res["skipped"]
    for n, p in model.named_parameters():
        assert torch.allclose(p.detach(), expect[n], atol=1e-5), n
    assert P.sft_nll(policy, seqs, cfg, []) < res["loss"]   # after the step the same targets are likelier


def test_sft_learns_the_targets(tiny_run, tmp_path, monkeypatch):
    """The held-out loss falls; each evaluation (loss + greedy accuracy) decodes every held-out video once."""
    import rollout
    decoded, load_video = [], rollout.load_video
    monkeypatch.setattr(rollout, "load_video", lambda path, *a, **k: decoded.append(path) or load_video(path, *a, **k))
    res = S.main(sft_cfg(tiny_run, tmp_path / "run", max_steps=12, lr=1e-2, eval_max_samples=8))
    first = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    assert res["curve"][-1]["eval_loss"] < res["curve"][0]["eval_loss"] * 0.6   # held-out targets: 5.96 -> 2.75
    assert first["tokens"] > 4 * 10                          # reasoning + answer + eos for each of 4 rows
    held_out = [json.loads(line)["video"] for line in open(os.path.join(tiny_run, "data", "eval.jsonl"))][:8]
    assert len(res["curve"]) == 2 and res["curve"][-1]["num_scored"] == 8
    decoded = [os.path.relpath(v, os.path.join(tiny_run, "data")) for v in decoded]   # the rows' paths, resolved
    assert sorted(v for v in decoded if v in held_out) == sorted(held_out * 2)   # 2 evaluations, once each


def rows(path):
    return [{k: v for k, v in json.loads(x).items() if k != "time_step"} for x in open(path)]


def test_sft_resume_continues_exactly(tiny_run, tmp_path):
    """2 steps, then --resume --max_steps=4 == 4 steps straight: weights, metrics and the learning curve (the first
    run's last evaluation, at step 2, is in its checkpoint)."""
    common = dict(eval_every=2, eval_max_samples=4)
    straight = S.main(sft_cfg(tiny_run, tmp_path / "a", max_steps=4, **common))
    S.main(sft_cfg(tiny_run, tmp_path / "b", max_steps=2, **common))
    resumed = S.main(sft_cfg(tiny_run, tmp_path / "b", max_steps=4, resume=True, **common))
    assert rows(tmp_path / "a" / "metrics.jsonl") == rows(tmp_path / "b" / "metrics.jsonl")
    assert [c["step"] for c in resumed["curve"]] == [0, 2, 4] and straight["curve"] == resumed["curve"]
    pa, pb = final_params(str(tmp_path / "a")), final_params(str(tmp_path / "b"))
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


def test_sft_stop_past_the_last_checkpoint_logs_each_step_once(tiny_run, tmp_path):
    """Stopped after logging step 4 but before saving it: --resume goes on from step 2 and metrics.jsonl holds
    each step once, as in the run that never stopped."""
    S.main(sft_cfg(tiny_run, tmp_path / "run", max_steps=4, eval_data=""))   # checkpoints at steps 2 and 4
    straight = rows(tmp_path / "run" / "metrics.jsonl")
    shutil.rmtree(tmp_path / "run" / "step_00000004")
    S.main(sft_cfg(tiny_run, tmp_path / "run", max_steps=4, eval_data="", resume=True))
    assert rows(tmp_path / "run" / "metrics.jsonl") == straight


def test_sft_refuses_an_old_runs_folder_without_resume(tiny_run, tmp_path):
    (tmp_path / "old" / "step_00000002").mkdir(parents=True)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'old'} already holds a run") + ".*--resume=True"):
        S.main(sft_cfg(tiny_run, tmp_path / "old", max_steps=1))


def test_sft_reports_skipped_eval_videos_and_names_a_too_small_dataset(tiny_run, tmp_path, capsys):
    S.main(sft_cfg(tiny_run, tmp_path / "run", max_steps=1, eval_data=eval_with_missing_videos(tiny_run, tmp_path)))
    out = capsys.readouterr().out
    assert "(2 videos, 2 skipped)" in out and "eval step1: 2 of 4 held-out videos skipped" in out
    assert json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())["eval_skipped"] == 2
    train = os.path.join(tiny_run, "data", "train.jsonl")   # 16 rows
    with pytest.raises(ValueError, match=re.escape(f"{train} with --batch_size=32: 16 rows, fewer than one")):
        S.main(sft_cfg(tiny_run, tmp_path / "big", max_steps=1, batch_size=32))


def test_sft_counts_and_reports_embeddings_cache_misses(tiny_run, tmp_path, capsys):
    """A cache that holds none of the videos (a typo, another cache): each step's misses are logged as
    cache_misses (as train_grpo.py does) and said once."""
    res = S.main(sft_cfg(tiny_run, tmp_path / "run", max_steps=2, eval_data="", freeze_vision=True,
                         embeddings_cache=str(tmp_path / "no_such_cache")))
    assert [r["cache_misses"] for r in rows(tmp_path / "run" / "metrics.jsonl")] == [4, 4] and res["cache_misses"] == 8
    out = capsys.readouterr().out
    assert out.count("not in the embeddings cache") == 1 and str(tmp_path / "no_such_cache") in out


def test_sft_on_two_gloo_ranks_equals_one_rank(tiny_run, tmp_path):
    """The same global batch of 4 rows on 1 process and on 2 (2 rows each, FSDP2 over gloo): equal losses and
    weights (the token count in the normaliser is global, so ragged targets weigh the same on either)."""
    one = sft_cfg(tiny_run, tmp_path / "one", max_steps=2, eval_data="")
    S.main(one)
    two = sft_cfg(tiny_run, tmp_path / "two", max_steps=2, eval_data="")
    assert "dp 2 x sp 1" in torchrun("train_sft.py", [write_preset(two, tmp_path / "two.py")])
    la = [json.loads(x)["loss"] for x in open(tmp_path / "one" / "metrics.jsonl")]
    lb = [json.loads(x)["loss"] for x in open(tmp_path / "two" / "metrics.jsonl")]
    assert lb == pytest.approx(la, rel=1e-5)
    pa, pb = final_params(str(tmp_path / "one")), final_params(str(tmp_path / "two"))
    for k in pa:
        assert torch.allclose(pa[k], pb[k], atol=1e-5), k


def test_grpo_init_from_continues_from_the_sft_weights(tiny_run, tmp_path):
    """train_grpo.py --init_from=<SFT run> starts from the SFT stage's weights: its step-0 held-out answers are
    the SFT run's final ones, its reference model (kl_beta > 0) starts there too (the first update's KL is 0; from
    the base model it would not be), and a fresh model given the same checkpoint has its exact weights."""
    sft = S.main(sft_cfg(tiny_run, tmp_path / "sft", max_steps=6, lr=1e-2, eval_max_samples=8))
    grpo = T.Config(out_dir=str(tmp_path / "grpo"), data=os.path.join(tiny_run, "data", "train.jsonl"),
                    eval_data=os.path.join(tiny_run, "data", "eval.jsonl"), model=os.path.join(tiny_run, "model"),
                    init_from=str(tmp_path / "sft"), num_frames=8, max_pixels=28 * 28, min_pixels=28 * 28,
                    think=False, rollout_batch_size=4, n=4, max_new_tokens=24, lr=1e-3, max_steps=1, eval_every=0,
                    save_every=0, progress=False, gradient_checkpointing=False, eval_batch_size=8,
                    eval_max_samples=8, kl_beta=0.1)
    res = T.main(grpo)
    assert json.loads(open(tmp_path / "grpo" / "metrics.jsonl").readline())["kl"] == pytest.approx(0.0, abs=1e-7)
    before = [json.loads(x)["response"] for x in open(tmp_path / "grpo" / "eval_step0.jsonl")]
    after_sft = [json.loads(x)["response"] for x in open(tmp_path / "sft" / "eval_step6.jsonl")]
    assert before == after_sft and res["before"] == sft["after"]
    model, _ = vlm.load_model(os.path.join(tiny_run, "model"), "float32")
    C.load_model_weights(str(tmp_path / "sft"), model)
    saved = final_params(str(tmp_path / "sft"))
    for n, p in model.state_dict().items():
        assert torch.equal(p, saved[n]), n
    with pytest.raises(ValueError, match="neither a checkpoint folder"):
        C.load_model_weights(str(tmp_path / "grpo"), model)


def test_fewer_held_out_rows_than_ranks(tiny_run, tmp_path):
    """One held-out row on 2 gloo ranks: rank 1 has none, yet FSDP2 needs it in every forward (the held-out loss
    and each greedy batch): it runs a placeholder clip at weight 0, and the held-out loss and accuracy equal one
    process's. Before, rank 1 failed on an empty batch (and the greedy eval hung)."""
    kw = dict(max_steps=1, save_every=0, eval_max_samples=1, eval_batch_size=1)
    S.main(sft_cfg(tiny_run, tmp_path / "one", **kw))
    torchrun("train_sft.py", [write_preset(sft_cfg(tiny_run, tmp_path / "two", **kw), tmp_path / "two.py")])
    one, two = (json.loads(open(tmp_path / r / "metrics.jsonl").readlines()[-1]) for r in ("one", "two"))
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    assert two["eval_accuracy"] == one["eval_accuracy"]
