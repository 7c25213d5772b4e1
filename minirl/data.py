"""Problems and SFT examples from files or Hugging Face datasets, and the prompt templates.

Sources (``load_problems`` and ``load_sft_examples``; ``data_kind`` tells which without
reading):

- a ``.jsonl`` file (one JSON object per line; any other existing file is read as jsonl),
  or a ``.parquet`` file (needs pyarrow);
- a Hugging Face dataset (needs the optional ``datasets`` package, extra ``hub``): a
  ``save_to_disk`` folder (of a Dataset or a DatasetDict), an ``.arrow`` file or a folder of
  them (as the datasets cache names them, ``<name>-<split>[-00000-of-00002].arrow``, files
  are grouped by split; other names are shards of one dataset), a folder of ``.parquet``
  data files laid out as a hub dataset repository, or a hub id ``owner/name`` (any name
  that is not a local path and has no file suffix).

``split``: None takes the only split; a dataset with several splits needs one named (no
silent "train" or "test": picking the wrong one would train on the test set). A single
saved Dataset has no splits to choose. ``config`` (a hub dataset's subset, e.g. GSM8K's
"main") applies to hub ids and dataset repository folders only. A split or config for a
jsonl/parquet file, an unknown split (the available ones are listed), a missing
``datasets`` package or a dataset that cannot be loaded raise MinirlError.

Fields of a problem, unless named explicitly (names match exactly, else ignoring case:
some AIME sets write "Problem", "Answer", "ID"):

- question: the first of ``problem``, ``question``, ``prompt`` (a chat list in ``prompt``
  is accepted: its last user message is the question);
- gold answer: ``answer`` (an int as AIME sets store it becomes its digits; GSM8K's
  "... #### 72" becomes "72"; a ``\\boxed{}`` inside is extracted), else MATH's
  ``solution``, whose last ``\\boxed{}`` is the answer, else verl's
  ``reward_model.ground_truth``. The gold is kept as written (MATH's ``10,\\!000``): the
  grader decides what equals it;
- id: ``id`` or ``unique_id`` when present, else the record's index ("0", "1", ...); ids
  must be unique;
- difficulty: ``difficulty`` or ``level`` when present (an int, or the number in
  MATH's "Level 3"; "Level ?" is None); else None;
- meta: every other field (a ``meta`` object is merged in), e.g. MATH's ``type``, and
  ``solution``: the worked solution (MATH's, or GSM8K's reasoning before "####").

So MATH / MATH-500 (problem, solution, answer, level, unique_id), GSM8K (question, answer)
and the common AIME sets (id/ID, problem/Problem/question, answer/Answer as int or str)
load without naming fields.

SFT examples (``load_sft_examples``): ``{"prompt": str, "response": str}`` (``completion``
is accepted for ``response``) or ``{"messages": [{"role", "content"}, ...]}`` with at
least one assistant turn.

A bad record raises MinirlError naming the file and line (or "source, split 'test':
row N") and what is wrong, and for a missing field the fields found and the ones
expected; a source with no records raises MinirlError too.

Prompt templates (``format_prompt(question, template, tokenizer)``), by name:

- ``boxed``: Qwen2.5-Math's: system prompt "Please reason step by step, and put your
  final answer within \\boxed{}." through the tokenizer's chat template; with no
  tokenizer, or ``tokenizer.chat_template is None`` (a base model), plain text: the
  question, then that sentence.
- ``r1-zero``: the plain R1-Zero template of Dr. GRPO (understand-r1-zero), ending in
  "Assistant: <think>"; the tokenizer is not used.
- ``raw``: the question as is (the bundled tiny model and the synthetic tasks).
- ``chat``: the question as one user message through ``tokenizer.apply_chat_template``
  (whatever it does without a template of its own).
"""
import os
import re
from dataclasses import asdict, dataclass, field

from .common import MinirlError, atomic_write_text, read_jsonl


def _last_box(text):
    """The content of the last complete \\boxed{} / \\fbox{} of a text (a MATH solution's gold),
    or None. The grader is imported here, on first use: it is large, and most runs never need it."""
    from .grader import _boxes_from_end
    for _, _, content in _boxes_from_end(text):
        return content
    return None


QUESTION_FIELDS = ("problem", "question", "prompt")
ANSWER_FIELDS = ("answer", "solution")
ID_FIELDS = ("id", "unique_id")
DIFFICULTY_FIELDS = ("difficulty", "level")

