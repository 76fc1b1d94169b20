"""
Supervised fine-tuning on video QA rows with their reasoning: the first stage of Long-RL's recipe (LongVILA-R1
was trained with chain-of-thought SFT, then RL), as one explicit loop over the same policy as train_grpo.py
(policy.py: FSDP2, Ulysses SP, checkpoint modes, embeddings cache, response-only log-probs).

    python train_sft.py config/tiny_cpu_sft.py                          # CPU demo: CoT rows of the synthetic task
    torchrun --standalone --nproc_per_node=8 train_sft.py config/qwen2_5_vl_3b_sft.py --data=cot.jsonl
    python train_grpo.py config/tiny_cpu_from_sft.py                    # RL continues: --init_from=runs/tiny_sft
    python train_sft.py --help                                          # every config field

Rows: data/datasets.py's format with a "reasoning" field (data/make_reason_data.py's train.jsonl / cot.jsonl,
LongVideo-Reason's CoT set). The target (policy.target_text) is "<think> reasoning </think> <answer> X </answer>"
and eos after the chat template's assistant turn; --target=answer drops the reasoning. With target=cot a row
without reasoning is skipped and counted (all of them: an error naming the file).
One step: the next rows -> prompts (a video that does not load is skipped and refilled, rollout.next_prompts) ->
target responses -> policy.sft_step: token-mean negative log-likelihood of the target tokens, computed at those
positions only (never full-vocabulary logits over the video). Every eval_every steps: the held-out loss (the
same targets for the eval rows) and greedy answer accuracy. Checkpoints are atomic and --resume is exact; the
run folder is what `train_grpo.py --init_from=` starts from and what `merge.py --checkpoint=` turns into a
Hugging Face folder.
"""
import json
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import rollout
import vlm
from common import (MetricsLog, exit_distributed, finite, latest_checkpoint, load_checkpoint, plot_curve, print0,
                    save_checkpoint)
from configurator import parse_config
from data.datasets import Loader, load_jsonl
from policy import (PolicyConfig, build_policy, placeholder_seq, sft_nll, sft_step, start_run, target_seqs,
                    target_text)
from sp import dp_all_reduce


@dataclass
class Config(PolicyConfig):  # the model and how it is held: policy.py; frames: data/video.py
    # I/O
    out_dir: str = "runs/sft"           # checkpoints, metrics.jsonl, eval predictions, learning curve
    resume: bool = False                # continue from the newest complete checkpoint in out_dir
    save_every: int = 100               # steps between checkpoints (and one at the end); 0 = only at the end
    keep_last: int = 2                  # checkpoints kept on disk
    # data
    data: str = ""                      # training jsonl with a "reasoning" field (data/datasets.py format)
    eval_data: str = ""                 # held-out jsonl: loss on its targets and greedy answer accuracy
    target: str = "cot"                 # cot (<think> reasoning </think> <answer> X </answer>) | answer (no reasoning)
    synthetic: bool = False             # make the synthetic flash-colour task (rows with reasoning) and a tiny model
    synthetic_frames: int = 64          # synthetic: frames per video
    synthetic_flash: int = 8            # synthetic: frames the colour flash lasts
    synthetic_train: int = 1024         # synthetic: training videos
    synthetic_eval: int = 256           # synthetic: held-out videos (balanced answers)
    synthetic_leak_control: bool = False  # synthetic: flash colour independent of the answer (must stay at chance)
    # optimization (model, lr, weight decay, beta2, clipping, micro-batch size: policy.PolicyConfig)
    lr: float = 1e-5                    # AdamW learning rate (LongVILA-R1's SFT stage: 1e-5; RL uses 1e-6)
    batch_size: int = 32                # rows per optimizer step, over all data-parallel ranks
    max_steps: int = 200                # optimizer steps
    warmup_steps: int = 0               # linear learning-rate warm-up
    # evaluation and logging
    eval_every: int = 50                # steps between held-out evaluations (0 = only before and after)
    eval_batch_size: int = 64           # prompts per eval generation batch
    eval_max_samples: int = 0           # evaluate on at most this many held-out rows (0 = all)
    max_new_tokens: int = 256           # eval: answer length cap (the reasoning must fit)
    progress: bool = True               # tqdm bars
    tensorboard: bool = False           # also log to out_dir/tb
    wandb_project: str = ""             # also log to Weights & Biases


