"""
data/make_reason_data.py: clip spans, the whole pipeline (tiny local captioner + a loopback
OpenAI-compatible server for questions), resume after a stop, a crash and a torn line, malformed replies and a
down endpoint, the difficulty filter.
    python -m pytest tests/test_make_reason_data.py -q
"""
import base64
import io
import json
import re
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

import rollout
from data import make_reason_data as mrd
from data.datasets import load_jsonl
from data.rewards import extract_answer, format_reward
from data.tiny import make_tiny_model
from data.video import write_video


class Server:
    """OpenAI-compatible /v1/chat/completions on 127.0.0.1. Image parts -> a caption naming the frames received
    (decoded with PIL); text -> one question built from the time-stamped captions it was sent, correct option
    "ABCD"[clips % 4]. `bad` maps a category to a misbehaviour: garbage_once (then valid on the retry), missing
    (no reasoning), letter (answer E)."""

    def __init__(self, bad=None):
        self.bad, self.calls, outer = bad or {}, Counter(), self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                ok = self.path == "/v1/chat/completions" and self.headers.get("Authorization") == "Bearer sk-t"
                body = json.dumps({"choices": [{"message": {"role": "assistant", "content": outer.answer(req)}}]}
                                  if ok else {"error": "unauthorized"}).encode()
                self.send_response(200 if ok else 401)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def answer(self, req):
        parts = req["messages"][-1]["content"]
        if isinstance(parts, list):
            imgs = [Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",")[1])))
                    for p in parts if p["type"] == "image_url"]
            self.calls["caption"] += 1
            return f"{len(imgs)} frames of {imgs[0].size[0]}x{imgs[0].size[1]}"
        user, retry = req["messages"][1]["content"], len(req["messages"]) > 2
        cat, spans = re.search(r'category "([^"]+)"', user).group(1), re.findall(r"^\[(\S+)-(\S+)\] ", user, re.M)
        self.calls[cat] += 1
        n, key = len(spans), "ABCD"[len(spans) % 4]
        q = {"question": f"{cat}: what changes from {spans[0][0]} to {spans[-1][1]} over {n} clips?",
             "options": [f"{L}. {'right' if L == key else 'wrong ' + L} {n}" for L in "ABCD"], "answer": key,
             "reasoning": f"At {spans[0][0]} the scene starts.\nBy {spans[-1][1]} it has changed."}
        mode = self.bad.get(cat)
        if mode == "garbage_once" and not retry:
            return "Sure! Here are your questions."
        q.pop("reasoning") if mode == "missing" else q.update(answer="E" if mode == "letter" else key)
        return "<think>hmm</think>```json\n" + json.dumps({"questions": [q]}) + "\n```"


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "sk-t")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    servers = []
    yield lambda **kw: servers.append(Server(**kw)) or servers[-1]
    for s in servers:
        s.server.shutdown()
        s.server.server_close()


def dead_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: connection refused
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """a.mp4: 20 s at 4 fps, frame i uniformly grey 2*i (4 clips of 5 s); sub/b.mp4: 11 s (2 clips: the 1-s tail
    joins the last); broken.mp4: not a video; notes.txt: ignored."""
    d = tmp_path_factory.mktemp("videos")
    (d / "sub").mkdir()
    write_video(str(d / "a.mp4"), (np.full((56, 56, 3), 2 * i, np.uint8) for i in range(80)), fps=4, gop=8)
    write_video(str(d / "sub" / "b.mp4"), (np.full((56, 56, 3), 100, np.uint8) for _ in range(44)), fps=4)
    (d / "broken.mp4").write_bytes(b"not a video at all" * 10)
    (d / "notes.txt").write_text("ignored")
    return str(d)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny")), "qwen2_5_vl", seed=0)


def config(out, videos, **kw):
    return mrd.Config(**{**dict(videos=videos, out=str(out), clip_seconds=5.0, frames_per_clip=4,
                                caption_backend="openai", caption_model="cm", caption_batch_size=2,
                                caption_api_key_env="FAKE_KEY", question_model="qm", question_api_key_env="FAKE_KEY",
                                timeout_s=5.0, retry_backoff_s=0.0, eval_fraction=0.0, progress=False), **kw})