BOXED_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with the "
    "answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer "
    "here </answer>.\nUser: {question}\nAssistant: <think>")

TEMPLATES = {
    "boxed": "Qwen2.5-Math: system prompt asking for step-by-step reasoning and a \\boxed{} answer (chat template)",
    "r1-zero": "the plain R1-Zero / Dr. GRPO template ending in 'Assistant: <think>'",
    "raw": "the question as is",
    "chat": "the question as one user message through the tokenizer's chat template",
}


@dataclass
class Problem:
    """One question with a verifiable gold answer. ``difficulty`` is a level (synthetic
    tasks, MATH levels) or None; ``meta`` holds the record's other fields."""
    id: str
    question: str
    answer: str
    difficulty: int | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class SFTExample:
    """One supervised example. Prompt/response pairs have ``messages=None``. Chat
    examples keep the whole conversation in ``messages`` (the loss goes on every
    assistant turn); ``prompt`` / ``response`` then hold the last user / assistant turn."""
    prompt: str
    response: str
    messages: list | None = None
    where: str = field(default="", compare=False, repr=False)   # "file:line" / "source: row N"


# --------------------------------------------------------------------------- reading records

_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
_SHARD_RE = re.compile(r"-\d{5}-of-\d{5}$")                        # gsm8k-test-00000-of-00002.arrow


