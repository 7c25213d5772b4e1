"""Problems and SFT examples from files, and the prompt templates.

Problems (``load_problems``) come from a ``.jsonl`` file (one JSON object per line) or a
``.parquet`` file (needs pyarrow). Fields, unless named explicitly:

- question: the first of ``problem``, ``question``, ``prompt`` (a chat list in ``prompt``
  is accepted: its last user message is the question);
- gold answer: ``answer`` (GSM8K's "... #### 72" becomes "72"; a ``\\boxed{}`` inside is
  extracted), else MATH's ``solution``, whose last ``\\boxed{}`` is the answer;
- id: ``id`` or ``unique_id`` when present, else the record's index in the file
  ("0", "1", ...); ids must be unique;
- difficulty: ``difficulty`` or ``level`` when present (an int, or the number in
  MATH's "Level 3"); else None;
- meta: every other field (a ``meta`` object is merged in), e.g. MATH's ``type``.

SFT examples (``load_sft_examples``): ``{"prompt": str, "response": str}`` (``completion``
is accepted for ``response``) or ``{"messages": [{"role", "content"}, ...]}`` with at
least one assistant turn.

A bad record raises MinirlError naming the file, line (or parquet row) and what is
wrong; a file with no records raises MinirlError too.

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
from .grader import extract_answer

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


# --------------------------------------------------------------------------- reading records

def _read_rows(path):
    """Yield (where, record) for each record: where = "file:line" or "file: row N"."""
    path = os.fspath(path)
    if path.endswith(".parquet"):
        if not os.path.exists(path):
            raise MinirlError(f"{path}: file not found")
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise MinirlError(f"{path}: reading .parquet files needs pyarrow (pip install pyarrow); "
                              "or convert the file to .jsonl") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:          # a corrupt file: name it, one line
            raise MinirlError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
        for i, row in enumerate(rows, 1):
            yield f"{path}: row {i}", row
        return
    for lineno, row in read_jsonl(path):
        yield f"{path}:{lineno}", row


def _pick(row, explicit, candidates, where, what):
    """The field to use: the explicit one (must be present) or the first candidate present."""
    if explicit is not None:
        if explicit not in row:
            raise MinirlError(f"{where}: no field {explicit!r} ({what}); fields: {sorted(row)}")
        return explicit
    for name in candidates:
        if name in row and row[name] is not None:
            return name
    return None


def _question(value, where, name):
    if isinstance(value, list):          # a chat-format prompt: its last user message
        users = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"]
        value = users[-1] if users else None
    if not isinstance(value, str) or not value.strip():
        raise MinirlError(f"{where}: field {name!r} (question) must be a non-empty string, got {value!r:.60}")
    return value


def _gold(value, where, name):
    if isinstance(value, bool) or value is None:
        raise MinirlError(f"{where}: field {name!r} (answer) must be a string or a number, got {value!r}")
    if isinstance(value, (int, float)):
        return str(value)
    if not isinstance(value, str):
        raise MinirlError(f"{where}: field {name!r} (answer) must be a string or a number, got {type(value).__name__}")
    text = value.strip()
    if name == "solution" or "\\boxed" in text or "\\fbox" in text:
        boxed = extract_answer(text) if ("\\boxed" in text or "\\fbox" in text) else None
        if boxed is None:
            raise MinirlError(f"{where}: field {name!r} has no \\boxed{{}} final answer")
        return boxed
    if "####" in text:                   # GSM8K: reasoning, then "#### 72"
        text = text.rsplit("####", 1)[1].strip()
        if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text):
            text = text.replace(",", "")
    if not text:
        raise MinirlError(f"{where}: field {name!r} (answer) is empty")
    return text


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
        m = re.fullmatch(r"\s*(?:level\s*)?(-?\d+)\s*", value, re.IGNORECASE)   # 3, "3", "Level 3"
        if m:
            return int(m.group(1))
    raise MinirlError(f"{where}: field {name!r} (difficulty) must be an integer or 'Level N', got {value!r}")


def load_problems(path, question_field=None, answer_field=None, id_field=None,
                  difficulty_field=None) -> list:
    """Read problems from ``.jsonl`` / ``.parquet`` (see the module docstring for the
    field mapping). Returns a list of Problem; raises MinirlError naming file and line."""
    problems, seen = [], {}
    for index, (where, row) in enumerate(_read_rows(path)):
        if not isinstance(row, dict):
            raise MinirlError(f"{where}: expected a JSON object, got {type(row).__name__}")
        q_name = _pick(row, question_field, QUESTION_FIELDS, where, "question")
        if q_name is None:
            raise MinirlError(f"{where}: no question field (one of {', '.join(QUESTION_FIELDS)}); "
                              f"fields: {sorted(row)}; name it with question_field")
        a_name = _pick(row, answer_field, ANSWER_FIELDS, where, "answer")
        if a_name is None:
            raise MinirlError(f"{where}: no answer field (one of {', '.join(ANSWER_FIELDS)}); "
                              f"fields: {sorted(row)}; name it with answer_field")
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
        problems.append(Problem(
            id=pid,
            question=_question(row[q_name], where, q_name),
            answer=_gold(row[a_name], where, a_name),
            difficulty=_difficulty(row[d_name], where, d_name) if d_name is not None else None,
            meta=meta))
    if not problems:
        raise MinirlError(f"{os.fspath(path)}: no problems in the file (it is empty)")
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


def load_sft_examples(path) -> list:
    """Read SFT examples from ``.jsonl`` (or ``.parquet``): prompt/response pairs or chat
    ``messages``. Raises MinirlError naming file and line for a bad record."""
    examples = []
    for where, row in _read_rows(path):
        if not isinstance(row, dict):
            raise MinirlError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if "messages" in row:
            messages = _messages(row["messages"], where)
            users = [m["content"] for m in messages if m["role"] == "user"]
            assistants = [m["content"] for m in messages if m["role"] == "assistant"]
            examples.append(SFTExample(users[-1] if users else "", assistants[-1], messages))
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
        examples.append(SFTExample(prompt, response, None))
    if not examples:
        raise MinirlError(f"{os.fspath(path)}: no SFT examples in the file (it is empty)")
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
