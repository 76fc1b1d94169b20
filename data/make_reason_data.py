"""
LongVideo-Reason-style data from a folder of long videos, in one resumable command: clips -> captions ->
questions -> (difficulty filter) -> train/eval/CoT jsonl. Re-creates Long-RL's longvideo-reason/ steps 1-6
(10-s clips captioned by a video model; a reasoning LLM writes question, 4 options, answer and reasoning from
the time-stamped captions in four categories; reasoning reworded as if watching the video) as one script.

    python data/make_reason_data.py config/reason_data_example.py --videos=/data/long_videos --out=/data/reason
    #   = Qwen2.5-VL-7B captions locally on this GPU + any OpenAI-compatible reasoning model, served e.g. by
    #     vllm serve Qwen/Qwen3-32B --port 8000      (question_base_url=http://127.0.0.1:8000/v1)
    python data/make_reason_data.py --videos=DIR --out=DIR --caption_backend=openai --caption_model=NAME ...
    python data/make_reason_data.py --help                 # every field

Out folder: videos.jsonl (probe results), captions.jsonl (one line per clip), questions.jsonl (one line per
video x category: ok or dropped with the reason), filter.jsonl (k-sample policy scores), then train.jsonl /
eval.jsonl (data/datasets.py rows, split by video), cot.jsonl (train rows + "response": <think>reasoning</think>
<answer>X</answer>, for a CoT/format warm-up), easy.jsonl (train rows the filter removed), report.json.
Every stage appends one flushed line per finished item and skips finished items on restart, so a killed run
continues where it stopped; output files are rewritten whole from those logs. Captions, questions and filter
scores are keyed by the video's "source" too (its size and mtime, the caption settings): a video replaced at the
same path, or captioned with other settings, is captioned and asked about anew, its old rows left unused.
Deviations: a clip is (video, start, end), never re-encoded; an endpoint failure leaves the item for the next
run, a malformed reply is retried once (told what was wrong) then recorded as dropped, never repaired; options
are shuffled (seeded per question) so the answer letter is uniform, hence reasoning may not name a letter.
The local question backend is a rollout.py VLM used as a text model (greedy); a real reasoning LLM goes
through the endpoint backend.
"""
import base64
import hashlib
import io
import json
import math
import os
import random
import re
import sys
import time
import types
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

if __name__ == "__main__":  # run as a script: import from the repo root, not from data/ (data/datasets.py
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # would shadow HF datasets)

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import rollout
import vlm
from configurator import parse_config
from data import video as V
from data.chat import Endpoint, chat_many
from data.datasets import Sample
from data.rewards import compute_rewards, parse_choice

STAGES = ("clips", "captions", "questions", "filter", "output")
VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".ts")
# The four LongVideo-Reason categories, with the definition the question model is given.
CATEGORIES = {
    "Temporal": "the order, timing, duration or frequency of events, and how things change over the video",
    "Goal and Purpose": "why people act as they do: their intentions and goals, or the purpose of an action",
    "Spatial": "where people and objects are, how they are arranged and how they move relative to each other",
    "Plot and Narrative": "the story: causes and consequences, turning points, how the situation develops",
}
CAPTION_PROMPT = "Elaborate on the visual and narrative elements of the video in detail."  # Long-RL step 2, verbatim
QUESTION_SYSTEM = ("You write multiple-choice questions that test reasoning about a long video. You cannot see the "
                   "video: you get time-stamped descriptions of its consecutive clips. Reply with JSON only.")
QUESTION_PROMPT = """Descriptions of the consecutive clips of a {duration} video:
{captions}

Write {n} multiple-choice question(s) of the category "{category}"{definition}.
- A question must need reasoning over several moments of the video, not one description, and be answerable
  from the video alone. Give exactly four distinct, plausible options with exactly one correct.
- The reasoning is step by step, written as by someone who watched the video: cite what happens and when,
  never mention descriptions or captions, and never name an option letter (say the option's content).
Reply with only this JSON:
{{"questions": [{{"question": "...", "options": ["A. ...", "B. ...", "C. ...", "D. ..."], "answer": "<letter>",
"reasoning": "..."}}]}}"""
RETRY_PROMPT = "That reply is not usable ({problem}). Reply again with only the JSON described above."
# "option B", "answer is (C)", "choice: D", "(A)": a reasoning that names a letter breaks when options are shuffled
LETTER_REF_RE = re.compile(r"\b(?i:option|answer|choice)s?\s*(?:is\s*|:\s*)?\(?[A-D]\b\)?|\([A-D]\)")
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


