"""The scripts on Hugging Face datasets, run as users run them: evaluate.py and train_grpo.py
on a MATH-500-shaped save_to_disk folder with no field flags, and the errors a user can
cause (one line, exit 2). The datasets are built with `datasets` itself; no hub."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.fresh_process

# MATH-500's fields (HuggingFaceH4/MATH-500); lower-case questions fit the tiny model's characters.
MATH500 = {"problem": ["how many ways are there?", "compute 1+2.", "find x if x+1=3.", "what is 2*3?"],
           "solution": ["there are $\\boxed{10,\\!000}$ ways.", "it is $\\boxed{3}$.", "so $x=\\boxed{2}$.",
                        "$\\boxed{6}$"],
           "answer": ["10,\\!000", "3", "2", "6"], "subject": ["Counting", "Algebra", "Algebra", "Prealgebra"],
           "level": [3, 1, 2, 1],
           "unique_id": ["test/counting/1.json", "test/algebra/2.json", "test/algebra/3.json", "test/pre/4.json"]}


def run(script, *args, env=None):
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600, env=full_env)


@pytest.fixture(scope="module")
def math500(tmp_path_factory):
    datasets.disable_progress_bars()
    folder = tmp_path_factory.mktemp("hf") / "math500"
    datasets.Dataset.from_dict(MATH500).save_to_disk(str(folder))
    return folder


def test_evaluate_sample_on_a_math500_folder(tiny_model_dir, math500, tmp_path):
    out = tmp_path / "s.jsonl"
    proc = run("evaluate.py", "sample", "--model", tiny_model_dir, "--data", math500, "--n", 2,
               "--max-new-tokens", 4, "--template", "raw", "--out", out, "--seed", 1,
               env={"HF_DATASETS_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [json.loads(ln) for ln in open(out)]
    assert len(lines) == 8
    golds = {r["problem_id"]: r["gold"] for r in lines}
    assert golds == dict(zip(MATH500["unique_id"], MATH500["answer"]))   # 10,\!000 kept as written
    assert {r["problem_id"]: r["difficulty"] for r in lines} == dict(zip(MATH500["unique_id"], MATH500["level"]))


def test_train_grpo_on_a_math500_folder(tiny_model_dir, math500, tmp_path):
    out = tmp_path / "run"
    proc = run("train_grpo.py", "--model", tiny_model_dir, "--data", math500, "--template", "raw", "--steps", 1,
               "--prompts-per-step", 2, "--num-samples", 2, "--max-new-tokens", 4, "--eval-every", 0,
               "--save-every", 0, "--out", out, "--seed", 1, env={"HF_DATASETS_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    records = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1]


def one_line_exit_2(proc, *parts):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def bad_sources(tmp_path_factory, math500):
    d = tmp_path_factory.mktemp("bad")
    both = datasets.Dataset.from_dict(MATH500)
    datasets.DatasetDict(train=both, test=both).save_to_disk(str(d / "splits"))
    (d / "plain").mkdir()
    (d / "plain" / "notes.txt").write_text("not a dataset")
    blocker = d / "no_datasets"          # shadows the datasets package: "import datasets" fails
    blocker.mkdir()
    (blocker / "datasets.py").write_text("raise ImportError('datasets blocked by the test')\n")
    return d


def sample_cmd(model, data, out):
    return ["sample", "--model", model, "--data", data, "--n", 1, "--max-new-tokens", 2, "--template", "raw",
            "--out", out]


def test_dataset_errors_are_one_line_exit_2(tiny_model_dir, bad_sources, math500, tmp_path):
    """(Each run is a process start: the field and split cases are in test_data.py too.)"""
    out = tmp_path / "s.jsonl"
    # Today's IsADirectoryError traceback (exit 1) for a folder that is no dataset, in both scripts:
    one_line_exit_2(run("evaluate.py", *sample_cmd(tiny_model_dir, bad_sources / "plain", out)),
                    "plain: not a dataset folder")
    one_line_exit_2(run("train_grpo.py", "--model", tiny_model_dir, "--data", bad_sources / "plain",
                        "--template", "raw", "--steps", 1, "--out", tmp_path / "run"),
                    "plain: not a dataset folder")
    one_line_exit_2(run("evaluate.py", *sample_cmd(tiny_model_dir, bad_sources / "splits", out)),
                    "splits: the dataset has splits test, train; choose one")
    one_line_exit_2(run("evaluate.py", *sample_cmd(tiny_model_dir, math500, out),
                        env={"PYTHONPATH": str(bad_sources / "no_datasets")}),
                    "math500: reading a Hugging Face dataset needs the datasets package")
    assert not os.path.exists(out)


def test_hub_id_offline_is_one_line(tiny_model_dir, tmp_path):
    """The real hub path (no stub) with the hub unreachable: one line, exit 2."""
    proc = run("train_grpo.py", "--model", tiny_model_dir, "--data", "openai/gsm8k", "--template", "raw",
               "--steps", 1, "--out", tmp_path / "run", env={"HF_DATASETS_CACHE": str(tmp_path / "cache")})
    one_line_exit_2(proc, "openai/gsm8k: not a local path; as a hub dataset, it could not be loaded")
