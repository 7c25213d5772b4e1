"""train_sft.py end to end, with non-default settings for every flag that reaches the maths,
checked against values this file computes on its own.

Each test runs the script as a user does (a subprocess on the bundled tiny model) and then
recomputes what the run should have logged from nothing but the data file and the initial
weights: each example tokenised here (prompt via the template, response + eos), the step loss
as the plain mean of -log p over response tokens from full-vocabulary logits of each example
alone, the gradient by autograd, the update by torch.optim.AdamW with the schedule's
learning rate written out below. The runs are shaped so that one optimizer step holds the
whole training set (one step per epoch), so the reference needs no knowledge of the packing
order; a flag that does not reach the maths, or reaches it wrongly (a micro-batch's token
count as the denominator, prompt tokens in the loss, the lr of the wrong step, clipping or
betas dropped, the wrong samples or template), changes a logged loss, grad norm, lr or the
final weights."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from minirl import load_model  # noqa: E402
from minirl.data import format_prompt  # noqa: E402
from minirl.tasks import make_problems, teacher_solution  # noqa: E402
from minirl.tokenizer import load_tokenizer  # noqa: E402

BUNDLED = os.path.join(ROOT, "assets", "tiny-arith")
TIMEOUT = 180


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(BUNDLED)


def run_sft(args, cwd, expect=0):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train_sft.py"), *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == expect, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def metrics(run):
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


def pairs(n=14, seed=3):
    """Prompt/response pairs of the arithmetic task (levels 1-5: some the model knows)."""
    return [{"prompt": p.question, "response": teacher_solution(p)}
            for p in make_problems("arithmetic", n, seed, levels=[1, 2, 3, 4, 5])]


# ------------------------------------------------------------------ the reference, written out


def encode(tok, prompt, response, template):
    """(ids, n_prompt): the prompt through the template (with the tokenizer's special tokens:
    no chat template here), then the response and one eos."""
    p = tok.encode(format_prompt(prompt, template, tok), add_special_tokens=True)
    r = tok.encode(response, add_special_tokens=False) + [tok.eos_token_ids[0]]
    return p + r, len(p)


def step_loss(model, examples):
    """Mean over every response token of all examples of -log p(token | everything before),
    from the full fp32 logits of each example run alone."""
    total, count = 0.0, 0
    for ids, n_prompt in examples:
        x = torch.tensor(ids)[None]
        logp = torch.log_softmax(model(x)[0].float(), -1)  # [L, V]
        tok_logp = logp[:-1].gather(1, x[0, 1:, None])[:, 0]  # [L-1]: log p(token t+1)
        total = total - tok_logp[n_prompt - 1:].sum()  # response tokens only
        count += len(ids) - n_prompt
    return total / count


def schedule(step, lr, warmup, total, kind, min_ratio):
    """The documented schedule (step counts from 0): linear warmup to lr, then constant,
    cosine or linear decay to lr * min_ratio at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if kind == "constant":
        return lr
    t = (step - warmup) / max(1, total - warmup)
    f = 0.5 * (1 + math.cos(math.pi * t)) if kind == "cosine" else 1 - t
    return lr * (min_ratio + (1 - min_ratio) * f)


