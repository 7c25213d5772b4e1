"""Problem / SFT data loading (field mapping, errors naming file and line, parquet) and
prompt templates."""
import json
import sys

import pytest

from minirl.common import MinirlError
from minirl.data import (BOXED_SYSTEM_PROMPT, TEMPLATES, Problem, SFTExample, format_prompt, load_problems,
                         load_sft_examples, save_problems)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- problems

def test_field_mapping(tmp_path):
    rows = [
        {"problem": "What is 1+1?", "answer": "2"},
        {"question": "Q2", "answer": 7},
        {"prompt": "Q3", "answer": "x = 3", "id": "custom-id", "difficulty": 4},
        {"problem": "MATH", "solution": "So it is $\\boxed{\\frac{1}{2}}$.", "level": "Level 3",
         "type": "Algebra", "unique_id": "test/algebra/1.json"},
        {"question": "GSM8K", "answer": "She has 1000 + 500 = 1500.\n#### 1,500"},
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "chat question"}],
         "answer": "\\boxed{5}", "meta": {"source": "x"}},
    ]
    problems = load_problems(write_jsonl(tmp_path / "p.jsonl", rows))
    assert problems[0] == Problem("0", "What is 1+1?", "2", None, {})
    assert problems[1].answer == "7" and problems[1].id == "1"
    assert problems[2].id == "custom-id" and problems[2].difficulty == 4 and problems[2].answer == "x = 3"
    assert problems[3] == Problem("test/algebra/1.json", "MATH", "\\frac{1}{2}", 3,
                                  {"type": "Algebra", "solution": "So it is $\\boxed{\\frac{1}{2}}$."})
    assert problems[4].answer == "1500" and problems[4].meta == {"solution": "She has 1000 + 500 = 1500."}
    assert problems[5].question == "chat question" and problems[5].answer == "5"
    assert problems[5].meta == {"source": "x"}


def test_explicit_fields(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"q": "Q", "a": "1", "uid": 9, "hard": 2.0, "problem": "other"}])
    p = load_problems(path, question_field="q", answer_field="a", id_field="uid", difficulty_field="hard")[0]
    assert p == Problem("9", "Q", "1", 2, {"problem": "other"})


@pytest.mark.parametrize("rows, kwargs, message", [
    (['{"problem": "Q", "answer": "1"}', '{"problem": "Q2", "answer": '], {}, r"p\.jsonl:2: not valid JSON"),
    ([{"problem": "Q", "answer": "1"}, {"text": "Q2", "answer": "1"}], {}, r"p\.jsonl:2: no question field"),
    ([{"problem": "Q", "final": "1"}], {}, r"p\.jsonl:1: no answer field"),
    ([{"problem": "Q", "answer": "1"}], {"question_field": "q"}, r"p\.jsonl:1: no field 'q'"),
    ([{"problem": "Q", "solution": "no box here"}], {}, r"p\.jsonl:1: field 'solution' has no \\boxed"),
    ([{"problem": "", "answer": "1"}], {}, r"p\.jsonl:1: field 'problem' \(question\) must be a non-empty"),
    ([{"problem": "Q", "answer": None}], {}, r"p\.jsonl:1: no answer field"),
    ([{"problem": "Q", "answer": ["1"]}], {}, r"p\.jsonl:1: field 'answer' \(answer\) must be a string"),
    ([{"problem": "Q", "answer": "1", "level": "hard"}], {}, r"p\.jsonl:1: field 'level' \(difficulty\)"),
    ([{"problem": "Q", "answer": "1", "id": 1}, {"problem": "Q", "answer": "1", "id": "1"}], {},
     r"p\.jsonl:2: duplicate id '1' \(first at .*p\.jsonl:1\)"),
    (["[1, 2]"], {}, r"p\.jsonl:1: expected a JSON object"),
])
def test_bad_lines_name_file_and_line(tmp_path, rows, kwargs, message):
    with pytest.raises(MinirlError, match=message):
        load_problems(write_jsonl(tmp_path / "p.jsonl", rows), **kwargs)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(MinirlError, match="empty.jsonl: no problems"):
        load_problems(empty)
    with pytest.raises(MinirlError, match="empty.jsonl: no SFT examples"):
        load_sft_examples(empty)
    with pytest.raises(MinirlError, match="missing.jsonl: file not found"):
        load_problems(tmp_path / "missing.jsonl")
    with pytest.raises(MinirlError, match="missing.parquet: file not found"):
        load_problems(tmp_path / "missing.parquet")