@dataclass
class Config:
    # I/O
    videos: str = ""                # folder of long videos (searched recursively for VIDEO_EXTS)
    out: str = "runs/reason_data"   # output folder (see the docstring for its files)
    until: str = "output"           # last stage to run: clips | captions | questions | filter | output
    max_videos: int = 0             # only the first N videos in sorted order (0 = all): a trial run
    max_clips: int = 0              # caption at most N new clips in this run, then go on (0 = all)
    # clips and frames
    clip_seconds: float = 10.0      # clip length; a last piece shorter than half of it joins the previous clip
    frames_per_clip: int = 16       # frames sampled uniformly inside each clip for the caption model
    max_pixels: int = 448 * 448     # pixel budget per frame (captions and filter); 448^2 = 256 tokens/frame
    min_pixels: int = 28 * 28 * 4   # smallest frame area
    # captions
    caption_backend: str = "local"  # local (a rollout.py VLM: Qwen2.5-VL, Qwen3-VL) | openai (any endpoint)
    caption_model: str = ""         # local: checkpoint folder or hub id; openai: the model name the server expects
    caption_base_url: str = ""      # openai: e.g. http://127.0.0.1:8000/v1 ('' = $OPENAI_BASE_URL)
    caption_api_key_env: str = "OPENAI_API_KEY"  # env var holding the caption endpoint's key (unset = no auth)
    caption_batch_size: int = 8     # clips per generate() batch (local) or per wave of requests (openai)
    caption_max_tokens: int = 512   # caption length cap
    # questions
    question_backend: str = "openai"  # openai (a reasoning LLM behind any endpoint) | local (rollout.py VLM, greedy)
    question_model: str = ""        # openai: model name; local: checkpoint folder or hub id
    question_base_url: str = ""     # openai: e.g. http://127.0.0.1:8000/v1 ('' = $OPENAI_BASE_URL)
    question_api_key_env: str = "OPENAI_API_KEY"  # env var holding the question endpoint's key
    categories: list = field(default_factory=lambda: list(CATEGORIES))  # question categories (any names)
    questions_per_category: int = 1  # questions per video and category (Long-RL: ~52k QAs over ~18k videos)
    question_batch_size: int = 16   # video x category units per generate() batch (local) or wave (openai)
    question_max_tokens: int = 4096  # reply cap; reasoning models think first, so keep it generous
    question_temperature: float = 0.7  # openai only (the local backend is greedy)
    max_caption_chars: int = 0      # skip and count videos whose captions are longer (0 = no limit)
    # endpoints (both stages)
    timeout_s: float = 300.0        # per HTTP attempt
    max_retries: int = 2            # extra attempts after a failed request (transport/HTTP errors)
    retry_backoff_s: float = 2.0    # sleep before retry k is backoff * 2**(k-1)
    concurrency: int = 8            # requests in flight at once
    abort_after_failures: int = 32  # end a stage after this many endpoint failures in a row (it is down)
    # splits and output
    eval_fraction: float = 0.05     # share of VIDEOS in eval (a stable hash of the path: splits never move)
    shuffle_options: bool = True    # shuffle each question's options (seeded by its id): uniform answer letters
    # difficulty filter (Long-RL kept the questions the policy does not always get right)
    filter_model: str = ""          # policy checkpoint to filter train questions with ('' = no filter)
    filter_k: int = 8               # samples per question; dropped if all k are correct
    filter_temperature: float = 1.0  # sampling temperature of the k samples
    filter_num_frames: int = 64     # frames sampled over the whole video for the policy
    filter_batch_size: int = 4      # questions per generate() batch (each expands to k rollouts)
    filter_max_new_tokens: int = 1024  # response cap for the policy
    # system
    device: str = "auto"            # auto | cpu | cuda (local models)
    dtype: str = "auto"             # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    attn_implementation: str = "sdpa"  # sdpa | flash_attention_2 | eager
    seed: int = 0                   # filter sampling seed and option shuffle salt
    progress: bool = True           # tqdm bars