def data_kind(path) -> str:
    """What ``path`` names, without reading it: "jsonl", "parquet", "dataset folder",
    "arrow file" or "hub id". Raises MinirlError for a missing file (a name that is not a
    local path and cannot be a hub id ``owner/name``)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return "dataset folder"
    if os.path.exists(path):
        return "parquet" if path.endswith(".parquet") else "arrow file" if path.endswith(".arrow") else "jsonl"
    if _HUB_ID_RE.fullmatch(path) and not path.endswith(_FILE_SUFFIXES):
        return "hub id"
    raise MinirlError(f"{path}: file not found")


def _read_rows(path, split=None, config=None):
    """Yield (where, record) for each record: where = "file:line", "file: row N" or, for a
    Hugging Face dataset, "source, split 'S': row N"."""
    path = os.fspath(path)
    kind = data_kind(path)
    if kind in ("dataset folder", "arrow file", "hub id"):
        yield from _dataset_rows(path, kind, split, config)
        return
    if split is not None or config is not None:
        raise MinirlError(f"{path}: a split or config was given, but a .{kind} file has neither "
                          "(they select part of a Hugging Face dataset)")
    if kind == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise MinirlError(f"{path}: reading .parquet files needs pyarrow (pip install pyarrow); "
                              "or convert the file to .jsonl") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:          # a corrupt file: name it, one line
            raise MinirlError(f"{path}: not a readable parquet file ({_one_line(e)})") from None
        for i, row in enumerate(rows, 1):
            yield f"{path}: row {i}", row
        return
    for lineno, row in read_jsonl(path):
        yield f"{path}:{lineno}", row


def _one_line(e):
    """An exception as one short line (datasets' messages span several)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def _import_datasets(path):
    try:
        import datasets
    except ImportError:
        raise MinirlError(f"{path}: reading a Hugging Face dataset needs the datasets package "
                          "(pip install datasets, or pip install -e '.[hub]')") from None
    return datasets


def _no_config(path, config):
    if config is not None:
        raise MinirlError(f"{path}: config {config!r} given, but a dataset saved on disk has no configs "
                          "(a config selects a subset of a hub dataset)")


def _arrow_files(datasets, files, where):
    """Arrow files as datasets writes them. Files named like its cache, <name>-<split>.arrow
    (or <name>-<split>-00000-of-00002.arrow), are grouped by split; other names are shards of
    one dataset."""
    stems = [_SHARD_RE.sub("", os.path.basename(f)[:-len(".arrow")]) for f in files]
    named = all("-" in s for s in stems)
    try:
        parts = {}
        for f, stem in zip(files, stems):
            parts.setdefault(stem.rsplit("-", 1)[1] if named else None, []).append(datasets.Dataset.from_file(f))
    except Exception as e:
        raise MinirlError(f"{where}: not a readable arrow file of a dataset ({_one_line(e)})") from None
    joined = {k: v[0] if len(v) == 1 else datasets.concatenate_datasets(v) for k, v in parts.items()}
    return joined[None] if None in joined else joined


def _parquet_files(folder):
    """Parquet data files at the top of a folder or one level down (a hub repository's
    data/ or <config>/): not a walk of the whole tree, which could be a home folder."""
    found = []
    for entry in os.scandir(folder):
        if entry.is_file() and entry.name.endswith(".parquet"):
            found.append(entry.path)
        elif entry.is_dir() and not entry.name.startswith("."):
            found += [e.path for e in os.scandir(entry.path) if e.is_file() and e.name.endswith(".parquet")]
    return found


def _load_dataset(path, kind, config):
    """A Dataset, or a {split: Dataset} mapping (DatasetDict), from a folder, arrow file or hub id."""
    join = os.path.join
    if kind == "dataset folder":
        saved = os.path.exists(join(path, "dataset_dict.json")) or os.path.exists(join(path, "state.json"))
        arrows = sorted(f for f in os.listdir(path) if f.endswith(".arrow") and not f.startswith("cache-"))
        parquets = _parquet_files(path)
        if not (saved or arrows or parquets):
            raise MinirlError(f"{path}: not a dataset folder (no dataset_dict.json or state.json of "
                              "save_to_disk, no .arrow files, no .parquet data files)")
        datasets = _import_datasets(path)
        if saved:
            _no_config(path, config)
            try:
                return datasets.load_from_disk(path)
            except Exception as e:
                raise MinirlError(f"{path}: not a readable save_to_disk folder ({_one_line(e)})") from None
        if arrows:
            _no_config(path, config)
            return _arrow_files(datasets, [join(path, f) for f in arrows], path)
    datasets = _import_datasets(path)
    if kind == "arrow file":
        _no_config(path, config)
        return _arrow_files(datasets, [path], path)
    try:    # a hub id, or a local copy of a hub dataset repo (parquet data files)
        return datasets.load_dataset(path, name=config)
    except Exception as e:
        what = "a local dataset repository" if kind == "dataset folder" else "not a local path; as a hub dataset"
        raise MinirlError(f"{path}: {what}, it could not be loaded ({_one_line(e)})") from None


def _select_split(loaded, path, split):
    """(dataset, its label for messages). Without ``split``: the only split; several are
    an error (silently picking "train" or "test" could train on the test set)."""
    if not isinstance(loaded, dict):             # one Dataset (DatasetDict is a dict)
        named = str(loaded.split) if getattr(loaded, "split", None) is not None else None
        if split is not None and split != named:
            raise MinirlError(f"{path}: holds a single dataset ({f'split {named!r}' if named else 'no named splits'})"
                              f"; no split {split!r} (leave the split out)")
        return loaded, path if named is None else f"{path}, split {named!r}"
    names = sorted(loaded)
    if split is None:
        if len(names) != 1:
            raise MinirlError(f"{path}: the dataset has splits {', '.join(names)}; choose one (split=..., "
                              "--data-split)")
        split = names[0]
    if split not in loaded:
        raise MinirlError(f"{path}: no split {split!r}; the splits are: {', '.join(names)}")
    return loaded[split], f"{path}, split {split!r}"


def _dataset_rows(path, kind, split, config):
    dataset, label = _select_split(_load_dataset(path, kind, config), path, split)
    for i, row in enumerate(dataset.to_list(), 1):     # python objects, one batch conversion
        yield f"{label}: row {i}", row


def _pick(row, explicit, candidates, where, what):
    """The field to use: the explicit one (must be present), else the first candidate
    present and not null, matched exactly, then case-insensitively (AIME sets write
    "Problem", "Answer", "ID")."""
    if explicit is not None:
        if explicit not in row:
            raise MinirlError(f"{where}: no field {explicit!r} ({what}); fields: {sorted(row)}")
        return explicit
    lower = {}
    for k in row:
        if isinstance(k, str) and row[k] is not None:
            lower.setdefault(k.lower(), k)
    for name in candidates:
        if name in row and row[name] is not None:
            return name
    for name in candidates:
        if name in lower:
            return lower[name]
    return None


def _question(value, where, name):
    if isinstance(value, list):          # a chat-format prompt: its last user message
        users = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"]
        value = users[-1] if users else None
    if not isinstance(value, str) or not value.strip():
        raise MinirlError(f"{where}: field {name!r} (question) must be a non-empty string, got {value!r:.60}")
    return value


def _gold(value, where, name):
    """(gold answer, worked solution or None) from the answer field's value."""
    if isinstance(value, bool) or value is None:
        raise MinirlError(f"{where}: field {name!r} (answer) must be a string or a number, got {value!r}")
    if isinstance(value, (int, float)):  # AIME sets store the answer as an int
        return str(value), None
    if not isinstance(value, str):
        raise MinirlError(f"{where}: field {name!r} (answer) must be a string or a number, got {type(value).__name__}")
    text = value.strip()
    if name.lower() == "solution" or "\\boxed" in text or "\\fbox" in text:
        # The gold is the box's content as written ("10,\!000"): the grader decides what
        # is equivalent to it, so the loader does not normalise.
        boxed = _last_box(text) if ("\\boxed" in text or "\\fbox" in text) else None
        if boxed is None:
            raise MinirlError(f"{where}: field {name!r} has no \\boxed{{}} final answer")
        return boxed, (text if name.lower() == "solution" else None)
    solution = None
    if "####" in text:                   # GSM8K: reasoning, then "#### 72"
        solution, text = (s.strip() for s in text.rsplit("####", 1))
        if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text):
            text = text.replace(",", "")
    if not text:
        raise MinirlError(f"{where}: field {name!r} (answer) is empty")
    return text, solution or None


