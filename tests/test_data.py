"""Problem / SFT data loading (field mapping, errors naming file and line, parquet) and
prompt templates."""
import json
import sys

import pytest

from minirl.common import MinirlError
from minirl.data import (BOXED_SYSTEM_PROMPT, TEMPLATES, Problem, SFTExample, data_kind, format_prompt,
                         load_problems, load_sft_examples, save_problems)


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


# --------------------------------------------------------------------------- Hugging Face datasets
# Built with `datasets` itself in tmp folders, shaped as the real sets are (field names and
# types from their dataset cards); no hub.

MATH500 = {"problem": ["How many ways?", "Compute $1+2$.", "Find $x$."],
           "solution": ["There are $\\boxed{10,\\!000}$ ways.", "It is $\\boxed{3}$.", "So $x=\\boxed{\\frac12}$."],
           "answer": ["10,\\!000", "3", "\\frac12"], "subject": ["Counting", "Algebra", "Algebra"],
           "level": [3, 1, 5], "unique_id": ["test/counting/1.json", "test/algebra/2.json", "test/algebra/3.json"]}
MATH = {"problem": ["P1", "P2"], "solution": ["So the total is $\\boxed{\\$16,\\!386.20}$.", "Hence \\boxed{2}."],
        "level": ["Level 4", "Level ?"], "type": ["Algebra", "Geometry"]}
GSM8K = {"question": ["Natalia sold 48 clips...", "Weng earns $12 an hour..."],
         "answer": ["She sold 48/2 = 24 in May.\n#### 72", "Weng earns 12/60 = $0.2 per minute.\n#### 10"]}
AIME_H4 = {"id": [60, 61], "problem": ["Every morning Aya...", "Let $ABC$ be..."],
           "solution": ["... $\\boxed{204}$", "... \\boxed{113}"], "answer": ["204", "113"],
           "url": ["https://a", "https://b"], "year": ["2024", "2024"]}
AIME_CAPS = {"ID": ["2024-I-1", "2024-I-2"], "Problem": ["Every morning Aya...", "There exist real numbers..."],
             "Solution": ["...", "..."], "Answer": [204, 25]}
AIME_QA = {"question": ["Find the sum of all integer bases...", "On triangle ABC..."], "answer": ["70", "588"]}


@pytest.fixture
def hf(tmp_path, monkeypatch):
    """The datasets package, its progress bars off and its cache in tmp_path."""
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    return datasets


def test_math500_save_to_disk_folder(tmp_path, hf):
    hf.Dataset.from_dict(MATH500).save_to_disk(tmp_path / "m500")
    problems = load_problems(tmp_path / "m500")
    assert problems[0] == Problem("test/counting/1.json", "How many ways?", "10,\\!000", 3,
                                  {"solution": MATH500["solution"][0], "subject": "Counting"})
    assert [p.answer for p in problems] == ["10,\\!000", "3", "\\frac12"]    # as written: the grader decides
    assert [p.difficulty for p in problems] == [3, 1, 5]


def test_math_splits_and_last_box(tmp_path, hf):
    d = hf.Dataset.from_dict(MATH)
    first = hf.Dataset.from_dict({k: v[:1] for k, v in MATH.items()})
    hf.DatasetDict(train=d, test=first).save_to_disk(tmp_path / "math")
    train = load_problems(tmp_path / "math", split="train")
    assert [p.answer for p in train] == ["\\$16,\\!386.20", "2"]             # the last box of the solution
    assert [p.difficulty for p in train] == [4, None]                       # "Level ?" is unknown
    assert train[0].meta == {"type": "Algebra", "solution": MATH["solution"][0]}
    assert len(load_problems(tmp_path / "math", split="test")) == 1
    with pytest.raises(MinirlError, match=r"math: the dataset has splits test, train; choose one"):
        load_problems(tmp_path / "math")
    with pytest.raises(MinirlError, match=r"math: no split 'validation'; the splits are: test, train$"):
        load_problems(tmp_path / "math", split="validation")
    with pytest.raises(MinirlError, match=r"math: config 'main' given, but a dataset saved on disk has no configs"):
        load_problems(tmp_path / "math", split="test", config="main")


