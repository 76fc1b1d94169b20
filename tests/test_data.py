"""
data/datasets.py, data/synthetic.py, data/tiny.py: validation errors, loader sharding and resume, the synthetic
task's answer living only in the video, tiny models loadable with from_pretrained.
    python -m pytest tests/test_data.py -q
"""
import json
import os

import numpy as np
import pytest

from data.datasets import Loader, format_question, load_jsonl, parse_row
from data.synthetic import COLOURS, SyntheticConfig, make_dataset
from data.video import sample_frames


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


GOOD = {"video": "a.mp4", "problem": "What?", "options": ["A. x", "B. y"], "answer": "B",
        "problem_type": "multiple_choice", "category": "Temporal"}


def test_load_resolves_paths_and_aliases(tmp_path):
    long_video_reason = {"videos": "clips/b.mp4", "problem": "Why?", "solution": "<answer> C </answer>",
                         "reasoning": "because", "options": ["A. 1", "B. 2", "C. 3", "D. 4"]}
    path = write_rows(tmp_path / "d.jsonl", [GOOD, long_video_reason, {**GOOD, "video": "/abs/c.mp4"}])
    a, b, c = load_jsonl(path)
    assert a.video == str(tmp_path / "a.mp4") and a.answer == "B" and a.category == "Temporal"
    assert b.video == str(tmp_path / "clips/b.mp4") and b.answer == "C" and b.problem_type == "multiple_choice"
    assert b.reasoning == "because" and c.video == "/abs/c.mp4"
    assert format_question(a) == "What?\nOptions:\nA. x\nB. y"


@pytest.mark.parametrize("row, message", [
    ({k: v for k, v in GOOD.items() if k != "answer"}, "missing field 'answer'"),
    ({k: v for k, v in GOOD.items() if k != "problem"}, "missing field 'problem'"),
    ({**GOOD, "problem_type": "essay"}, "field 'problem_type' is 'essay'"),
    ({**GOOD, "options": "A. x"}, "field 'options'"),
    ({"video": "a.mp4", "problem": "How long?", "answer": "3 minutes"}, "missing field 'problem_type'"),
    ({**GOOD, "answer": "E"}, "field 'answer' 'E' is neither an option letter nor one of 'options'"),
    ({"video": "a.mp4", "problem": "How many?", "answer": "three", "problem_type": "numerical"},
     "field 'answer' 'three' is not a number"),   # found at load time, not by the rewards hours into a run
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
])
def test_validation_errors_name_file_line_and_field(tmp_path, row, message):
    path = write_rows(tmp_path / "bad.jsonl", [GOOD, row])
    with pytest.raises(ValueError) as err:
        load_jsonl(path)
    assert f"{path}:2" in str(err.value) and message in str(err.value)


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + json.dumps({**GOOD, "problem": "Caf\u00e9?"},
                                                                    ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match=f"{path}:2: not UTF-8 text"):
        load_jsonl(str(path))


def test_missing_video_is_an_error_only_when_checked(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [GOOD])
    assert len(load_jsonl(path)) == 1  # skipped and counted later, at use time
    with pytest.raises(ValueError, match=r"d.jsonl:1: field 'video': file not found"):
        load_jsonl(path, check_videos=True)
    with pytest.raises(ValueError, match="dataset file not found"):
        load_jsonl(str(tmp_path / "nope.jsonl"))


def test_loader_shards_by_dp_rank_and_restores(tmp_path):
    samples = [parse_row({**GOOD, "problem": str(i)}, f"x:{i}", "/") for i in range(10)]
    a, b = Loader(samples, 2, 0, 2, seed=3), Loader(samples, 2, 1, 2, seed=3)
    seen = []
    for _ in range(5):  # 2 epochs of 4 global batches of 4 (the ragged end of each epoch is dropped)
        x, y = a.next_batch(), b.next_batch()
        assert not {s.problem for s in x} & {s.problem for s in y}  # ranks never share a prompt in a batch
        seen += [s.problem for s in x + y]
    assert len(set(seen[:8])) == 8
    state = a.state()
    after = [s.problem for s in a.next_batch()]
    c = Loader(samples, 2, 0, 2, seed=3)
    c.restore(state)
    assert [s.problem for s in c.next_batch()] == after
    with pytest.raises(ValueError, match="fewer than one global batch"):
        Loader(samples[:3], 2, 0, 2)
    with pytest.raises(ValueError, match=r"train.jsonl with --batch_size=4: 3 rows, fewer than one global batch"):
        Loader(samples[:3], 2, 0, 2, what="train.jsonl with --batch_size=4")   # the file and the setting named


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    cfg = SyntheticConfig(out=str(d / "a"), num_train=12, num_eval=8, frames=24, fps=8.0, size=28, seed=1)
    return cfg, make_dataset(cfg)