def lines(path):
    return [json.loads(x) for x in open(path).read().splitlines()] if path.exists() else []


def test_clip_spans():  # (the frames inside the spans: data/video.py's sample_windows, in tests/test_video.py)
    assert mrd.clip_spans(20.0, 5) == [(0, 5), (5, 10), (10, 15), (15, 20)]
    assert mrd.clip_spans(11.0, 5) == [(0, 5), (5, 11)] and mrd.clip_spans(13, 5)[-1] == (10, 13)
    assert mrd.clip_spans(3.0, 5) == [(0, 3)]


@pytest.mark.parametrize("reply, problem", [
    ("no json here", "no JSON"), ('{"questions": [{"question": "q"', "no JSON"), ("{'a': 1}", "bad JSON"),
    ('{"questions": []}', "wrong count"),
    ('{"question": "q", "options": ["a", "b", "c", "d"], "answer": "A"}', "missing field: reasoning"),
    ('{"question": "q", "options": ["a", "b", "c"], "answer": "A", "reasoning": "r"}', "bad options"),
    ('{"question": "q", "options": ["a", "b", "b", "d"], "answer": "A", "reasoning": "r"}', "bad options"),
    ('{"question": "q", "options": ["B. a", "A. b", "c", "d"], "answer": "A", "reasoning": "r"}', "bad options"),
    ('{"question": "q", "options": ["a", "b", "c", "d"], "answer": "E", "reasoning": "r"}', "bad answer"),
    ('{"question": "q", "options": ["a", "b", "c", "d"], "answer": "A", "reasoning": "so option B"}', "bad reasoning"),
    ('{"question": "q", "options": ["a", "b", "c", "d"], "answer": "A", "reasoning": "<answer>A</answer>"}',
     "bad reasoning"),
])
def test_malformed_replies_are_named(reply, problem):
    assert mrd.parse_reply(reply, 1)[0] is None and mrd.parse_reply(reply, 1)[1].startswith(problem)
    good = '<think>{x}</think> {"question": "q", "options": ["A. a", "(B) b", "c", "d"], "answer": "(b)", ' \
           '"reasoning": ["s1", "s2"]}'
    assert mrd.parse_reply(good, 1) == ([{"question": "q", "options": ["a", "b", "c", "d"], "answer": "B",
                                          "reasoning": "s1\ns2"}], "")


def test_json_between_bracketed_prose():
    """The first JSON value of the expected shape is taken: prose with brackets before or after it is no error."""
    q = {"question": "q", "options": ["a", "b", "c", "d"], "answer": "A", "reasoning": "r"}
    want = ([{**q, "options": ["a", "b", "c", "d"]}], "")
    fenced = "```json\n" + json.dumps({"questions": [q]}) + "\n```"
    assert mrd.parse_reply(fenced + "\nNote: exactly one option [A-D] is correct.", 1) == want
    assert mrd.parse_reply("<think>{x}</think> As asked {in JSON}, [1] question:\n" + fenced + " {done}", 1) == want
    assert mrd.parse_reply("Here: " + json.dumps([q]) + " (see [1])", 1) == want