def _difficulty(value, where, name):
    if value is None:
        return None
    if isinstance(value, bool):
        raise MinirlError(f"{where}: field {name!r} (difficulty) must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(?:level\s*)?(-?\d+|\?)\s*", value, re.IGNORECASE)   # 3, "3", "Level 3"
        if m:
            return None if m.group(1) == "?" else int(m.group(1))   # MATH train has a few "Level ?"
    raise MinirlError(f"{where}: field {name!r} (difficulty) must be an integer or 'Level N', got {value!r}")


def _answer_of(row, answer_field, where):
    """(field name, gold, solution): the answer field, else verl's reward_model.ground_truth."""
    a_name = _pick(row, answer_field, ANSWER_FIELDS, where, "answer")
    if a_name is not None:
        return (a_name, *_gold(row[a_name], where, a_name))
    reward = row.get("reward_model") if answer_field is None else None
    if isinstance(reward, dict) and reward.get("ground_truth") is not None:
        return ("reward_model", *_gold(reward["ground_truth"], where, "reward_model.ground_truth"))
    raise MinirlError(f"{where}: no answer field (one of {', '.join(ANSWER_FIELDS)}, or "
                      f"reward_model.ground_truth); fields: {sorted(row)}; name it with answer_field")


def load_problems(path, question_field=None, answer_field=None, id_field=None,
                  difficulty_field=None, split=None, config=None) -> list:
    """Read problems from ``.jsonl`` / ``.parquet`` or a Hugging Face dataset (a
    save_to_disk folder, arrow files, a hub id); ``split`` / ``config`` select part of a
    dataset (see the module docstring). Returns a list of Problem; raises MinirlError
    naming the file and line (or row)."""
    problems, seen = [], {}
    for index, (where, row) in enumerate(_read_rows(path, split, config)):
        if not isinstance(row, dict):
            raise MinirlError(f"{where}: expected a JSON object, got {type(row).__name__}")
        q_name = _pick(row, question_field, QUESTION_FIELDS, where, "question")
        if q_name is None:
            raise MinirlError(f"{where}: no question field (one of {', '.join(QUESTION_FIELDS)}); "
                              f"fields: {sorted(row)}; name it with question_field")
        a_name, gold, solution = _answer_of(row, answer_field, where)
        i_name = _pick(row, id_field, ID_FIELDS, where, "id")
        d_name = _pick(row, difficulty_field, DIFFICULTY_FIELDS, where, "difficulty")
        pid = str(row[i_name]) if i_name is not None else str(index)
        if pid in seen:
            raise MinirlError(f"{where}: duplicate id {pid!r} (first at {seen[pid]})")
        seen[pid] = where
        used = {q_name, a_name, i_name, d_name}
        used |= {k for k in ID_FIELDS + DIFFICULTY_FIELDS if row.get(k, 0) is None}   # null = absent
        meta = {k: v for k, v in row.items() if k not in used and k != "meta"}
        if isinstance(row.get("meta"), dict):
            meta.update(row["meta"])
        if solution is not None:         # MATH's solution, GSM8K's reasoning before "####"
            meta.setdefault("solution", solution)
        problems.append(Problem(
            id=pid,
            question=_question(row[q_name], where, q_name),
            answer=gold,
            difficulty=_difficulty(row[d_name], where, d_name) if d_name is not None else None,
            meta=meta))
    if not problems:
        raise MinirlError(f"{os.fspath(path)}: no problems in it (it is empty)")
    return problems