# ----------------------------------------------------------------------------------------------------------
# append-only jsonl logs: one flushed line per finished item

def read_log(path: str) -> list:
    """Rows of a log this script appends to. A torn last line (killed mid-write) is cut off the file, so the
    next append starts on a clean line; any other bad line is an error naming it."""
    if not os.path.exists(path):
        return []
    rows, good_end = [], 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break  # the torn tail: that item was not finished
            good_end += len(line)
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if good_end < os.path.getsize(path):
        print(f"{path}: dropping a torn last line (the previous run stopped while writing it)")
        os.truncate(path, good_end)
    return rows


class Log:
    def __init__(self, path):
        self.f = open(path, "a")

    def write(self, row: dict):
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")  # one write per line: a kill tears at most one
        self.f.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def write_jsonl(path: str, rows: list):
    """Whole file, atomically (a reader never sees half of it)."""
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def chunks(items: list, size: int):
    for i in range(0, len(items), max(1, size)):
        yield items[i:i + max(1, size)]


def bar(cfg, total, desc):
    return tqdm(total=total, desc=desc, disable=not cfg.progress)


# ----------------------------------------------------------------------------------------------------------
# stage 1: clips = (video, start, end) spans from the probed duration

def clip_spans(duration: float, clip_seconds: float) -> list:
    """[(start, end)] covering [0, duration] in clip_seconds steps; a tail under half a clip joins the last."""
    n = max(1, math.ceil(duration / clip_seconds - 1e-6))
    edges = [k * clip_seconds for k in range(n)] + [duration]
    if n > 1 and edges[-1] - edges[-2] < clip_seconds / 2:
        del edges[-2]
    return [(round(a, 3), round(b, 3)) for a, b in zip(edges[:-1], edges[1:])]


def source(row: dict, cfg) -> str:
    """What a video's captions (hence its questions) are made from: the file (size, mtime: a replaced video is
    another source) and the caption settings."""
    return (f"{row['size']}:{row['mtime']}|{cfg.caption_backend}:{cfg.caption_model}|"
            f"frames={cfg.frames_per_clip}|pixels={cfg.max_pixels}")


def video_clips(row: dict, cfg) -> list:
    return [{"clip": f"{row['video']}@{a:.3f}-{b:.3f}", "video": row["video"], "start": a, "end": b,
             "source": source(row, cfg)} for a, b in clip_spans(row["duration"], cfg.clip_seconds)]


def stage_clips(cfg, stats) -> list:
    """Probe every video once (re-probe when its size or mtime changes); unreadable ones are skipped and named."""
    path = os.path.join(cfg.out, "videos.jsonl")
    known = {r["video"]: r for r in read_log(path)}
    files = sorted(os.path.relpath(os.path.join(d, f), cfg.videos) for d, _, fs in os.walk(cfg.videos)
                   for f in fs if f.lower().endswith(VIDEO_EXTS))[:cfg.max_videos or None]
    with Log(path) as log, bar(cfg, len(files), "clips") as pbar:
        for rel in files:
            st = os.stat(os.path.join(cfg.videos, rel))
            row = known.get(rel)
            if row is None or row["size"] != st.st_size or row["mtime"] != st.st_mtime:
                row = {"video": rel, "size": st.st_size, "mtime": st.st_mtime, "duration": 0.0, "error": ""}
                try:
                    row["duration"] = V.probe(os.path.join(cfg.videos, rel)).duration
                except ValueError as e:
                    row["error"] = str(e)
                log.write(row)
                known[rel] = row
            pbar.update(1)
    rows = [known[rel] for rel in files]
    for r in rows:
        if r["error"]:
            print(f"skipped unreadable video: {r['error']}")
    stats.update(videos=len(rows), unreadable_videos=sum(bool(r["error"]) for r in rows))
    return [r for r in rows if not r["error"]]


# ----------------------------------------------------------------------------------------------------------
# backends: a local rollout.py model, or any OpenAI-compatible /chat/completions endpoint

