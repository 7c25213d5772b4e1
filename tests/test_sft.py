"""train_sft.py and minirl/sft.py on a CPU: the loss is on response tokens only, packing and
padding give the same losses and gradients, a tiny model memorises its data, resume is exact,
the final folder loads in transformers, and bad input stops with one line and exit status 2."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from conftest import metric_lines  # noqa: E402
import train_sft  # noqa: E402
from minirl import MinirlError, load_model  # noqa: E402
from minirl.common import TrainingDiverged  # noqa: E402
from minirl.model import ModelConfig, Transformer  # noqa: E402
from minirl.sft import (Sequence, collate, encode_messages, encode_pair, micro_batches,  # noqa: E402
                        pack_rows, plan_epoch, response_logprobs, select_samples)
from minirl.tokenizer import char_tokenizer  # noqa: E402

CHARS = "0123456789+-*=()abcdefghijklmnopqrstuvwxyz ?.,\n\\{}"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine OpenMP's
    waiting between threads made steps 50x slower (seen: 1.8 s instead of 30 ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(vocab_size, **overrides):
    d = dict(model_type="llama", vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
    d.update(overrides)
    return d


def tiny_model(vocab_size=50, seed=0, **overrides):
    model = Transformer(ModelConfig.from_hf(tiny_config(vocab_size, **overrides)))
    model.init_weights(0.1, generator=torch.Generator().manual_seed(seed))
    return model


def random_sequences(n, vocab, seed=0, min_len=4, max_len=30):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = int(torch.randint(min_len, max_len + 1, (), generator=g))
        p = int(torch.randint(1, L - 1, (), generator=g))  # prompt length; >= 2 response tokens
        ids = torch.randint(3, vocab, (L,), generator=g).tolist()
        out.append(Sequence(ids, [0] * p + [1] * (L - p), str(i), f"example {i}"))
    return out


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    """A tokenizer folder and a config.json for --init-config."""
    d = tmp_path_factory.mktemp("assets")
    tok = char_tokenizer(CHARS)
    tok.save(str(d / "tok"))
    with open(d / "config.json", "w") as f:
        json.dump(tiny_config(tok.vocab_size), f)
    return d


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


PAIRS = [{"prompt": "12+7=", "response": "19"}, {"prompt": "3*4=", "response": "12"},
         {"prompt": "what is ab?", "response": "ab is ba reversed."},
         {"prompt": "9-5=", "response": "4"}, {"prompt": "(2+3)*2=", "response": "5*2=10"},
         {"prompt": "hello", "response": "world"}]


def base_args(tiny_assets, data, out, *extra):
    """Flags of a tiny CPU run; a flag repeated in `extra` overrides (argparse keeps the last)."""
    return ["--init-config", str(tiny_assets / "config.json"), "--tokenizer", str(tiny_assets / "tok"),
            *(["--data", str(data)] if data else []), "--out", str(out), "--max-len", "64",
            "--tokens-per-micro-batch", "128",
            "--val-fraction", "0", "--device", "cpu", *extra]


# ------------------------------------------------------------------ the loss


def reference_example_losses(model, seqs):
    """Per example: sum of -log p over its response tokens, from full fp32 logits of the
    example alone (the obvious, slow way)."""
    out = []
    for s in seqs:
        ids = torch.tensor(s.ids)[None]
        logp = torch.log_softmax(model(ids)[0].double(), -1)  # [L, V]
        m = torch.tensor(s.mask[1:], dtype=torch.bool)
        out.append(-logp[:-1].gather(1, ids[0, 1:, None])[:, 0][m].sum())
    return torch.stack(out)


def layout_losses_and_grads(model, seqs, rows, packing, tokens_per_micro_batch, max_len=64):
    """Per-example loss sums and the gradient of the step loss, for one layout."""
    model.zero_grad()
    lengths = [len(s) for s in seqs]
    n_targets = sum(s.num_targets for s in seqs)
    per_example = torch.zeros(len(seqs), dtype=torch.float64)
    mbs = micro_batches(rows, lengths, packing, max_len, tokens_per_micro_batch)
    for mb in mbs:
        batch = collate(seqs, mb, 0, "cpu")
        if packing:
            assert (batch.segment_ids is not None) == any(len(r) > 1 for r in mb)
        else:
            assert batch.segment_ids is None and batch.input_ids.shape[0] == len(mb)
        logp = response_logprobs(model, batch)
        (-logp.sum() / n_targets).backward()
        per_example.index_add_(0, batch.example, -logp.detach().double())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return per_example, grads, len(mbs)


def test_packed_and_padded_batches_give_the_same_losses_and_gradients():
    torch.manual_seed(0)
    model = tiny_model(vocab_size=50)
    seqs = random_sequences(13, 50, seed=1)
    lengths = [len(s) for s in seqs]
    rows = pack_rows(list(range(len(seqs))), lengths, 64)
    assert any(len(r) > 1 for r in rows)  # several examples share a row
    ref = reference_example_losses(model, seqs)
    results = {}
    for name, packing, budget in (("packed", True, 128), ("packed-1-row", True, 64),
                                  ("padded", False, 128), ("padded-small", False, 40)):
        results[name] = layout_losses_and_grads(model, seqs, rows, packing, budget)
    assert results["packed-1-row"][2] > results["packed"][2]  # gradient accumulation used
    assert results["padded-small"][2] > results["padded"][2]
    for name, (per_example, grads, _) in results.items():
        torch.testing.assert_close(per_example, ref, rtol=1e-5, atol=1e-5, msg=name)
        for pname, gr in grads.items():
            torch.testing.assert_close(gr, results["packed"][1][pname], rtol=1e-4, atol=1e-6,
                                       msg=f"{name} {pname}")


def test_prompt_tokens_contribute_nothing():
    model = tiny_model(vocab_size=50)
    seqs = random_sequences(6, 50, seed=2)
    rows = pack_rows(list(range(len(seqs))), [len(s) for s in seqs], 64)
    # Catch the final hidden states and keep their gradient.
    caught = {}

    def hook(module, inputs, output):
        output.retain_grad()
        caught["h"] = output

    handle = model.model.norm.register_forward_hook(hook)
    batch = collate(seqs, rows, 0, "cpu")
    loss = -response_logprobs(model, batch).sum()
    loss.backward()
    handle.remove()
    grad = caught["h"].grad.reshape(-1, caught["h"].shape[-1])  # [B*T, H]
    predicting = torch.zeros(grad.shape[0], dtype=torch.bool)
    predicting[batch.index] = True
    # Only positions whose next token is a response token get any gradient from the loss.
    assert (grad[~predicting] == 0).all()
    assert (grad[predicting].abs().sum(-1) > 0).all()
    assert batch.num_targets == sum(s.num_targets for s in seqs)

    # Changing what the prompt "would predict" (its own tokens after the first prompt token
    # are targets nowhere) leaves the loss unchanged when the response stays the same:
    # compare with a sequence whose prompt tokens are all masked differently.
    s = seqs[0]
    p = s.mask.index(1)
    a = Sequence(s.ids, s.mask, "a", "a")
    b = Sequence(s.ids, [0] * p + [1] * (len(s) - p), "b", "b")
    la = response_logprobs(model, collate([a], [[0]], 0, "cpu"))
    lb = response_logprobs(model, collate([b], [[0]], 0, "cpu"))
    torch.testing.assert_close(la, lb)
    assert len(la) == len(s) - p


def test_loss_equals_transformers_with_masked_labels(tmp_path):
    transformers = pytest.importorskip("transformers")
    from minirl import save_model
    model = tiny_model(vocab_size=50, seed=3)
    save_model(model, tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    seqs = random_sequences(4, 50, seed=4)
    for s in seqs:
        labels = torch.tensor([t if m else -100 for t, m in zip(s.ids, s.mask)])[None]
        ref = hf(torch.tensor(s.ids)[None], labels=labels).loss
        mine = -response_logprobs(model, collate([s], [[0]], 0, "cpu")).mean()
        torch.testing.assert_close(mine, ref.float(), rtol=1e-5, atol=1e-6)


def test_pack_rows_and_plan():
    lengths = [5, 60, 30, 30, 10, 64, 3, 40, 20]
    rows = pack_rows(list(range(len(lengths))), lengths, 64)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert len(rows) <= 5  # 262 tokens in rows of 64: 5 is the minimum
    a = plan_epoch(lengths, 0, 0, 64, 2)
    assert a == plan_epoch(lengths, 0, 0, 64, 2)  # a function of (seed, epoch)
    assert a != plan_epoch(lengths, 0, 1, 64, 2)


# ------------------------------------------------------------------ data


def test_chat_messages_train_only_assistant_turns():
    tok = char_tokenizer(CHARS)
    tok.tk.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1?"},
                {"role": "assistant", "content": "2"}, {"role": "user", "content": "and 2+2?"},
                {"role": "assistant", "content": "4."}]
    # eos is not the end-of-turn token: it is appended after the last turn.
    s = encode_messages(tok, messages, tok.eos_token_ids, "g", "w")
    trained = tok.decode([t for t, m in zip(s.ids, s.mask) if m], skip_special_tokens=False)
    assert trained == "2<|im_end|>4.<|im_end|><eos>"
    assert tok.decode(s.ids, skip_special_tokens=False) == tok.apply_chat_template(
        messages, add_generation_prompt=False).rstrip() + "<eos>"
    # eos = the end-of-turn token (an instruct model): nothing appended.
    im_end = tok.token_to_id("<|im_end|>")
    s2 = encode_messages(tok, messages, [im_end], "g", "w")
    trained = tok.decode([t for t, m in zip(s2.ids, s2.mask) if m], skip_special_tokens=False)
    assert trained == "2<|im_end|>4.<|im_end|>"
    with pytest.raises(MinirlError, match="no assistant message"):
        encode_messages(tok, messages[:2], [im_end], "g", "w")


def test_pair_ends_with_eos_once():
    tok = char_tokenizer(CHARS)
    s = encode_pair(tok, "1+1=", "2", 2, "g", "w")
    assert s.ids[-1] == 2 and s.ids.count(2) == 1 and s.mask == [0, 0, 0, 0, 1, 1]
    s = encode_pair(tok, "1+1=", "2<eos>", 2, "g", "w")
    assert s.ids.count(2) == 1


def test_samples_selection_is_deterministic(tmp_path):
    rows = []
    for pid in ("p1", "p2"):
        for i in (3, 0, 2, 1, 4):  # out of order on purpose
            rows.append({"problem_id": pid, "difficulty": 1, "gold": "2", "sample_index": i,
                         "question": f"q {pid}", "response": f"r{i}", "num_tokens": 2,
                         "finish_reason": "length" if i == 4 else "stop", "answer": "2",
                         "correct": i != 1 or pid == "p2"})
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    chosen, counts = select_samples(path, only_correct=True, max_per_problem=2)
    assert [(pid, r) for _, r, pid, _ in chosen] == [("p1", "r0"), ("p1", "r2"), ("p2", "r0"), ("p2", "r1")]
    assert counts["truncated"] == 2 and counts["incorrect"] == 1 and counts["samples"] == 10
    chosen, _ = select_samples(path, only_correct=False, max_per_problem=None)
    assert len(chosen) == 8


# ------------------------------------------------------------------ the script


def test_tiny_model_memorises_a_handful_of_examples(tmp_path, tiny_assets):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    out = tmp_path / "run"
    final = train_sft.main(base_args(tiny_assets, data, out, "--lr", "1e-2", "--epochs", "60",
                                     "--warmup-steps", "5", "--lr-schedule", "constant",
                                     "--batch-tokens", "128", "--save-every", "0"))
    metrics = metric_lines(out)
    assert metrics[-1]["loss"] < 0.05, metrics[-1]
    assert metrics[0]["loss"] > 2.0
    # The final folder is a model that reproduces the responses greedily.
    model = load_model(final, device="cpu")
    tok = char_tokenizer(CHARS)
    for ex in PAIRS[:3]:
        ids = tok.encode(ex["prompt"])
        for _ in range(len(ex["response"]) + 1):
            with torch.no_grad():
                ids.append(int(model(torch.tensor(ids)[None])[0, -1].argmax()))
        assert tok.decode(ids[len(tok.encode(ex["prompt"])):]) == ex["response"]


def test_resume_gives_the_same_metrics_and_weights(tmp_path, tiny_assets):
    rows = [{"prompt": f"{a}+{b}=", "response": f"{a + b}"} for a in range(7) for b in range(4)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    common = ["--lr", "3e-3", "--epochs", "3", "--batch-tokens", "128", "--warmup-steps", "2",
              "--val-fraction", "0.2", "--eval-every", "2", "--save-every", "0", "--keep-last", "1"]
    straight = tmp_path / "straight"
    train_sft.main(base_args(tiny_assets, data, straight, *common))
    resumed = tmp_path / "resumed"
    args = base_args(tiny_assets, data, resumed, *common)
    assert train_sft.main(args + ["--stop-after", "3"]) is None
    assert len(metric_lines(resumed)) == 4  # step 0 (val loss) + 3 steps
    train_sft.main(args + ["--resume"])
    a, b = metric_lines(straight), metric_lines(resumed)
    assert len(a) > 5 and a == b
    wa = load_model(straight / "final", device="cpu").state_dict()
    wb = load_model(resumed / "final", device="cpu").state_dict()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # Changing a flag that shapes the run is refused on resume.
    with pytest.raises(MinirlError, match="--lr"):
        train_sft.main(args[:args.index("--lr")] + ["--lr", "1e-3"] + args[args.index("--lr") + 2:]
                       + ["--resume"])


def test_final_folder_loads_in_transformers_with_identical_logits(tmp_path, tiny_assets):
    transformers = pytest.importorskip("transformers")
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    final = train_sft.main(base_args(tiny_assets, data, tmp_path / "run", "--max-steps", "3",
                                     "--batch-tokens", "64", "--no-packing"))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(final))
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    mine = load_model(final, device="cpu")
    ids = torch.randint(3, 40, (2, 23))
    with torch.no_grad():
        ref, out = hf(ids).logits, mine(ids)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5
    args = json.load(open(tmp_path / "run" / "args.json"))
    assert args["max_len"] == 64 and args["template"] == "raw" and args["batch_tokens"] == 64


def test_default_lr_depends_on_the_model(tmp_path, tiny_assets):
    # From scratch (--init-config) or the bundled model: the tiny-model rate; a given
    # pretrained checkpoint: a fine-tuning rate, so `--model Qwen...` is never hit with 2e-3.
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    final = train_sft.main(base_args(tiny_assets, data, tmp_path / "scratch", "--max-steps", "1"))
    assert json.load(open(tmp_path / "scratch" / "args.json"))["lr"] == train_sft.TINY_LR
    train_sft.main(["--model", str(final), "--data", str(data), "--out", str(tmp_path / "tuned"),
                    "--max-len", "64", "--tokens-per-micro-batch", "128", "--val-fraction", "0",
                    "--device", "cpu", "--max-steps", "1"])
    assert json.load(open(tmp_path / "tuned" / "args.json"))["lr"] == train_sft.MODEL_LR


def test_non_finite_loss_skips_then_stops(tmp_path, tiny_assets, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    real = train_sft.response_logprobs
    monkeypatch.setattr(train_sft, "response_logprobs", lambda m, b: real(m, b) * float("nan"))
    with pytest.raises(TrainingDiverged, match="3 steps in a row with a non-finite loss"):
        train_sft.main(base_args(tiny_assets, data, tmp_path / "run", "--max-bad-steps", "3",
                                 "--batch-tokens", "64"))
    lines = metric_lines(tmp_path / "run")
    assert [r.get("skipped") for r in lines] == [True, True]


def test_samples_file_and_default_task_data(tmp_path, tiny_assets, capsys):
    rows = [{"problem_id": f"p{k}", "difficulty": 1, "gold": str(k), "sample_index": i,
             "question": f"{k}+0=?", "response": f"{k}+0 = {k}. \\boxed{{{k}}}", "num_tokens": 9,
             "finish_reason": "stop", "answer": str(k), "correct": i != 1} for k in range(4) for i in range(3)]
    data = write_jsonl(tmp_path / "s.jsonl", rows)
    with open(tmp_path / "s.settings.json", "w") as f:
        json.dump({"model": "m", "n": 3, "template": "r1-zero"}, f)
    train_sft.main(base_args(tiny_assets, data, tmp_path / "run", "--only-correct", "--max-per-problem", "1",
                             "--max-len", "512", "--tokens-per-micro-batch", "512", "--max-steps", "1"))
    out = capsys.readouterr().out
    assert "12 samples of 4 problems, 4 kept (dropped: {'incorrect': 4, 'over_max_per_problem': 4})" in out
    assert json.load(open(tmp_path / "run" / "args.json"))["template"] == "r1-zero"  # the file's own
    # No --data: the task's teacher solutions (the default of `python train_sft.py`).
    train_sft.main(base_args(tiny_assets, None, tmp_path / "run2", "--train-problems", "40",
                             "--task-levels", "5", "--max-steps", "2", "--val-fraction", "0.1",
                             "--max-len", "256", "--tokens-per-micro-batch", "256"))
    out = capsys.readouterr().out
    assert "data: 40 teacher solutions of arithmetic levels [5]" in out and "held out: 4" in out
    assert len(metric_lines(tmp_path / "run2")) == 3  # the step-0 held-out loss, then 2 steps


# ------------------------------------------------------------------ bad input


def run_script(args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_sft.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_bad_input_exits_2_with_one_line(tmp_path, tiny_assets):
    bad = write_jsonl(tmp_path / "bad.jsonl", [PAIRS[0], {"prompt": "1+1="}])
    r = run_script(base_args(tiny_assets, bad, tmp_path / "run"), tmp_path)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:2" in err[0] and "response" in err[0], r.stderr
    r = run_script(base_args(tiny_assets, bad, tmp_path / "run2", "--batch-tokens", "64",
                             "--grad-accum", "2"), tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: --batch-tokens and --grad-accum both set the step size: give one")


@pytest.mark.parametrize("case,message", [
    ("empty", r"empty\.jsonl"),
    ("too_long_fail", r"d\.jsonl:3: example has \d+ tokens, more than --max-len 16"),
    ("only_correct_on_pairs", r"--only-correct: applies to samples files"),
    ("missing_file", r"--data .*nope\.jsonl: file not found"),
    ("init_and_model", r"--init-config builds a new model"),
    ("micro_batch_too_small", r"--tokens-per-micro-batch 8 is smaller than --max-len"),
    ("samples_without_question", r"s\.jsonl:1: missing key 'question'"),
])
def test_bad_input_messages(tmp_path, tiny_assets, case, message):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    args = base_args(tiny_assets, data, tmp_path / "run")
    if case == "empty":
        args[args.index("--data") + 1] = write_jsonl(tmp_path / "empty.jsonl", [])
    elif case == "too_long_fail":
        args[args.index("--max-len") + 1] = "16"
        args += ["--on-too-long", "fail"]
    elif case == "only_correct_on_pairs":
        args += ["--only-correct"]
    elif case == "missing_file":
        args[args.index("--data") + 1] = str(tmp_path / "nope.jsonl")
    elif case == "init_and_model":
        args += ["--model", str(tmp_path)]
    elif case == "micro_batch_too_small":
        args[args.index("--tokens-per-micro-batch") + 1] = "8"
    elif case == "samples_without_question":
        args[args.index("--data") + 1] = write_jsonl(tmp_path / "s.jsonl", [
            {"problem_id": "a", "sample_index": 0, "response": "x", "correct": True}])
    with pytest.raises(MinirlError, match=message):
        train_sft.main(args)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")  # stopped before any work


def test_too_long_examples_are_skipped_with_a_count(tmp_path, tiny_assets, capsys):
    rows = PAIRS + [{"prompt": "x" * 40, "response": "y" * 40}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    train_sft.main(base_args(tiny_assets, data, tmp_path / "run", "--max-steps", "1"))
    assert "skipped 1 example(s) longer than --max-len 64" in capsys.readouterr().out


# ------------------------------------------------------------------ flags checked before any work

BAD_FLAGS = [
    (["--lr", "-1"], "--lr must be > 0, got -1.0"),
    (["--lr", "nan"], "--lr must be > 0, got nan"),
    (["--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
    (["--min-lr-ratio", "2"], "--min-lr-ratio must be in [0, 1]"),
    (["--adam-beta2", "1"], "--adam-beta2 must be in [0, 1)"),
    (["--grad-clip", "-0.5"], "--grad-clip must be >= 0"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["--init-std", "0"], "--init-std must be > 0"),
    (["--eval-samples", "0"], "--eval-samples must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--max-bad-steps", "0"], "--max-bad-steps must be >= 1"),
    (["--keep-last", "-1"], "--keep-last must be >= 0"),
    (["--task-levels", "1,9"], "--task-levels '1,9': levels must be among"),
    (["--task-levels", "one"], "--task-levels 'one': expected comma-separated integers"),
    (["--device", "gpu0"], "--device 'gpu0': not a device"),
    (["--dtype", "fp8"], "--dtype fp8: unknown dtype"),
    (["--model", "/no/such/model"], "--model /no/such/model: folder not found"),
    (["--out", "/proc/x/run"], "--out /proc/x/run: cannot write there"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[f[0][0] + " " + f[0][1] for f in BAD_FLAGS])
def test_every_flag_is_checked_before_anything_is_loaded(tmp_path, monkeypatch, flags, message):
    """In-process for speed (the subprocess test below runs the same checks as a user):
    the error names the flag, and neither the tokenizer nor the model was loaded, nor was
    anything written."""
    def loaded(*a, **k):
        raise AssertionError("loaded something before checking the flags")
    monkeypatch.setattr(train_sft, "load_tokenizer", loaded)
    monkeypatch.setattr(train_sft, "load_model", loaded)
    out = tmp_path / "run"
    args = ["--out", str(out), "--device", "cpu"] + flags
    if flags[0] == "--model":
        args = [a for a in args if a != "--device"][:2] + flags  # (--device cpu is fine as well)
    with pytest.raises(MinirlError) as e:
        train_sft.main(args)
    assert str(e.value).startswith(message), str(e.value)
    assert not os.path.exists(out)


def test_bad_flags_as_a_user_sees_them(tmp_path):
    """Subprocess: one line, exit status 2, nothing printed before it, no run folder."""
    for flags, message in (BAD_FLAGS[0], BAD_FLAGS[-1], BAD_FLAGS[8]):
        out = flags[1] if flags[0] == "--out" else str(tmp_path / "run")
        r = run_script(["--out", out, *flags], tmp_path)
        assert r.returncode == 2, r.stderr
        assert r.stdout == "" and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
        assert r.stderr.startswith("error: " + message), r.stderr
        assert not os.path.exists(tmp_path / "run")


def test_a_second_run_in_the_same_folder_is_refused(tmp_path, tiny_assets):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    args = base_args(tiny_assets, data, tmp_path / "run", "--max-steps", "1")
    assert run_script(args, tmp_path).returncode == 0
    before = open(tmp_path / "run" / "metrics.jsonl").read()
    r = run_script(args, tmp_path)
    assert r.returncode == 2 and "already holds a run; pass --resume" in r.stderr, r.stderr
    assert open(tmp_path / "run" / "metrics.jsonl").read() == before


# ------------------------------------------------------------------ did it help: before / after


def greedy_accuracy(model, tok, problems, max_new):
    """Greedy answers by repeated full forward passes (no KV cache), graded by the task."""
    from minirl.tasks import verify
    correct = 0
    for p in problems:
        ids = tok.encode(p.question)
        start = len(ids)
        with torch.no_grad():
            for _ in range(max_new):
                nxt = int(model(torch.tensor(ids)[None])[0, -1].argmax())
                ids.append(nxt)
                if nxt in tok.eos_token_ids:
                    break
        correct += verify(p, tok.decode(ids[start:]))
    return correct / len(problems)


def test_before_after_summary_on_the_task_and_across_resume(tmp_path):
    """The default task data on the bundled model: summary.json's held-out loss before and
    after equals the mean -log p of the held-out teacher solutions under the base and the
    final model (computed here), its greedy accuracy equals greedy decoding done here, its
    pass@1 equals the seeded sampling stream; a run stopped and resumed writes the same summary."""
    from minirl.common import make_generator
    from minirl.sampler import generate
    from minirl.tasks import make_problems, teacher_solution, verify
    from minirl.tokenizer import load_tokenizer
    common = ["--train-problems", "120", "--task-levels", "1,4", "--val-fraction", "0.1",
              "--eval-samples", "2", "--max-new-tokens", "40", "--max-steps", "4", "--batch-tokens", "1024",
              "--tokens-per-micro-batch", "1024", "--max-len", "128", "--lr", "1e-3", "--warmup-steps", "1",
              "--seed", "4", "--eval-every", "0", "--device", "cpu"]
    r = run_script(["--out", str(tmp_path / "a"), *common], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "held-out, before -> after SFT" in r.stdout and "greedy before" in r.stdout
    summary = json.load(open(tmp_path / "a" / "summary.json"))
    before, after = summary["heldout_before"], summary["heldout_after"]
    ids = set(summary["eval_problem_ids"])
    problems = [p for p in make_problems("arithmetic", 120, 4, levels=[1, 4]) if p.id in ids]
    assert len(problems) == len(ids) == before["examples"] == 12  # every held-out problem graded
    tok = load_tokenizer(train_sft.DEFAULT_MODEL)
    for ev, model in ((before, load_model(train_sft.DEFAULT_MODEL, device="cpu")),
                      (after, load_model(tmp_path / "a" / "final", device="cpu"))):
        nll, count = 0.0, 0
        for p in problems:
            prompt = tok.encode(p.question)
            x = torch.tensor(prompt + tok.encode(teacher_solution(p), add_special_tokens=False)
                             + tok.eos_token_ids[:1])[None]
            with torch.no_grad():
                logp = torch.log_softmax(model(x)[0].double(), -1)[:-1].gather(1, x[0, 1:, None])[:, 0]
            nll -= float(logp[len(prompt) - 1:].sum())
            count += x.shape[1] - len(prompt)
        assert ev["loss"] == pytest.approx(nll / count, rel=1e-5)
        assert ev["accuracy"]["all"]["greedy"] == pytest.approx(greedy_accuracy(model, tok, problems, 40))
        with torch.no_grad():
            groups = generate(model, [tok.encode(p.question) for p in problems], n=2, max_new_tokens=40,
                              stop_token_ids=tok.eos_token_ids, generator=make_generator(4, "sft-heldout-samples"))
        pass1 = sum(verify(p, tok.decode(c.token_ids)) for p, gr in zip(problems, groups) for c in gr) / 24
        assert ev["accuracy"]["all"]["pass@1"] == pytest.approx(pass1)
    assert after["loss"] < before["loss"] and before["accuracy"]["all"]["greedy"] > 0  # not vacuous
    lines = metric_lines(tmp_path / "a")
    assert lines[0]["val_loss"] == before["loss"] and lines[-1]["val_loss"] == after["loss"]
    assert lines[-1]["heldout_greedy"] == after["accuracy"]["all"]["greedy"]
    # Stopped after 2 steps, resumed: the same summary (the "before" comes from the checkpoint).
    assert run_script(["--out", str(tmp_path / "b"), *common, "--stop-after", "2"], tmp_path).returncode == 0
    assert not os.path.exists(tmp_path / "b" / "summary.json")
    r = run_script(["--out", str(tmp_path / "b"), *common, "--resume"], tmp_path)
    assert r.returncode == 0 and "held-out before training" not in r.stdout, r.stderr
    resumed = json.load(open(tmp_path / "b" / "summary.json"))
    for key in ("heldout_before", "heldout_after", "eval_problem_ids", "steps"):
        assert resumed[key] == summary[key], key