def test_gsm8k_arrow_files_grouped_by_split(tmp_path, hf):
    """Arrow files named as the datasets cache names them: <name>-<split>[-shard].arrow."""
    d = hf.Dataset.from_dict(GSM8K)
    d.save_to_disk(tmp_path / "saved")
    arrow = tmp_path / "saved" / "data-00000-of-00001.arrow"
    (tmp_path / "gsm8k").mkdir()
    for name in ("gsm8k-test.arrow", "gsm8k-train-00000-of-00002.arrow", "gsm8k-train-00001-of-00002.arrow"):
        (tmp_path / "gsm8k" / name).write_bytes(arrow.read_bytes())
    test = load_problems(tmp_path / "gsm8k", split="test")
    assert [(p.id, p.answer) for p in test] == [("0", "72"), ("1", "10")]
    assert test[0].meta == {"solution": "She sold 48/2 = 24 in May."}      # the reasoning before ####
    assert [p.id for p in load_problems(tmp_path / "gsm8k", split="train")] == ["0", "1", "2", "3"]  # both shards
    with pytest.raises(MinirlError, match=r"gsm8k: the dataset has splits test, train"):
        load_problems(tmp_path / "gsm8k")
    one = load_problems(tmp_path / "gsm8k" / "gsm8k-test.arrow")              # one file: no splits
    assert [p.answer for p in one] == ["72", "10"]
    # Files without a split in their names (save_to_disk's) are shards of one dataset.
    assert len(load_problems(tmp_path / "saved" / "data-00000-of-00001.arrow")) == 2


@pytest.mark.parametrize("columns, ids, golds", [
    (AIME_H4, ["60", "61"], ["204", "113"]),            # HuggingFaceH4/aime_2024, AI-MO/aimo-validation-aime
    (AIME_CAPS, ["2024-I-1", "2024-I-2"], ["204", "25"]),  # Maxwell-Jia/AIME_2024: capitalised, int answers
    (AIME_QA, ["0", "1"], ["70", "588"]),               # opencompass/AIME2025: question / answer
], ids=["h4", "capitalised", "question-answer"])
def test_aime_layouts(tmp_path, hf, columns, ids, golds):
    hf.Dataset.from_dict(columns).save_to_disk(tmp_path / "aime")
    problems = load_problems(tmp_path / "aime")
    assert [p.id for p in problems] == ids and [p.answer for p in problems] == golds
    assert problems[0].question.startswith(("Every morning", "Find the sum"))


def test_verl_layout(tmp_path, hf):
    """verl's parquet/arrow layout: a chat prompt and reward_model.ground_truth."""
    hf.Dataset.from_dict({"data_source": ["aime25"], "prompt": [[{"role": "user", "content": "Find n."}]],
                          "reward_model": [{"ground_truth": "70", "style": "rule"}]}).save_to_disk(tmp_path / "v")
    p = load_problems(tmp_path / "v")[0]
    assert (p.question, p.answer, p.meta) == ("Find n.", "70", {"data_source": "aime25"})


def test_unknown_fields_name_the_found_and_expected(tmp_path, hf):
    hf.Dataset.from_dict({"text": ["Q"], "label": ["1"]}).save_to_disk(tmp_path / "odd")
    with pytest.raises(MinirlError) as e:
        load_problems(tmp_path / "odd")
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'odd'}: row 1: no question field (one of problem, question, prompt)")
    assert "fields: ['label', 'text']" in msg and "\n" not in msg
    hf.Dataset.from_dict({"problem": ["Q"], "final": ["1"]}).save_to_disk(tmp_path / "noans")
    with pytest.raises(MinirlError, match=r"noans: row 1: no answer field \(one of answer, solution, or "
                                          r"reward_model.ground_truth\); fields: \['final', 'problem'\]"):
        load_problems(tmp_path / "noans")
    assert load_problems(tmp_path / "noans", answer_field="final")[0].answer == "1"   # named: it loads


def test_dataset_errors(tmp_path, hf):
    hf.Dataset.from_dict(AIME_QA).save_to_disk(tmp_path / "one")
    with pytest.raises(MinirlError, match=r"one: holds a single dataset \(no named splits\); no split 'test'"):
        load_problems(tmp_path / "one", split="test")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(MinirlError, match=r"model: not a dataset folder \(no dataset_dict.json or state.json"):
        load_problems(tmp_path / "model")
    (tmp_path / "bad.arrow").write_bytes(b"not arrow")
    with pytest.raises(MinirlError, match=r"bad.arrow: not a readable arrow file of a dataset \(ArrowInvalid"):
        load_problems(tmp_path / "bad.arrow")
    write_jsonl(tmp_path / "p.jsonl", [{"problem": "Q", "answer": "1"}])
    with pytest.raises(MinirlError, match=r"p.jsonl: a split or config was given, but a .jsonl file has neither"):
        load_problems(tmp_path / "p.jsonl", split="test")
    with pytest.raises(MinirlError, match=r"missing/x.jsonl: file not found"):
        load_problems(tmp_path / "missing" / "x.jsonl")
    with pytest.raises(MinirlError, match=r"^\S*missing: file not found"):    # an absolute path is no hub id
        load_problems(tmp_path / "missing")