def local_model(cfg, path: str, models: dict):
    """(model, processor), loaded once per path for the whole run."""
    if not path:
        raise SystemExit("a local backend needs a model: set caption_model / question_model / filter_model")
    if path not in models:
        device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        model, processor = vlm.load_model(path, cfg.dtype, cfg.attn_implementation, device)
        models[path] = (model.eval(), processor)
        print(f"loaded {path} ({vlm.family(model)}) on {device}")
    return models[path]


def endpoint(cfg, base_url: str, model: str, key_env: str, max_tokens: int) -> Endpoint:
    """The data/chat.py Endpoint of a stage, from its flags and the shared timeout/retry/concurrency ones."""
    base_url = base_url or os.environ.get("OPENAI_BASE_URL", "")
    if not base_url or not model:
        raise SystemExit("the openai backend needs a base URL (flag or $OPENAI_BASE_URL) and a model name")
    return Endpoint(base_url=base_url, model=model, api_key_env=key_env, timeout_s=cfg.timeout_s,
                    max_retries=cfg.max_retries, retry_backoff_s=cfg.retry_backoff_s,
                    concurrency=cfg.concurrency, max_tokens=max_tokens)


def jpeg_url(frame: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def caption_prompt(model, processor, video) -> vlm.Prompt:
    """vlm.build_prompt with the caption instruction instead of its QA templates: same inputs and positions."""
    return vlm.build_prompt(model, processor, "", video, instruction=CAPTION_PROMPT)


def text_prompt(processor, conversation: list) -> vlm.Prompt:
    """A text-only chat as a vlm.Prompt (no video: hf_generate skips the vision tower). For text alone the
    Qwen-VL rope positions are t = h = w = token index."""
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    return vlm.Prompt(input_ids=ids, positions=torch.arange(len(ids)).expand(3, -1), pixel_values_videos=None,
                      video_grid_thw=None, num_video_tokens=0, text=text)


# ----------------------------------------------------------------------------------------------------------
# stage 2: captions, one log line per clip

def caption_backend(cfg, models):
    """(frame size multiple, fn: list of SampledVideo -> list of (caption or None, endpoint error))."""
    if cfg.caption_backend == "local":
        model, processor = local_model(cfg, cfg.caption_model, models)

        def run(videos):
            prompts = [caption_prompt(model, processor, v) for v in videos]
            outs = rollout.hf_generate(model, processor, prompts, n=1, temperature=0.0,
                                       max_new_tokens=cfg.caption_max_tokens)
            return [(o.text, "") for o in outs]
        return vlm.SUPPORTED[vlm.family(model)], run
    ep = endpoint(cfg, cfg.caption_base_url, cfg.caption_model, cfg.caption_api_key_env, cfg.caption_max_tokens)

    def run(videos):
        return chat_many(ep, [[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": jpeg_url(f)}}
                                                            for f in v.frames] + [
            {"type": "text", "text": f"These are {len(v.frames)} frames of a {v.duration:.0f}-second video clip, "
                                     f"in order. {CAPTION_PROMPT}"}]}] for v in videos], 0.0)
    return 28, run


def clip_frames(batch: list, cfg, multiple: int, log, stats) -> tuple:
    """(clips, SampledVideos) of a batch, one decoder pass per video; undecodable clips are logged with their
    error (permanent, so their video is skipped at the question stage) and left out."""
    ready, frames = [], []
    for rel in dict.fromkeys(c["video"] for c in batch):
        mine = [c for c in batch if c["video"] == rel]
        try:
            got = V.sample_windows(os.path.join(cfg.videos, rel), [(c["start"], c["end"]) for c in mine],
                                   cfg.frames_per_clip, cfg.max_pixels, cfg.min_pixels, multiple)
        except ValueError as e:
            got = [e] * len(mine)
        for c, g in zip(mine, got):
            if isinstance(g, ValueError):
                log.write({**c, "caption": "", "error": str(g)})
                stats["clips_unreadable"] += 1
            else:
                ready.append(c)
                frames.append(g)
    return ready, frames