def test_pipeline_local_captions_resume_and_output(tmp_path, videos, tiny, server, monkeypatch):
    srv, out = server(), tmp_path / "out"
    calls, crash_at, real = [], [0], rollout.hf_generate

    def counting(model, processor, prompts, **kw):
        calls.append(len(prompts))
        if len(calls) == crash_at[0]:
            raise RuntimeError("killed")
        return real(model, processor, prompts, **kw)
    monkeypatch.setattr(rollout, "hf_generate", counting)
    cfg = lambda **kw: config(out, videos, caption_backend="local", caption_model=tiny, caption_max_tokens=6,
                              question_base_url=srv.url, **kw)
    r = mrd.main(cfg(max_clips=3))  # a stop after 3 of the 6 clips: no video is complete, nothing is asked
    assert sum(calls) == 3 and r["unreadable_videos"] == 1 and r["videos_waiting_for_captions"] == 2
    assert len(lines(out / "captions.jsonl")) == 3 and not srv.calls
    calls.clear(), crash_at.__setitem__(0, 2)
    with pytest.raises(RuntimeError, match="killed"):  # a crash in the 2nd batch: the 1st batch's 2 clips stay
        mrd.main(cfg())
    with open(out / "captions.jsonl", "a") as f:
        f.write('{"clip": "sub/b.mp4@5.0')  # killed while writing a line
    calls.clear(), crash_at.__setitem__(0, 0)
    r = mrd.main(cfg(eval_fraction=0.5))
    caps = lines(out / "captions.jsonl")
    assert calls == [1] and len(caps) == 6 and len({c["clip"] for c in caps}) == 6  # only the missing clip
    assert r["units_ok"] == 8 and sum(srv.calls.values()) == 8  # 2 videos x 4 categories, one request each
    clips = {"a.mp4": 4, "sub/b.mp4": 2}
    rows = [s for f in ("train", "eval") if (out / f"{f}.jsonl").stat().st_size
            for s in load_jsonl(str(out / f"{f}.jsonl"), check_videos=True)]
    assert len(rows) == 8 and {s.category for s in rows} == set(mrd.CATEGORIES)
    for s in rows:  # the question saw all of its video's captions; the shuffled key still points at "right"
        n = clips[s.video.split("videos")[-1].split("/", 1)[1]]
        assert f"over {n} clips" in s.problem and s.options["ABCD".index(s.answer)] == f"{s.answer}. right {n}"
    assert {s.video for s in load_jsonl(str(out / "train.jsonl"))}.isdisjoint(
        {s.video for s in load_jsonl(str(out / "eval.jsonl"))}) if r["train"] and r["eval"] else True
    for c in load_jsonl(str(out / "cot.jsonl")) if r["train"] else []:
        row = next(x for x in lines(out / "cot.jsonl") if x["problem"] == c.problem)
        assert format_reward(row["response"]) == 1.0 and extract_answer(row["response"]) == c.answer
    r = mrd.main(cfg(eval_fraction=1.0))  # outputs are rebuilt from the logs: no model calls, all eval
    assert calls == [1] and sum(srv.calls.values()) == 8 and (r["train"], r["eval"]) == (0, 8)
    r = mrd.main(cfg(categories=["Counting"], question_backend="local", question_model=tiny, question_max_tokens=8))
    assert r["replies_retried"] == 2 and r["units_dropped (no JSON)"] == 2 and r["eval"] == 0  # gibberish: dropped


def test_bad_replies_and_down_endpoint(tmp_path, videos, server):
    srv, out, dead = server(bad={"Spatial": "garbage_once", "Goal and Purpose": "missing",
                                 "Plot and Narrative": "letter"}), tmp_path / "out", dead_url()
    r = mrd.main(config(out, videos, caption_base_url=dead, question_base_url=dead, max_retries=1,
                        abort_after_failures=3))
    assert r["caption_endpoint_errors"] == 4 and not lines(out / "captions.jsonl")  # 2 waves of 2, then it stops
    r = mrd.main(config(out, videos, caption_base_url=srv.url, question_base_url=dead, question_batch_size=3,
                        abort_after_failures=3))
    caps = lines(out / "captions.jsonl")
    assert [c["caption"] for c in caps] == ["4 frames of 56x56"] * 6 and r["question_endpoint_errors"] == 3
    assert not lines(out / "questions.jsonl")
    r = mrd.main(config(out, videos, caption_base_url=srv.url, question_base_url=srv.url))
    assert lines(out / "captions.jsonl") == caps and srv.calls["caption"] == 6  # finished work kept, not redone
    assert (r["units_ok"], r["units_recovered_on_retry"], r["units_dropped (missing field)"],
            r["units_dropped (bad answer)"]) == (4, 2, 2, 2)
    dropped = [q for q in lines(out / "questions.jsonl") if q["status"] == "dropped"]
    assert len(dropped) == 4 and all(q["error"] and q["reply"] for q in dropped)
    assert {s.category for s in load_jsonl(str(out / "train.jsonl"))} == {"Temporal", "Spatial"}
    before = sum(srv.calls.values())
    mrd.main(config(out, videos, caption_base_url=srv.url, question_base_url=srv.url))
    assert sum(srv.calls.values()) == before  # dropped units are logged too: not asked again