def save_problems(problems, path):
    """Write problems as ``.jsonl`` (atomically) in the form load_problems reads back."""
    import json
    lines = [json.dumps(asdict(p), ensure_ascii=False) for p in problems]
    atomic_write_text(path, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------- SFT examples

_ROLES = ("system", "user", "assistant")


def _messages(value, where):
    if not isinstance(value, list) or not value:
        raise MinirlError(f"{where}: 'messages' must be a non-empty list")
    for k, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise MinirlError(f"{where}: messages[{k}] must be {{'role': one of {'/'.join(_ROLES)}, "
                              f"'content': str}}, got {m!r:.80}")
    if not any(m["role"] == "assistant" for m in value):
        raise MinirlError(f"{where}: 'messages' has no assistant turn (nothing to learn)")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def load_sft_examples(path, split=None, config=None) -> list:
    """Read SFT examples from ``.jsonl``, ``.parquet`` or a Hugging Face dataset (as
    load_problems): prompt/response pairs or chat ``messages``. Each example's ``where``
    says where it was read. Raises MinirlError naming file and line for a bad record."""
    examples = []
    for where, row in _read_rows(path, split, config):
        if not isinstance(row, dict):
            raise MinirlError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if "messages" in row:
            messages = _messages(row["messages"], where)
            users = [m["content"] for m in messages if m["role"] == "user"]
            assistants = [m["content"] for m in messages if m["role"] == "assistant"]
            examples.append(SFTExample(users[-1] if users else "", assistants[-1], messages, where))
            continue
        response_key = "response" if "response" in row else "completion"
        if "prompt" not in row or response_key not in row:
            raise MinirlError(f"{where}: expected 'prompt' and 'response' (or 'completion'), or 'messages'; "
                              f"fields: {sorted(row)}")
        prompt, response = row["prompt"], row[response_key]
        if not isinstance(prompt, str):
            raise MinirlError(f"{where}: 'prompt' must be a string, got {type(prompt).__name__}")
        if not isinstance(response, str) or not response:
            raise MinirlError(f"{where}: {response_key!r} must be a non-empty string, got {response!r:.60}")
        examples.append(SFTExample(prompt, response, None, where))
    if not examples:
        raise MinirlError(f"{os.fspath(path)}: no SFT examples in it (it is empty)")
    return examples


# --------------------------------------------------------------------------- prompts

def _has_chat_template(tokenizer):
    # transformers / minirl tokenizers expose .chat_template (None when there is none);
    # other objects with apply_chat_template are taken at their word.
    return (tokenizer is not None and hasattr(tokenizer, "apply_chat_template")
            and getattr(tokenizer, "chat_template", True) is not None)


def prompt_add_special_tokens(template: str, tokenizer) -> bool:
    """Whether a prompt is encoded with the tokenizer's special tokens (e.g. Llama-3's BOS):
    yes for plain text, no when the chat template rendered it (it writes its own BOS)."""
    chat_rendered = template == "chat" or (template == "boxed" and getattr(tokenizer, "chat_template", None))
    return not chat_rendered


def format_prompt(question: str, template: str = "boxed", tokenizer=None) -> str:
    """The prompt text for one question (see TEMPLATES). ``tokenizer`` is any object with
    ``apply_chat_template(messages, add_generation_prompt=True) -> str``."""
    if template not in TEMPLATES:
        raise MinirlError(f"unknown prompt template {template!r}; choose one of {', '.join(TEMPLATES)}")
    if template == "raw":
        return question
    if template == "r1-zero":
        return R1_ZERO_TEMPLATE.format(question=question)
    if template == "boxed":
        if _has_chat_template(tokenizer):
            messages = [{"role": "system", "content": BOXED_SYSTEM_PROMPT}, {"role": "user", "content": question}]
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return f"{question}\n{BOXED_SYSTEM_PROMPT}\n"
    if not hasattr(tokenizer, "apply_chat_template"):   # the tokenizer decides its fallback
        raise MinirlError("prompt template 'chat' needs a tokenizer (with apply_chat_template); "
                          "use 'boxed', 'r1-zero' or 'raw' without one")
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