def stage_captions(cfg, videos: list, stats, models):
    path = os.path.join(cfg.out, "captions.jsonl")
    done = {(r["clip"], r.get("source")) for r in read_log(path)}  # (no source: made before sources were logged)
    clips = [c for v in videos for c in video_clips(v, cfg)]
    todo = [c for c in clips if (c["clip"], c["source"]) not in done]
    stats.update(clips=len(clips), clips_done_before=len(clips) - len(todo))
    todo = todo[:cfg.max_clips or None]
    if not todo:
        return
    multiple, caption = caption_backend(cfg, models)
    streak = 0  # endpoint failures in a row
    with Log(path) as log, bar(cfg, len(todo), "captions") as pbar:
        for batch in chunks(todo, cfg.caption_batch_size):
            ready, frames = clip_frames(batch, cfg, multiple, log, stats)
            for c, v, (text, err) in zip(ready, frames, caption(frames) if frames else []):
                if err:  # transient: not logged, the next run asks again
                    stats["caption_endpoint_errors"] += 1
                    stats["last_endpoint_error"], streak = err, streak + 1
                    continue
                streak, text = 0, text.strip()
                log.write({**c, "caption": text, "frames": len(v.frames), **({} if text else {"error": "empty"})})
                stats["clips_captioned" if text else "clips_empty_caption"] += 1
            pbar.update(len(batch))
            if cfg.abort_after_failures and streak >= cfg.abort_after_failures:
                print(f"captions: {streak} endpoint failures in a row ({stats['last_endpoint_error']}); "
                      f"stopping this stage, rerun to continue")
                break


# ----------------------------------------------------------------------------------------------------------
# stage 3: questions, one log line per video x category (ok, or dropped with the reason)

def hms(t: float) -> str:
    t = int(round(t))
    return f"{t // 3600}:{t // 60 % 60:02d}:{t % 60:02d}"


def question_messages(unit: dict, cfg) -> list:
    captions = "\n".join(f"[{hms(c['start'])}-{hms(c['end'])}] {c['caption']}" for c in unit["captions"])
    definition = f" ({CATEGORIES[unit['category']]})" if unit["category"] in CATEGORIES else ""
    user = QUESTION_PROMPT.format(duration=hms(unit["captions"][-1]["end"]), captions=captions,
                                  n=cfg.questions_per_category, category=unit["category"], definition=definition)
    return [{"role": "system", "content": QUESTION_SYSTEM}, {"role": "user", "content": user}]


def check_question(item) -> tuple:
    """(question dict, "") or (None, "kind: detail"). Strict: nothing is repaired or guessed."""
    if not isinstance(item, dict):
        return None, f"not an object: a question is {type(item).__name__}"
    missing = [k for k in ("question", "options", "answer", "reasoning") if not item.get(k)]
    if missing:
        return None, f"missing field: {', '.join(missing)}"
    options, reasoning = item["options"], item["reasoning"]
    reasoning = "\n".join(map(str, reasoning)) if isinstance(reasoning, list) else reasoning
    if not isinstance(options, list) or len(options) != 4 or not all(isinstance(o, str) and o.strip() for o in options):
        return None, "bad options: expected a list of 4 non-empty strings"
    texts = []
    for letter, opt in zip("ABCD", options):
        m = re.fullmatch(r"\s*\(?([A-Da-d])[).:]\s*(.+)", opt, re.DOTALL)
        if m and m.group(1).upper() != letter:
            return None, f"bad options: option {letter} is labelled {m.group(1)}"
        texts.append((m.group(2) if m else opt).strip())
    if len({t.lower() for t in texts}) < 4:
        return None, "bad options: two options are the same"
    answer = parse_choice(str(item["answer"]), [f"{L}. {t}" for L, t in zip("ABCD", texts)])
    if answer is None:
        return None, f"bad answer: {str(item['answer'])[:40]!r} is not one of the option letters A-D"
    if not isinstance(item["question"], str) or not isinstance(reasoning, str):
        return None, "bad types: question and reasoning must be text"
    if any(tag in reasoning for tag in TAGS):
        return None, "bad reasoning: it contains think/answer tags"
    if LETTER_REF_RE.search(reasoning):
        return None, f"bad reasoning: it names an option letter ({LETTER_REF_RE.search(reasoning).group(0)!r})"
    return {"question": item["question"].strip(), "options": texts, "answer": answer,
            "reasoning": reasoning.strip()}, ""