def test_without_the_datasets_package(tmp_path, hf, monkeypatch):
    hf.Dataset.from_dict(AIME_QA).save_to_disk(tmp_path / "aime")
    monkeypatch.setitem(sys.modules, "datasets", None)          # makes "import datasets" fail
    for source in (tmp_path / "aime", "opencompass/AIME2025"):
        with pytest.raises(MinirlError, match=r"reading a Hugging Face dataset needs the datasets package "
                                              r"\(pip install datasets, or pip install -e '\.\[hub\]'\)"):
            load_problems(source)
    assert len(load_problems(write_jsonl(tmp_path / "p.jsonl", [{"problem": "Q", "answer": "1"}]))) == 1


def test_hub_id_goes_to_load_dataset(tmp_path, hf, monkeypatch):
    """The hub path, offline: load_dataset replaced by one that returns a local DatasetDict."""
    calls = []

    def fake_load_dataset(path, name=None):
        calls.append((path, name))
        if name is None:
            raise ValueError("Config name is missing.\nPlease pick one among the available configs: "
                             "['main', 'socratic']")
        return hf.DatasetDict(train=hf.Dataset.from_dict(GSM8K), test=hf.Dataset.from_dict(GSM8K))
    monkeypatch.setattr(hf, "load_dataset", fake_load_dataset)
    problems = load_problems("openai/gsm8k", split="test", config="main")
    assert calls == [("openai/gsm8k", "main")] and [p.answer for p in problems] == ["72", "10"]
    with pytest.raises(MinirlError) as e:
        load_problems("openai/gsm8k", split="test")
    assert str(e.value) == ("openai/gsm8k: not a local path; as a hub dataset, it could not be loaded "
                            "(ValueError: Config name is missing. Please pick one among the available "
                            "configs: ['main', 'socratic'])")
    with pytest.raises(MinirlError, match=r"openai/gsm8k: no split 'tset'; the splits are: test, train"):
        load_problems("openai/gsm8k", split="tset", config="main")


def test_dataset_repository_folder(tmp_path, hf):
    """A local copy of a hub dataset repository (parquet data files) goes through load_dataset."""
    (tmp_path / "repo" / "data").mkdir(parents=True)
    hf.Dataset.from_dict(MATH500).to_parquet(str(tmp_path / "repo" / "data" / "test-00000-of-00001.parquet"))
    problems = load_problems(tmp_path / "repo")
    assert [p.id for p in problems] == MATH500["unique_id"] and problems[0].answer == "10,\\!000"


def test_data_kind(tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [{"problem": "Q", "answer": "1"}])
    (tmp_path / "t.parquet").write_bytes(b"")
    assert data_kind(tmp_path / "p.jsonl") == "jsonl" and data_kind(tmp_path / "t.parquet") == "parquet"
    assert data_kind(tmp_path) == "dataset folder" and data_kind("HuggingFaceH4/MATH-500") == "hub id"
    for missing in ("math.jsonl", "a/b.parquet", "a/b/c", str(tmp_path / "nope"), "./x"):
        with pytest.raises(MinirlError, match="file not found"):
            data_kind(missing)


def test_sft_examples_from_a_dataset(tmp_path, hf):
    hf.Dataset.from_dict({"messages": [[{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]],
                          "source": ["x"]}).save_to_disk(tmp_path / "chat")
    ex = load_sft_examples(tmp_path / "chat")
    assert ex == [SFTExample("U", "A", [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}])]
    assert ex[0].where == f"{tmp_path / 'chat'}: row 1"
    hf.DatasetDict(train=hf.Dataset.from_dict({"prompt": ["Q"], "response": ["R"]})).save_to_disk(tmp_path / "pairs")
    ex = load_sft_examples(tmp_path / "pairs")                                 # the only split
    assert ex == [SFTExample("Q", "R")] and ex[0].where == f"{tmp_path / 'pairs'}, split 'train': row 1"


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
