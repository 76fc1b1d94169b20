"""
Dataset rows for video QA: loading and validating jsonl files, and iterating them across data-parallel ranks.

One row per line:
    {"video": "clips/a.mp4",            # relative to the jsonl's folder, or absolute
     "problem": "What colour was the flash?",
     "options": ["A. red", "B. green", "C. blue", "D. yellow"],   # optional (multiple choice)
     "answer": "B",
     "problem_type": "multiple_choice" | "numerical" | "open_ended",
     "category": "Temporal"}             # optional (eval reports accuracy per category)

LongVideo-Reason's own field names also load: "videos" (a path) for "video", "question" for "problem",
"solution" (an `<answer>X</answer>` string) for "answer", "reasoning" is kept, and a missing problem_type is
read as multiple choice only when the row has options or a single-letter answer (otherwise it is an error,
never a guess). An answer key that cannot be scored (a multiple-choice letter outside the options, a numerical
key that is not a number) is refused here, by data/rewards.check_sample, not hours into a run. Every error names
the file, the line and the field.
"""
import json
import os
import random
import re
from dataclasses import dataclass, field

from data.rewards import check_sample

PROBLEM_TYPES = ("multiple_choice", "numerical", "open_ended")
TYPE_ALIASES = {"multiple choice": "multiple_choice", "multiple-choice": "multiple_choice", "mc": "multiple_choice",
                "numeric": "numerical", "number": "numerical", "open-ended": "open_ended", "open ended": "open_ended",
                "free-form": "open_ended"}
FIELD_ALIASES = {"videos": "video", "video_path": "video", "path": "video", "question": "problem"}


@dataclass
class Sample:
    video: str                      # absolute path
    problem: str
    answer: str
    problem_type: str
    options: list = field(default_factory=list)
    category: str = ""
    reasoning: str = ""             # LongVideo-Reason's chain of thought (used for CoT warm-up data)
    source: str = ""                # "file:line", for error messages and skip counts

    def to_dict(self):
        return dict(video=self.video, problem=self.problem, answer=self.answer, problem_type=self.problem_type,
                    options=self.options, category=self.category)


def parse_row(row: dict, where: str, root: str) -> Sample:
    """Validate one decoded jsonl row; `where` is "file:line" for the error messages."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    row = {FIELD_ALIASES.get(k, k): v for k, v in row.items()}
    if "answer" not in row and "solution" in row:
        m = re.search(r"<answer>(.*?)</answer>", str(row["solution"]), re.DOTALL)
        row["answer"] = m.group(1).strip() if m else str(row["solution"]).strip()
    for name in ("video", "problem", "answer"):
        if name not in row or row[name] in (None, ""):
            raise ValueError(f"{where}: missing field '{name}'")
    video = row["video"][0] if isinstance(row["video"], list) and len(row["video"]) == 1 else row["video"]
    if not isinstance(video, str):
        raise ValueError(f"{where}: field 'video' must be a path string, got {video!r}")
    options = row.get("options") or []
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise ValueError(f"{where}: field 'options' must be a list of strings")
    ptype = row.get("problem_type")
    if ptype is None:
        if options or re.fullmatch(r"[A-Z]", str(row["answer"]).strip()):
            ptype = "multiple_choice"
        else:
            raise ValueError(f"{where}: missing field 'problem_type' (one of {', '.join(PROBLEM_TYPES)})")
    ptype = TYPE_ALIASES.get(str(ptype).lower(), str(ptype).lower())
    if ptype not in PROBLEM_TYPES:
        raise ValueError(f"{where}: field 'problem_type' is {row['problem_type']!r}; expected one of "
                         f"{', '.join(PROBLEM_TYPES)}")
    category = row.get("category") or row.get("task_type") or row.get("question_type") or ""
    sample = Sample(video=os.path.join(root, video), problem=str(row["problem"]), answer=str(row["answer"]).strip(),
                    problem_type=ptype, options=options, category=str(category),
                    reasoning=str(row.get("reasoning", "")), source=where)
    check_sample(sample.to_dict(), where=where)  # the key the rewards will grade against
    return sample


def load_jsonl(path: str, check_videos: bool = False, video_root: str = "") -> list:
    """All rows of a jsonl file as Samples. With check_videos a missing video is an error now; without it,
    the sample is skipped and counted when it is used (a long run never dies on one bad file)."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: dataset file not found")
    root = video_root or os.path.dirname(os.path.abspath(path))
    samples = []
    with open(path, "rb") as f:  # bytes, decoded line by line: a line that is not UTF-8 is named
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            sample = parse_row(row, where, root)
            if check_videos and not os.path.exists(sample.video):
                raise ValueError(f"{where}: field 'video': file not found: {sample.video}")
            samples.append(sample)
    if not samples:
        raise ValueError(f"{path}: no rows")
    return samples


def format_question(sample: Sample) -> str:
    """The question text the model sees: the problem, then the options one per line."""
    if not sample.options:
        return sample.problem
    return sample.problem + "\nOptions:\n" + "\n".join(sample.options)


class Loader:
    """Endless shuffled batches for one data-parallel rank, with a position that a checkpoint can restore.

    Every epoch is a permutation drawn from (seed, epoch); rank r of dp_size takes every dp_size-th prompt, so
    the ranks of one sequence-parallel group (same dp_rank) see the same prompts. `state()` / `restore()`
    make --resume continue exactly where the run stopped."""

    def __init__(self, samples: list, batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 what: str = "dataset"):
        # what: the rows and the setting that sized the batch, for the error ("train.jsonl with --batch_size=32")
        if len(samples) < batch_size * dp_size:
            raise ValueError(f"{what}: {len(samples)} rows, fewer than one global batch "
                             f"({batch_size} prompts x {dp_size} data-parallel ranks)")
        self.samples, self.batch_size, self.dp_rank, self.dp_size, self.seed = \
            samples, batch_size, dp_rank, dp_size, seed
        self.epoch, self.cursor = 0, 0

    def _order(self):
        order = list(range(len(self.samples)))
        random.Random(self.seed * 100003 + self.epoch).shuffle(order)
        return order

    def next_batch(self) -> list:
        global_batch = self.batch_size * self.dp_size
        if self.cursor + global_batch > len(self.samples):  # drop the ragged end of an epoch
            self.epoch, self.cursor = self.epoch + 1, 0
        ids = self._order()[self.cursor:self.cursor + global_batch]
        self.cursor += global_batch
        return [self.samples[i] for i in ids[self.dp_rank::self.dp_size]]

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def restore(self, state: dict):
        self.epoch, self.cursor = state["epoch"], state["cursor"]