def parse_reply(text: str, n: int) -> tuple:
    """([n question dicts], "") or (None, "kind: detail") for one model reply."""
    body = text.rsplit("</think>", 1)[-1]  # a reasoning model thinks first (its "<think>" may sit in the prompt)
    if not re.search(r"[\[{].*[\]}]", body, re.DOTALL):
        return None, "no JSON: the reply has no JSON object"
    # the first JSON value that parses from some "{" or "[" on (fenced or not), of the shape asked for if any is:
    # prose around it may hold brackets too ("exactly one option [A-D] is correct")
    shaped = lambda v: isinstance(v, dict) or (isinstance(v, list) and v and all(isinstance(x, dict) for x in v))
    found, error = [], None
    for m in re.finditer(r"[\[{]", body):
        try:
            found.append(json.JSONDecoder().raw_decode(body, m.start())[0])
        except json.JSONDecodeError as e:
            error = error or e
            continue
        if shaped(found[-1]):
            break
    if not found:
        return None, f"bad JSON: {error.msg}"
    data = found[-1] if shaped(found[-1]) else found[0]  # none of that shape: the checks below name the problem
    items = data.get("questions", data) if isinstance(data, dict) else data
    items = [items] if isinstance(items, dict) else items
    if not isinstance(items, list) or len(items) != n:
        return None, f"wrong count: expected {n} question(s)"
    out = []
    for item in items:
        q, problem = check_question(item)
        if problem:
            return None, problem
        out.append(q)
    return out, ""


def question_units(cfg, videos: list, stats, done: set) -> list:
    """(video, category) units still to ask, for the videos whose clips are all captioned."""
    caps = {(r["clip"], r.get("source")): r for r in read_log(os.path.join(cfg.out, "captions.jsonl"))}
    units = []
    for v in videos:
        rows = [caps.get((c["clip"], c["source"])) for c in video_clips(v, cfg)]
        if any(r is None for r in rows):
            stats["videos_waiting_for_captions"] += 1
        elif any(r.get("error") for r in rows):
            stats["videos_with_bad_clips"] += 1  # never asked about a video with holes in its story
        elif cfg.max_caption_chars and sum(len(r["caption"]) for r in rows) > cfg.max_caption_chars:
            stats["videos_captions_too_long"] += 1
        else:
            units += [{"video": v["video"], "source": source(v, cfg), "category": cat, "captions": rows}
                      for cat in cfg.categories if (v["video"], source(v, cfg), cat) not in done]
    return units


def question_backend(cfg, models):
    """fn: list of conversations -> list of (reply or None, endpoint error)."""
    if cfg.question_backend == "local":
        model, processor = local_model(cfg, cfg.question_model, models)
        return lambda convs: [(o.text, "") for o in rollout.hf_generate(
            model, processor, [text_prompt(processor, c) for c in convs], temperature=0.0,
            max_new_tokens=cfg.question_max_tokens)]
    ep = endpoint(cfg, cfg.question_base_url, cfg.question_model, cfg.question_api_key_env, cfg.question_max_tokens)
    return lambda convs: chat_many(ep, convs, cfg.question_temperature)


def ask_wave(units: list, generate, cfg, log, stats, streak: int) -> int:
    """Ask, validate, retry the malformed once with the problem named, log. Returns the streak of endpoint
    failures in a row (carried across waves, reset by any reply)."""
    convs = [question_messages(u, cfg) for u in units]
    for attempt in (1, 2):
        again = []
        for u, conv, (text, err) in zip(units, convs, generate(convs)):
            key = {"video": u["video"], "source": u["source"], "category": u["category"]}
            if err:  # transient: not logged, the next run asks again
                stats["question_endpoint_errors"] += 1
                stats["last_endpoint_error"], streak = err, streak + 1
                continue
            streak = 0
            questions, problem = parse_reply(text, cfg.questions_per_category)
            if questions:
                log.write({**key, "status": "ok", "attempts": attempt, "questions": questions})
                stats["units_ok"] += 1
                stats["units_recovered_on_retry"] += attempt == 2
            elif attempt == 1:
                stats["replies_retried"] += 1
                again.append((u, conv + [{"role": "assistant", "content": text},
                                         {"role": "user", "content": RETRY_PROMPT.format(problem=problem)}]))
            else:  # never repaired or guessed: recorded with the reason and the reply, not asked again
                log.write({**key, "status": "dropped", "error": problem, "reply": text[:2000]})
                stats[f"units_dropped ({problem.split(':')[0]})"] += 1
        if not again:
            break
        units, convs = [u for u, _ in again], [c for _, c in again]
    return streak