def test_save_and_load_roundtrip(tmp_path):
    problems = [Problem("a", "Q1", "\\frac12", 3, {"task": "arithmetic", "expression": "1+2"}),
                Problem("b", "Q2", "5", None, {})]
    save_problems(problems, tmp_path / "out.jsonl")
    assert load_problems(tmp_path / "out.jsonl") == problems


def test_parquet_roundtrip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    table = pa.table({"problem": ["Q1", "Q2"], "solution": ["\\boxed{3}", "thus \\boxed{\\sqrt2}"],
                      "level": ["Level 1", "Level 5"], "subject": ["Algebra", "Geometry"]})
    pq.write_table(table, tmp_path / "p.parquet")
    problems = load_problems(tmp_path / "p.parquet")
    assert problems == [Problem("0", "Q1", "3", 1, {"subject": "Algebra", "solution": "\\boxed{3}"}),
                        Problem("1", "Q2", "\\sqrt2", 5, {"subject": "Geometry", "solution": "thus \\boxed{\\sqrt2}"})]
    pq.write_table(pa.table({"problem": ["Q1", "Q2"], "answer": ["1", None]}), tmp_path / "bad.parquet")
    with pytest.raises(MinirlError, match=r"bad\.parquet: row 2: no answer field"):
        load_problems(tmp_path / "bad.parquet")


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)          # makes "import pyarrow" fail
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(MinirlError, match="needs pyarrow"):
        load_problems(tmp_path / "p.parquet")


# --------------------------------------------------------------------------- SFT examples

def test_sft_examples(tmp_path):
    rows = [
        {"prompt": "Q", "response": "A"},
        {"prompt": "Q", "completion": "B"},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                      {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
                      {"role": "assistant", "content": "A2"}]},
    ]
    examples = load_sft_examples(write_jsonl(tmp_path / "s.jsonl", rows))
    assert examples[0] == SFTExample("Q", "A", None)
    assert examples[1] == SFTExample("Q", "B", None)
    assert examples[2].prompt == "U2" and examples[2].response == "A2" and len(examples[2].messages) == 5


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Q"}, r"s\.jsonl:1: expected 'prompt' and 'response'"),
    ({"prompt": "Q", "response": ""}, r"s\.jsonl:1: 'response' must be a non-empty string"),
    ({"prompt": 3, "response": "A"}, r"s\.jsonl:1: 'prompt' must be a string"),
    ({"messages": []}, r"s\.jsonl:1: 'messages' must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, r"s\.jsonl:1: messages\[0\]"),
    ({"messages": [{"role": "user", "content": "x"}]}, r"s\.jsonl:1: 'messages' has no assistant turn"),
])
def test_bad_sft_lines(tmp_path, row, message):
    with pytest.raises(MinirlError, match=message):
        load_sft_examples(write_jsonl(tmp_path / "s.jsonl", [row]))


# --------------------------------------------------------------------------- prompt templates

class FakeTokenizer:
    """Anything with apply_chat_template works; this one records what it was given."""

    chat_template = "{{ messages }}"

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, add_generation_prompt=True):
        self.calls.append((messages, add_generation_prompt))
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class NoTemplateTokenizer(FakeTokenizer):
    chat_template = None


def test_templates():
    assert set(TEMPLATES) == {"boxed", "r1-zero", "raw", "chat"}
    assert format_prompt("3+4=?", "raw") == "3+4=?"
    r1 = format_prompt("What is 2+2?", "r1-zero")
    assert r1.startswith("A conversation between User and Assistant.")
    assert r1.endswith("\nUser: What is 2+2?\nAssistant: <think>")
    tok = FakeTokenizer()
    assert format_prompt("Q", "boxed", tok) == f"<system>{BOXED_SYSTEM_PROMPT}<user>Q<assistant>"
    assert tok.calls[0][1] is True
    assert format_prompt("Q", "chat", tok) == "<user>Q<assistant>"
    assert format_prompt("Q", "boxed") == f"Q\n{BOXED_SYSTEM_PROMPT}\n"
    assert format_prompt("Q", "boxed", NoTemplateTokenizer()) == f"Q\n{BOXED_SYSTEM_PROMPT}\n"
    assert format_prompt("Q", "chat", NoTemplateTokenizer()) == "<user>Q<assistant>"   # its own fallback
    with pytest.raises(MinirlError, match="'chat' needs a tokenizer"):
        format_prompt("Q", "chat")
    with pytest.raises(MinirlError, match="unknown prompt template 'qwen'.*boxed"):
        format_prompt("Q", "qwen")