def check_config(cfg: Config, dp_size: int = 1):
    if cfg.target not in ("cot", "answer"):
        raise ValueError(f"target {cfg.target!r}: choose cot or answer")
    if cfg.batch_size % dp_size:
        raise ValueError(f"batch_size {cfg.batch_size} must divide by the {dp_size} data-parallel ranks")
    if cfg.embeddings_cache and not cfg.freeze_vision:
        raise ValueError("--embeddings_cache holds outputs of a frozen vision tower: set --freeze_vision=true")


def usable_rows(samples: list, target: str, path: str) -> tuple:
    """(rows that have what the target needs, how many were skipped). target=cot needs a reasoning; a file in which
    no row has one is an error naming it."""
    if target != "cot":
        return samples, 0
    kept = [s for s in samples if s.reasoning.strip()]
    if not kept:
        raise ValueError(f"{path}: no row has a 'reasoning' field, which --target=cot trains on (use --target=answer "
                         "to teach answers alone, or make CoT rows with data/make_reason_data.py)")
    return kept, len(samples) - len(kept)


def main(cfg: Config):
    # checks, torchrun, seeds, out_dir, the inputs (synthetic=True: the CPU demo's, made in out_dir), SP groups
    d, spi, data_file, eval_file, model_path = start_run(cfg, check_config)
    if not data_file or not model_path:
        raise ValueError("give --data and --model (or --synthetic=true for the CPU demo)")
    per_rank = cfg.batch_size // spi.dp_size
    print0(f"world {d.world_size} ({d.device}) = dp {spi.dp_size} x sp {cfg.sp_size}, {per_rank} rows per "
           f"data-parallel rank per step, target {cfg.target}")
    with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
        json.dump({**cfg.__dict__, "resolved": {"data": data_file, "eval_data": eval_file, "model": model_path}},
                  f, indent=1)

    model, processor, policy, _, optimizer, attention = build_policy(cfg, model_path, d, spi)
    suppress = vlm.suppress_ids(model, processor)
    train, skipped_rows = usable_rows(load_jsonl(data_file), cfg.target, data_file)
    held_out = usable_rows(load_jsonl(eval_file), cfg.target, eval_file)[0] if eval_file else []
    held_out = held_out[:cfg.eval_max_samples] if cfg.eval_max_samples else held_out
    if skipped_rows:
        print0(f"{data_file}: {skipped_rows} rows without reasoning skipped ({len(train)} kept)")
    loader = Loader(train, per_rank, spi.dp_rank, spi.dp_size, cfg.seed,
                    f"{data_file} with --batch_size={cfg.batch_size}")
    start_step, curve, skipped_total, misses_total = 0, [], 0, 0
    last = latest_checkpoint(cfg.out_dir) if cfg.resume else None
    if last:
        state = load_checkpoint(last, model, optimizer)
        loader.restore(state["loader"])
        start_step, curve, skipped_total = state["step"], state["curve"], state["skipped"]
        print0(f"resumed from {last} at step {start_step}")

    def evaluate(tag: str) -> dict:
        """Held-out loss on the eval rows' targets (each data-parallel rank its share), then greedy accuracy."""
        policy.eval()
        mine, skipped = held_out[spi.dp_rank::spi.dp_size], []
        prompts = rollout.prepare_prompts(model, processor, mine, cfg, cfg.think, skipped, cfg.embeddings_cache)
        texts = [target_text(p.sample, cfg.target, cfg.think) for p in prompts]
        vlm.use_attention(model, attention["train"])
        loss = sft_nll(policy, target_seqs(prompts, texts, processor.tokenizer), cfg, suppress, spi,
                       fallback=None if prompts else placeholder_seq(model, processor, cfg))  # rows < ranks
        vlm.use_attention(model, attention["rollout"])
        # without SP a data-parallel rank is a rank, and its rows are the ones it answers: decoded once, here
        ev = rollout.evaluate_all(policy, processor, held_out, cfg, None, tag, cfg.out_dir,
                                  (prompts, skipped) if spi.sp_size == 1 else None)
        return {"eval_loss": loss, **ev}

    if held_out and not last:
        ev = evaluate("step0")
        curve.append({"step": 0, **ev})
        print0(f"held-out before SFT: loss {ev['eval_loss']:.3f}, accuracy {ev['accuracy']:.3f}, "
               f"format {ev['format']:.3f} ({ev['num_scored']} videos, {ev['skipped']} skipped)")
    log = MetricsLog(cfg.out_dir, d.is_main, cfg.tensorboard, cfg.wandb_project, cfg.__dict__, start_step)
    bar = tqdm(range(start_step, cfg.max_steps), desc="sft", disable=not (cfg.progress and d.is_main),
               initial=start_step, total=cfg.max_steps)
    for step in bar:
        t0 = time.time()
        skipped, misses = [], []  # misses: videos with no embeddings-cache entry (decoded live, tower run)
        prompts = rollout.next_prompts(loader, per_rank, model, processor, cfg, data_file, skipped, misses)
        seqs = target_seqs(prompts, [target_text(p.sample, cfg.target, cfg.think) for p in prompts],
                           processor.tokenizer)
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        policy.train()
        vlm.use_attention(model, attention["train"])
        res = sft_step(policy, optimizer, seqs, cfg, d, suppress, spi)
        vlm.use_attention(model, attention["rollout"])
        skipped_total += int(dp_all_reduce(torch.tensor([len(skipped)]), spi)[0])
        for line in skipped:
            print(f"[rank {d.rank}] skipped sample: {line}")
        metrics = {"step": step + 1, **res, "lr": lr, "skipped_samples": skipped_total,
                   "time_step": round(time.time() - t0, 4)}
        if cfg.embeddings_cache:  # as train_grpo.py logs them; said once, at the first step that has any
            metrics["cache_misses"] = int(dp_all_reduce(torch.tensor([len(misses)]), spi)[0])
            if metrics["cache_misses"] and not misses_total:
                print0(f"warning: step {step + 1}: {metrics['cache_misses']} videos not in the embeddings cache "
                       f"{cfg.embeddings_cache} (decoded live, tower run; cache_misses in metrics.jsonl)")
            misses_total += metrics["cache_misses"]
        # the last step's evaluation too, before its checkpoint: a run extended with --resume keeps it in its curve
        if held_out and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.max_steps):
            ev = evaluate(f"step{step + 1}")
            curve.append({"step": step + 1, **ev})
            metrics.update(eval_loss=ev["eval_loss"], eval_accuracy=ev["accuracy"], eval_skipped=ev["skipped"])
        log.write(metrics, step + 1)
        bar.set_postfix(loss=f"{res['loss']:.3f}")
        if (cfg.save_every > 0 and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.max_steps:
            save_checkpoint(cfg.out_dir, step + 1, finite(model, "checkpointed"), optimizer,
                            {"loader": loader.state(), "curve": curve, "skipped": skipped_total}, cfg.keep_last)
    result = {"steps": cfg.max_steps, "skipped_samples": skipped_total}
    if cfg.embeddings_cache:
        result["cache_misses"] = misses_total  # (this run's steps: not those before a --resume)
    # the final evaluation ran in the loop; here only if no step ran and the resumed checkpoint's curve lacks it
    if held_out and (not curve or curve[-1]["step"] != cfg.max_steps):
        ev = evaluate(f"step{cfg.max_steps}")
        curve.append({"step": cfg.max_steps, **ev})
    if curve:
        result.update(before=curve[0]["accuracy"], after=curve[-1]["accuracy"], curve=curve)
        print0(f"held-out: loss {curve[0]['eval_loss']:.3f} -> {curve[-1]['eval_loss']:.3f}, accuracy "
               f"{curve[0]['accuracy']:.3f} (step {curve[0]['step']}) -> {curve[-1]['accuracy']:.3f} "
               f"(step {curve[-1]['step']}); skipped samples: {skipped_total}")
        if d.is_main:
            plot_curve(curve, os.path.join(cfg.out_dir, "learning_curve.png"))
    log.close()
    return result


if __name__ == "__main__":
    main(parse_config(Config))
    exit_distributed()