def reference_run(model, examples, steps, lrs, clip, betas, weight_decay):
    """`steps` full-batch AdamW steps (no decay on 1-D weights), clipping the gradient to
    `clip`. Returns the losses, pre-clip grad norms and the final weights."""
    params = [p for p in model.parameters()]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lrs[0], betas=betas, eps=1e-8)
    losses, norms = [], []
    for s in range(steps):
        for g in opt.param_groups:
            g["lr"] = lrs[s]
        opt.zero_grad()
        loss = step_loss(model, examples)
        loss.backward()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        if clip:
            for p in params:
                p.grad.mul_(min(1.0, clip / (float(norm) + 1e-6)))
        opt.step()
        losses.append(loss.item())
        norms.append(float(norm))
    return losses, norms, {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_weights_close(final_dir, ref_state, lr, what):
    """Weights within a small fraction of one update (lr) of the reference: rounding moves
    a few near-zero-gradient elements by a fraction of lr (measured: max 0.005 lr, mean
    3e-5 lr), a wiring bug moves most elements by ~lr."""
    got = load_model(final_dir, device="cpu").state_dict()
    for k, ref in ref_state.items():
        diff = (got[k] - ref).abs()
        assert float(diff.max()) < 0.05 * lr, f"{what}: {k} differs by {float(diff.max()):.3g} (lr {lr:g})"
        assert float(diff.mean()) < 1e-3 * lr, f"{what}: {k} mean diff {float(diff.mean()):.3g} (lr {lr:g})"


# ------------------------------------------------------------------ the tests


MATHS = dict(lr=3e-3, warmup=2, epochs=4, schedule="cosine", min_ratio=0.2, clip=0.5,
             betas=(0.8, 0.9), wd=0.1)


def maths_flags(m):
    return ["--lr", str(m["lr"]), "--warmup-steps", str(m["warmup"]), "--epochs", str(m["epochs"]),
            "--lr-schedule", m["schedule"], "--min-lr-ratio", str(m["min_ratio"]),
            "--grad-clip", str(m["clip"]), "--adam-beta1", str(m["betas"][0]),
            "--adam-beta2", str(m["betas"][1]), "--weight-decay", str(m["wd"]),
            "--val-fraction", "0", "--save-every", "0", "--device", "cpu"]


def check_against_reference(run, examples, m):
    lrs = [schedule(s, m["lr"], m["warmup"], m["epochs"], m["schedule"], m["min_ratio"])
           for s in range(m["epochs"])]
    model = load_model(BUNDLED, device="cpu")
    losses, norms, state = reference_run(model, examples, m["epochs"], lrs, m["clip"], m["betas"], m["wd"])
    logged = [r for r in metrics(run) if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, m["epochs"] + 1))  # one step per epoch
    for r, loss, norm, lr in zip(logged, losses, norms, lrs):
        assert r["lr"] == pytest.approx(lr, rel=1e-12), r
        assert r["loss"] == pytest.approx(loss, rel=2e-5), r
        assert r["grad_norm"] == pytest.approx(norm, rel=1e-4), r
    assert len({round(n, 3) for n in norms}) == len(norms) and min(norms) > m["clip"]  # clipping bites
    assert_weights_close(os.path.join(run, "final"), state, m["lr"], run)


@pytest.mark.parametrize("layout", [
    # packed, one row per micro-batch (gradient accumulation over 8+ micro-batches), --batch-tokens
    ["--tokens-per-micro-batch", "160", "--batch-tokens", "8000", "--template", "boxed"],
    # one padded example per row, the whole step in one micro-batch, --grad-accum
    ["--no-packing", "--tokens-per-micro-batch", "8000", "--grad-accum", "1", "--template", "raw"],
], ids=["packed-tiny-micro-batches", "padded-one-micro-batch"])
def test_updates_equal_an_independent_adamw_run(tmp_path, tok, layout):
    """Four full-batch steps with warmup, cosine decay, clipping, weight decay and odd betas:
    logged lr / loss / grad norm and the final weights equal the reference, for packed rows
    accumulated over many tiny micro-batches and for padded rows in one micro-batch."""
    rows = pairs()
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    template = layout[layout.index("--template") + 1]
    args = ["--model", BUNDLED, "--data", data, "--out", str(tmp_path / "run"), "--max-len", "160",
            *maths_flags(MATHS), *layout]
    examples = [encode(tok, r["prompt"], r["response"], template) for r in rows]
    assert max(len(ids) for ids, _ in examples) <= 160  # nothing skipped
    # 8000 // 160 = 50 rows per step (and per micro-batch with --grad-accum 1): the whole data,
    # as long as packing fills rows at least half
    assert 2 * sum(len(ids) for ids, _ in examples) < 8000
    run_sft(args, tmp_path)
    check_against_reference(str(tmp_path / "run"), examples, MATHS)