def stage_questions(cfg, videos: list, stats, models):
    path = os.path.join(cfg.out, "questions.jsonl")
    done = {(r["video"], r.get("source"), r["category"]) for r in read_log(path)}
    units = question_units(cfg, videos, stats, done)
    stats["question_units_todo"] = len(units)
    if not units:
        return
    generate, streak = question_backend(cfg, models), 0
    with Log(path) as log, bar(cfg, len(units), "questions") as pbar:
        for wave in chunks(units, cfg.question_batch_size):
            streak = ask_wave(wave, generate, cfg, log, stats, streak)
            pbar.update(len(wave))
            if cfg.abort_after_failures and streak >= cfg.abort_after_failures:
                print(f"questions: {streak} endpoint failures in a row ({stats['last_endpoint_error']}); "
                      f"stopping this stage, rerun to continue")
                break


# ----------------------------------------------------------------------------------------------------------
# stage 4 (optional): difficulty filter with the policy; stage 5: output files

def is_eval(rel: str, fraction: float) -> bool:
    """A stable split by video: a hash of the path, so adding videos never moves one between splits."""
    return int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) / 16 ** 8 < fraction


def collect(cfg, videos: list) -> list:
    """Every accepted question as a dataset row (+ id, split, reasoning), options shuffled if asked."""
    keep, cats = {v["video"]: source(v, cfg) for v in videos}, set(cfg.categories)
    latest = {(r["video"], r["category"]): r for r in read_log(os.path.join(cfg.out, "questions.jsonl"))
              if r["video"] in keep and r.get("source") == keep[r["video"]]}  # current file and caption settings
    rows = []
    for (rel, cat), r in sorted(latest.items()):
        if r["status"] != "ok" or cat not in cats:
            continue
        for i, q in enumerate(r["questions"]):
            qid = f"{rel}#{cat}#{i}"
            order = list(range(4))
            if cfg.shuffle_options:
                random.Random(f"{cfg.seed}:{qid}").shuffle(order)
            rows.append({"id": qid, "split": "eval" if is_eval(rel, cfg.eval_fraction) else "train",
                         "video": os.path.relpath(os.path.join(os.path.abspath(cfg.videos), rel),
                                                  os.path.abspath(cfg.out)),
                         "problem": q["question"],
                         "options": [f"{L}. {q['options'][o]}" for L, o in zip("ABCD", order)],
                         "answer": "ABCD"[order.index("ABCD".index(q["answer"]))],
                         "problem_type": "multiple_choice", "category": cat, "reasoning": q["reasoning"],
                         "source": r["source"]})
    return rows


def stage_filter(cfg, rows: list, stats, models) -> dict:
    """{(question id, source): correct samples out of filter_k} for the train questions, scored with rewards.py
    (a replaced video's questions have the same ids: the source tells them apart)."""
    path = os.path.join(cfg.out, "filter.jsonl")
    setting = f"{cfg.filter_model}|k={cfg.filter_k}|T={cfg.filter_temperature}|frames={cfg.filter_num_frames}"
    scored = {(r["id"], r.get("source")): r["correct"] for r in read_log(path) if r["setting"] == setting}
    todo = [r for r in rows if r["split"] == "train" and (r["id"], r["source"]) not in scored]
    if todo:
        model, processor = local_model(cfg, cfg.filter_model, models)
        vcfg = types.SimpleNamespace(fps=0.0, num_frames=cfg.filter_num_frames, max_frames=cfg.filter_num_frames,
                                     max_pixels=cfg.max_pixels, min_pixels=cfg.min_pixels)
        root = os.path.abspath(cfg.out)
        with Log(path) as log, bar(cfg, len(todo), "filter") as pbar:
            for batch in chunks(todo, cfg.filter_batch_size):
                samples = [Sample(video=os.path.join(root, r["video"]), problem=r["problem"], answer=r["answer"],
                                  problem_type=r["problem_type"], options=r["options"], source=r["id"]) for r in batch]
                made_from = {r["id"]: r["source"] for r in batch}
                skipped = []
                prompts = rollout.prepare_prompts(model, processor, samples, vcfg, True, skipped)
                stats["filter_videos_unreadable"] += len(skipped)
                outs = rollout.hf_generate(model, processor, prompts, n=cfg.filter_k,
                                           temperature=cfg.filter_temperature, seed=cfg.seed,
                                           max_new_tokens=cfg.filter_max_new_tokens) if prompts else []
                acc = compute_rewards([o.text for o in outs], [prompts[o.prompt_index].sample.to_dict()
                                                               for o in outs], think=True)["accuracy"] if outs else []
                correct = Counter()
                for o, a in zip(outs, acc):
                    correct[prompts[o.prompt_index].sample.source] += int(a)
                for p in prompts:
                    qid = p.sample.source
                    scored[qid, made_from[qid]] = correct[qid]
                    log.write({"id": qid, "source": made_from[qid], "correct": correct[qid], "setting": setting})
                pbar.update(len(batch))
    return scored