def test_difficulty_filter(tmp_path, videos, tiny, server, monkeypatch):
    srv, out = server(), tmp_path / "out"
    cfg = lambda **kw: config(out, videos, caption_base_url=srv.url, question_base_url=srv.url, filter_model=tiny,
                              filter_num_frames=4, filter_max_new_tokens=4, **kw)
    r = mrd.main(cfg(filter_k=2))  # the real tiny policy: gibberish, never right, so nothing is dropped
    assert r["train"] == 8 and r["easy_dropped"] == 0 and len(lines(out / "filter.jsonl")) == 8
    calls = []

    def policy(model, processor, prompts, n=1, **kw):  # always right on Temporal, wrong once on the others
        calls.append(len(prompts))
        says = lambda p, j: p.sample.answer if j > 0 or p.sample.problem.startswith("Temporal") else "Z"
        return [rollout.Rollout(i, [], [], f"<think>x</think><answer>{says(p, j)}</answer>")
                for i, p in enumerate(prompts) for j in range(n)]
    monkeypatch.setattr(rollout, "hf_generate", policy)
    r = mrd.main(cfg(filter_k=3))  # a new setting is scored anew
    assert sum(calls) == 8 and r["easy_dropped"] == 2 and r["train"] == 6 and r["cot"] == 8
    assert {x["category"] for x in lines(out / "easy.jsonl")} == {"Temporal"}
    assert "Temporal" not in {s.category for s in load_jsonl(str(out / "train.jsonl"))}
    mrd.main(cfg(filter_k=3))
    assert sum(calls) == 8  # scores are logged: not asked again


def test_replaced_video_is_redone(tmp_path, server):
    """A video replaced by another file at the same path (size or mtime differ) is re-captioned and re-asked, and
    the outputs hold only the new file's questions; so is a video captioned with other caption settings. An
    unchanged re-run asks nothing."""
    srv, videos = server(), tmp_path / "videos"
    videos.mkdir()
    write_video(str(videos / "a.mp4"), (np.full((56, 56, 3), 2 * i, np.uint8) for i in range(80)), fps=4)  # 4 clips
    cfg = lambda **kw: config(tmp_path / "out", str(videos), caption_base_url=srv.url, question_base_url=srv.url,
                              categories=["Temporal"], **kw)
    mrd.main(cfg())
    assert [s.problem for s in load_jsonl(str(tmp_path / "out" / "train.jsonl"))] == \
        ["Temporal: what changes from 0:00:00 to 0:00:20 over 4 clips?"]
    (videos / "a.mp4").unlink()  # another, 10-s video (2 clips) at the same path
    write_video(str(videos / "a.mp4"), (np.full((56, 56, 3), 200, np.uint8) for _ in range(40)), fps=4)
    before = dict(srv.calls)
    mrd.main(cfg())
    assert (srv.calls["caption"] - before["caption"], srv.calls["Temporal"] - before["Temporal"]) == (2, 1)
    assert [s.problem for s in load_jsonl(str(tmp_path / "out" / "train.jsonl"))] == \
        ["Temporal: what changes from 0:00:00 to 0:00:10 over 2 clips?"]
    before = dict(srv.calls)
    mrd.main(cfg())
    assert srv.calls == before  # unchanged: everything is skipped
    r = mrd.main(cfg(frames_per_clip=3))  # other caption settings: captions, then questions, made anew
    assert (srv.calls["caption"] - before["caption"], srv.calls["Temporal"] - before["Temporal"]) == (2, 1)
    assert r["train"] == 1 and lines(tmp_path / "out" / "captions.jsonl")[-1]["caption"] == "3 frames of 56x56"