def test_samples_file_selection_template_and_too_long(tmp_path, tok):
    """A samples file with --only-correct --max-per-problem 2: the trained set is the two
    lowest-index correct, finished samples per problem (computed here), minus the ones longer
    than --max-len (--on-too-long skip, counted), prompted with the file's own template."""
    problems = make_problems("arithmetic", 5, 11, levels=[2, 3, 4])
    rows = []
    for k, p in enumerate(problems):
        good = teacher_solution(p)
        for i in (3, 0, 4, 1, 2, 5):  # out of order on purpose
            correct = (i + k) % 3 != 0
            resp = good if correct else f"{p.question[:-2]} = 7. \\boxed{{7}}"
            if k == 1 and i == 1:
                resp = good + " " + "1" * 80  # correct but too long for --max-len 64
            rows.append({"problem_id": p.id, "sample_index": i, "question": p.question,
                         "response": resp, "correct": correct, "answer": p.answer,
                         "finish_reason": "length" if i == 0 and k == 2 else "stop"})
    data = write_jsonl(tmp_path / "s.jsonl", rows)
    with open(tmp_path / "s.settings.json", "w") as f:
        json.dump({"model": "m", "n": 6, "template": "boxed"}, f)
    m = dict(MATHS, epochs=2)
    r = run_sft(["--model", BUNDLED, "--data", data, "--out", str(tmp_path / "run"), "--max-len", "128",
                 "--tokens-per-micro-batch", "128", "--batch-tokens", "8192", "--only-correct",
                 "--max-per-problem", "2", *maths_flags(m)], tmp_path)
    kept = []
    for p in problems:
        ok = sorted((x for x in rows if x["problem_id"] == p.id and x["correct"]
                     and x["finish_reason"] == "stop"), key=lambda x: x["sample_index"])[:2]
        kept += [encode(tok, x["question"], x["response"], "boxed") for x in ok]
    examples = [e for e in kept if len(e[0]) <= 128]
    assert len(kept) - len(examples) == 1
    assert "skipped 1 example(s) longer than --max-len 128" in r.stdout
    assert json.load(open(tmp_path / "run" / "args.json"))["template"] == "boxed"
    check_against_reference(str(tmp_path / "run"), examples, m)


def test_too_long_fail_names_the_example(tmp_path):
    rows = pairs(4)
    rows[2]["response"] += " " + "9" * 80
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    r = run_sft(["--model", BUNDLED, "--data", data, "--out", str(tmp_path / "run"), "--max-len", "64",
                 "--on-too-long", "fail", "--device", "cpu"], tmp_path, expect=2)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "d.jsonl:3: example has" in err[0] and "--max-len 64" in err[0], r.stderr
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_init_config_std_and_seed_reach_the_weights(tmp_path, tok):
    """--init-config with --init-std and --seed: the step-0 held-out loss (held-out = the
    training file) and the step-1 loss equal the loss of a model this test initialises from
    the same config, std and seed; another seed gives another loss."""
    from minirl.common import make_generator
    from minirl.model import ModelConfig, Transformer
    rows = pairs(8)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    config = json.load(open(os.path.join(BUNDLED, "config.json")))
    config.update(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    examples = [encode(tok, r["prompt"], r["response"], "raw") for r in rows]
    losses = {}
    for seed in (5, 6):
        out = tmp_path / f"run{seed}"
        run_sft(["--init-config", str(tmp_path / "config.json"), "--tokenizer", BUNDLED, "--init-std", "0.11",
                 "--seed", str(seed), "--data", data, "--val-data", data, "--out", str(out),
                 "--max-len", "64", "--tokens-per-micro-batch", "64", "--batch-tokens", "4096",
                 "--max-steps", "1", "--device", "cpu"], tmp_path)
        model = Transformer(ModelConfig.from_hf(config))
        model.init_weights(0.11, generator=make_generator(seed, "init-weights"))
        with torch.no_grad():
            ref = float(step_loss(model, examples))
        lines = metrics(out)
        assert lines[0]["step"] == 0 and lines[0]["val_loss"] == pytest.approx(ref, rel=1e-5)
        assert lines[1]["loss"] == pytest.approx(ref, rel=1e-5)
        losses[seed] = ref
    assert abs(losses[5] - losses[6]) > 1e-3