def stage_output(cfg, rows: list, scored: dict, stats):
    def clean(r):
        return {k: v for k, v in r.items() if k not in ("split", "source")}
    train = [clean(r) for r in rows if r["split"] == "train"]
    evals = [clean(r) for r in rows if r["split"] == "eval"]
    cot = [{**r, "response": f"<think>\n{r['reasoning']}\n</think>\n<answer>{r['answer']}</answer>"} for r in train]
    made_from = {r["id"]: r["source"] for r in rows}  # (one source per video: collect keeps the current one)
    easy = [r for r in train if scored.get((r["id"], made_from[r["id"]]), -1) >= cfg.filter_k] \
        if cfg.filter_model else []
    easy_ids = {r["id"] for r in easy}
    kept = [r for r in train if r["id"] not in easy_ids]
    for name, part in (("train", kept), ("eval", evals), ("cot", cot), ("easy", easy)):
        write_jsonl(os.path.join(cfg.out, f"{name}.jsonl"), part)
    stats.update(train=len(kept), eval=len(evals), cot=len(cot), easy_dropped=len(easy),
                 per_category={name: dict(Counter(r["category"] for r in part))
                               for name, part in (("train", kept), ("eval", evals))},
                 answer_letters=dict(sorted(Counter(r["answer"] for r in kept + evals).items())))


# ----------------------------------------------------------------------------------------------------------

def check(cfg):
    if cfg.until not in STAGES:
        raise ValueError(f"--until={cfg.until!r}: expected one of {', '.join(STAGES)}")
    for name in ("caption_backend", "question_backend"):
        if getattr(cfg, name) not in ("local", "openai"):
            raise ValueError(f"--{name}={getattr(cfg, name)!r}: expected local or openai")
    if not os.path.isdir(cfg.videos):
        raise ValueError(f"--videos={cfg.videos!r} is not a folder")
    if cfg.clip_seconds <= 0 or cfg.frames_per_clip < 1 or cfg.questions_per_category < 1 or not cfg.categories:
        raise ValueError("clip_seconds > 0, frames_per_clip >= 1, questions_per_category >= 1 and a category needed")
    if not 0.0 <= cfg.eval_fraction <= 1.0:
        raise ValueError(f"--eval_fraction={cfg.eval_fraction}: expected a fraction in [0, 1]")


def main(cfg: Config) -> dict:
    check(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    t0, stats, models = time.time(), defaultdict(int), {}
    last = STAGES.index(cfg.until)
    videos = stage_clips(cfg, stats)
    if last >= 1:
        stage_captions(cfg, videos, stats, models)
    if last >= 2:
        stage_questions(cfg, videos, stats, models)
    rows = collect(cfg, videos) if last >= 3 else []
    scored = stage_filter(cfg, rows, stats, models) if last >= 3 and cfg.filter_model else {}
    if last >= 4:
        stage_output(cfg, rows, scored, stats)
    report = dict(stats)
    report.update(seconds=round(time.time() - t0, 1), config=asdict(cfg))
    with open(os.path.join(cfg.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    for k, v in report.items():
        if k != "config":
            print(f"  {k}: {v}")
    return report


if __name__ == "__main__":
    main(parse_config(Config))