def test_synthetic_answer_is_in_the_video(synth):
    cfg, (train, held_out) = synth
    names = list(COLOURS)
    for path in (train, held_out):
        rows = [json.loads(line) for line in open(path)]
        for row in rows:
            video = sample_frames(os.path.join(cfg.out, row["video"]), num_frames=cfg.frames, min_pixels=28 * 28,
                                  max_pixels=28 * 28)
            means = video.frames.reshape(len(video.frames), -1, 3).mean(1)  # per-frame mean colour
            colour = np.array(COLOURS[names["ABCD".index(row["answer"])]])
            near = np.abs(means - colour).max(1) < 40
            assert 3 <= near.sum() <= cfg.flash_frames + 1  # the flash is there, short, and of the answer's colour
            start = int(np.argmax(near))
            assert abs(start / cfg.fps - row["flash_start_s"]) <= 1.0 / cfg.fps
        assert all(r["options"] == ["A. red", "B. green", "C. blue", "D. yellow"] for r in rows)
    held = [json.loads(line)["answer"] for line in open(held_out)]
    assert sorted(held) == sorted("ABCD" * (len(held) // 4))  # balanced: a constant answer scores 25%


def test_synthetic_is_deterministic_and_leak_control_decorrelates(synth, tmp_path):
    cfg, (train, _) = synth
    again = SyntheticConfig(**{**cfg.__dict__, "out": str(tmp_path / "b")})
    train2, _ = make_dataset(again)
    assert open(train).read() == open(train2).read()
    for name in ("train/00000.mp4", "eval/00003.mp4"):
        a = sample_frames(os.path.join(cfg.out, name), num_frames=cfg.frames, min_pixels=784, max_pixels=784).frames
        b = sample_frames(os.path.join(again.out, name), num_frames=cfg.frames, min_pixels=784, max_pixels=784).frames
        # bit-exact is the norm (write_video encodes on one thread); in 1 of ~30 runs under 4 busy loops a decoded
        # frame still differed slightly (cause not found), so the test asks for equal content within codec noise:
        # another seed differs by ~60 grey levels on average (measured)
        assert np.abs(a.astype(np.int16) - b).mean() < 1.0
    leak = SyntheticConfig(**{**cfg.__dict__, "out": str(tmp_path / "c"), "leak_control": True, "num_train": 40})
    rows = [json.loads(line) for line in open(make_dataset(leak)[0])]
    names, agree = list(COLOURS), 0
    for row in rows:
        frames = sample_frames(os.path.join(leak.out, row["video"]), num_frames=leak.frames, min_pixels=784,
                               max_pixels=784).frames
        means = frames.reshape(len(frames), -1, 3).mean(1)
        shown = min(range(4), key=lambda k: np.abs(means - np.array(COLOURS[names[k]])).max(1).min())
        agree += "ABCD"[shown] == row["answer"]
    assert agree < 0.6 * len(rows)  # about 25% when the shown colour is independent of the answer


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_tiny_model_loads_like_a_checkpoint(tmp_path, family):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from data.tiny import SPECIAL_TOKENS, TAG_TOKENS, make_tiny_model
    path = make_tiny_model(str(tmp_path / family), family)
    model = AutoModelForImageTextToText.from_pretrained(path)
    proc = AutoProcessor.from_pretrained(path)
    assert model.config.model_type == family
    tok = proc.tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert all(len(tok.encode(t, add_special_tokens=False)) == 1 for t in TAG_TOKENS)
    assert model.config.text_config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    text = model.config.text_config
    section = text.rope_parameters["mrope_section"]
    assert sum(section) == (getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads) // 2
    assert model.config.vision_config.out_hidden_size == text.hidden_size
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "q"}]}]
    rendered = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n") and "<|vision_start|><|video_pad|><|vision_end|>" in rendered
