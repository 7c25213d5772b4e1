"""minirl.distributed on CPU with gloo: 2 processes under torchrun against 1 process.

One worker script does the library checks (a torchrun start costs seconds); the test compares
what the 2-rank and the 1-rank runs wrote: gradients of the GRPO loss split over ranks with
global denominators, per-rank parameter bytes, the gathered full state dict, and a DCP
checkpoint written by 2 ranks and read back by 1 (resharded). Then the entry scripts, run as
a user runs them (torchrun --standalone --nproc_per_node 2, gloo) against one process."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import minirl
from conftest import make_tiny_model, metric_lines, rel_err
from minirl import distributed
from minirl.training import verify_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r'''
import os, sys, torch
torch.set_num_threads(1)
from minirl import distributed, grpo
import minirl
from minirl.training import MasterAdamW
model_dir, out, mode = sys.argv[1:4]
dist = distributed.init("cpu")
model = minirl.load_model(model_dir, dtype=torch.float32)
g = torch.Generator().manual_seed(0)
samples = [grpo.Sample([1, 3, 4, 5][: 2 + i % 3], torch.randint(3, 20, (3 + i,), generator=g).tolist(),
                       float(i - 3)) for i in range(7)]  # 7 samples: ranks get 4 and 3
nseq, ntok = len(samples), sum(len(s.completion_ids) for s in samples)
full_bytes = distributed.local_bytes(model)
model = distributed.shard(model, dist)
result = {"full_bytes": full_bytes, "local_bytes": distributed.local_bytes(model)}
for agg in ("token-mean", "seq-mean-token-mean"):
    mine = distributed.split(samples, dist)
    loss, _ = grpo.policy_loss(model, mine, pad_id=0, temperature=0.7, eps_low=0.2, eps_high=0.3,
                               beta=0.0, kl_estimator="k3", aggregation=agg, num_sequences=nseq,
                               num_tokens=ntok, norm_length=10, on_policy=True)
    loss.backward()
    result[agg] = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                   for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = None
opt = MasterAdamW(model.parameters(), lr=1e-2)
if mode == "save":
    model(torch.randint(3, 20, (4, 9))).square().mean().backward()
    opt.step()
    distributed.save_sharded(os.path.join(out, "ckpt"), model, opt.opt, dist, {"step": 1})
else:
    result["extra"] = distributed.load_sharded(os.path.join(out, "ckpt"), model, opt.opt, dist)
result["state"] = distributed.full_state_dict(model, dist)
result["world"] = dist.world
if dist.main:
    torch.save(result, os.path.join(out, f"{mode}{dist.world}.pt"))
distributed.close(dist)
'''


def run(cmd, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    make_tiny_model(d / "model")
    (d / "worker.py").write_text(WORKER)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "worker.py", str(d / "model"), str(d), "save"], d)
    run([sys.executable, "worker.py", str(d / "model"), str(d), "load"], d)
    return torch.load(d / "save2.pt"), torch.load(d / "load1.pt")


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_two_rank_gradient_equals_one_rank(runs, agg):
    two, one = runs
    assert two["world"] == 2 and one["world"] == 1
    for name, g1 in one[agg].items():
        assert rel_err(two[agg][name], g1) < 1e-5, name


def test_each_rank_holds_half_the_parameters(runs):
    two, one = runs
    assert one["local_bytes"] == one["full_bytes"]
    assert abs(two["local_bytes"] / two["full_bytes"] - 0.5) < 0.02


def test_checkpoint_written_by_two_ranks_loads_in_one(runs):
    two, one = runs
    assert one["extra"] == {"step": 1}
    assert two["state"].keys() == one["state"].keys()
    for k, v in two["state"].items():
        assert torch.equal(v, one["state"][k]), k


def test_split_and_merge_are_inverse():
    items = list(range(11))
    for world in (1, 2, 3, 4):
        shares = [distributed.split(items, distributed.Dist(rank=r, world=world)) for r in range(world)]
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        assert distributed.merge(shares) == items


# ---------------------------------------------------------------- train_sft.py under torchrun

# "--" ends torchrun's own flags: without it torchrun refuses a script flag that abbreviates
# several of its own (evaluate.py's --n: "ambiguous option").
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--"]
SFT = os.path.join(ROOT, "train_sft.py")


def run_script(cmd, cwd, expect=0, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def assert_close_metrics(a, b, tol=1e-5):
    assert [set(r) for r in a] == [set(r) for r in b]
    for ra, rb in zip(a, b):
        for k, v in ra.items():
            if isinstance(v, float):
                assert abs(v - rb[k]) <= tol * max(abs(rb[k]), 1e-12), (ra["step"], k, v, rb[k])
            else:
                assert v == rb[k], (ra["step"], k, v, rb[k])


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    """One SFT setting run five ways: 1 process; 2 ranks; 2 ranks stopped after step 1 and
    resumed with 2 ranks; the same step-1 checkpoint resumed with 1 process; a 1-process
    step-1 checkpoint resumed with 2 ranks. 45 examples,
    steps of 3 packed rows (ranks take 2 and 1: uneven shares), val loss every 2 steps.
    lr 5e-4: Adam divides each gradient element by its own running magnitude, so the ~1e-7
    rounding of another summation order is amplified where a gradient is near zero; the
    final weights differed by 2.5e-5 of the largest weight at lr 3e-3 (measured), and the
    difference scales with the lr."""
    d = tmp_path_factory.mktemp("sft")
    with open(d / "d.jsonl", "w") as f:
        for a in range(9):
            for b in range(5):
                f.write(json.dumps({"prompt": f"{a}+{b}=", "response": f"{a + b}"}) + "\n")
    common = ["--data", str(d / "d.jsonl"), "--max-len", "64", "--tokens-per-micro-batch", "128",
              "--batch-tokens", "192", "--max-steps", "3", "--val-fraction", "0.1", "--eval-every", "2",
              "--device", "cpu", "--lr", "5e-4", "--warmup-steps", "1", "--save-every", "0"]
    out = {"dir": d}
    out["one"] = run_script([sys.executable, SFT, *common, "--out", str(d / "one")], d)
    out["two"] = run_script([*TORCHRUN, SFT, *common, "--out", str(d / "two")], d)
    run_script([*TORCHRUN, SFT, *common, "--out", str(d / "stop"), "--stop-after", "1"], d)
    shutil.copytree(d / "stop", d / "stop_one")
    out["resumed"] = run_script([*TORCHRUN, SFT, *common, "--out", str(d / "stop"), "--resume"], d)
    out["resharded"] = run_script([sys.executable, SFT, *common, "--out", str(d / "stop_one"), "--resume"], d)
    run_script([sys.executable, SFT, *common, "--out", str(d / "grow"), "--stop-after", "1"], d)
    out["grown"] = run_script([*TORCHRUN, SFT, *common, "--out", str(d / "grow"), "--resume"], d)
    return out


def test_sft_two_ranks_equal_one(sft_runs):
    d = sft_runs["dir"]
    one, two = metric_lines(d / "one"), metric_lines(d / "two")
    assert len(one) == 4 and "val_loss" in one[2]  # step 0 (val loss) + 3 steps
    assert_close_metrics(two, one)
    w1 = minirl.load_model(d / "one" / "final", device="cpu").state_dict()
    w2 = minirl.load_model(d / "two" / "final", device="cpu").state_dict()
    assert w1.keys() == w2.keys()
    for k in w1:
        assert rel_err(w2[k], w1[k]) < 1e-5, k
    # Rank 0 alone printed: each step line appears once.
    assert sft_runs["two"].stdout.count("step 3/3") == 1
    assert json.load(open(d / "two" / "args.json"))["max_steps"] == 3


def test_sft_two_rank_final_loads_in_transformers(sft_runs):
    transformers = pytest.importorskip("transformers")
    d = sft_runs["dir"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(d / "two" / "final", dtype=torch.float32)
    mine = minirl.load_model(d / "one" / "final", device="cpu")
    ids = torch.randint(3, 40, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(hf(ids).logits, mine(ids)) < 1e-5


def test_sft_resume_with_two_ranks_is_exact(sft_runs):
    d = sft_runs["dir"]
    assert "resumed from" in sft_runs["resumed"].stdout and "resharded" not in sft_runs["resumed"].stdout
    assert metric_lines(d / "stop") == metric_lines(d / "two")
    w1 = minirl.load_model(d / "two" / "final", device="cpu").state_dict()
    w2 = minirl.load_model(d / "stop" / "final", device="cpu").state_dict()
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k


def test_sft_two_rank_checkpoint_resumes_in_one_process(sft_runs):
    d = sft_runs["dir"]
    assert "resharded from 2 to 1 rank(s)" in sft_runs["resharded"].stdout
    assert_close_metrics(metric_lines(d / "stop_one"), metric_lines(d / "one"))
    # A sharded checkpoint is verified like any other (the manifest of its files): a
    # truncated shard is caught, so --resume would fall back to an earlier checkpoint.
    ckpt = d / "two" / "checkpoints" / "step_000003"
    assert sorted(os.listdir(d / "two" / "checkpoints")) == ["step_000003"]
    assert verify_checkpoint(str(ckpt)) is None
    shard = sorted(ckpt.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    assert "truncated" in verify_checkpoint(str(ckpt))


def test_sft_one_process_checkpoint_resumes_with_two_ranks(sft_runs):
    d = sft_runs["dir"]
    assert "resharded from 1 to 2 rank(s)" in sft_runs["grown"].stdout
    assert_close_metrics(metric_lines(d / "grow"), metric_lines(d / "one"))
    w1 = minirl.load_model(d / "one" / "final", device="cpu").state_dict()
    w2 = minirl.load_model(d / "grow" / "final", device="cpu").state_dict()
    for k in w1:
        assert rel_err(w2[k], w1[k]) < 1e-5, k


def test_sft_bad_flag_under_torchrun_one_line_and_every_rank_gone(tmp_path):
    t0 = time.time()
    proc = run_script([*TORCHRUN, SFT, "--lr", "-1", "--out", str(tmp_path / "run")], tmp_path, expect=1,
                      timeout=60)
    assert time.time() - t0 < 30
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("error:")]
    assert errors == ["error: --lr must be > 0, got -1.0"]
    # torchrun exits 1 and names the ranks' own exit status (2) in its summary
    assert "exitcode  : 2" in proc.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- evaluate.py sample under torchrun

EVALUATE = os.path.join(ROOT, "evaluate.py")


def sample_flags(out):
    """7 problems in chunks of 2: 4 chunks, the last one short; with 2 ranks the second round
    has one chunk (rank 1 idle)."""
    return ["sample", "--model", os.path.join(ROOT, "assets", "tiny-arith"), "--num-problems", "7",
            "--n", "3", "--max-new-tokens", "24", "--chunk-problems", "2", "--seed", "3", "--device", "cpu",
            "--out", str(out)]


def test_sample_two_ranks_byte_identical_and_resumes(tmp_path):
    run_script([sys.executable, EVALUATE, *sample_flags(tmp_path / "one.jsonl")], tmp_path)
    proc = run_script([*TORCHRUN, EVALUATE, *sample_flags(tmp_path / "two.jsonl")], tmp_path)
    one = (tmp_path / "one.jsonl").read_bytes()
    assert len(one.splitlines()) == 21
    assert (tmp_path / "two.jsonl").read_bytes() == one
    assert proc.stdout.count("sampled 7/7 problems") == 1  # rank 0 alone prints
    s1 = json.load(open(tmp_path / "one.settings.json"))
    s2 = json.load(open(tmp_path / "two.settings.json"))
    assert {k: v for k, v in s1.items() if k != "label"} == {k: v for k, v in s2.items() if k != "label"}
    # Interrupted after one whole chunk and part of the next, restarted with 2 ranks.
    lines = one.splitlines(keepends=True)
    (tmp_path / "cut.jsonl").write_bytes(b"".join(lines[:6 + 4]))
    shutil.copy(tmp_path / "one.settings.json", tmp_path / "cut.settings.json")
    proc = run_script([*TORCHRUN, EVALUATE, *sample_flags(tmp_path / "cut.jsonl")], tmp_path)
    assert "2/7 problems already sampled" in proc.stdout
    assert (tmp_path / "cut.jsonl").read_bytes() == one


# ---------------------------------------------------------------- train_grpo.py under torchrun

GRPO = os.path.join(ROOT, "train_grpo.py")
# Demo settings (the bundled model, arithmetic levels 1-3), made small: 3 steps of 5 prompts x 4.
GRPO_COMMON = ["--steps", "3", "--prompts-per-step", "5", "--num-samples", "4", "--max-new-tokens", "40",
               "--train-problems", "200", "--device", "cpu", "--save-every", "0", "--micro-batch-tokens", "256",
               "--lr", "1e-4"]
GRPO_CASES = {
    "demo": ["--eval-problems", "6", "--eval-samples", "2"],
    # several rounds per step, two optimizer steps per rollout (off-policy ratios), a sharded
    # reference model, clip-higher, temperature != 1
    "dynamic-minibatches": ["--eval-problems", "0", "--dynamic-sampling", "--mini-batches", "2", "--beta", "0.04",
                            "--eps-high", "0.28", "--temperature", "0.9"],
}
# Fields that are themselves rounding noise: the sampler/trainer log-prob mismatch (~1e-7, from
# two computations of the same numbers) and the on-policy loss (advantages sum to zero: ~1e-9).
NOISE = {"mismatch_abs_mean": 1e-5, "mismatch_abs_max": 1e-5, "mismatch_k3": 1e-5, "loss": 1e-7}


def grpo_metrics(run_dir):
    out = []
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        rec = json.loads(line)
        out.append({k: v for k, v in rec.items() if not k.startswith("t_") and not k.endswith("tok_s")})
    return out


def completions(dump):
    return [[(s["prompt_ids"], s["completion_ids"], s["reward"]) for s in json.loads(line)["samples"]]
            for line in open(dump)]


@pytest.fixture(scope="module", params=sorted(GRPO_CASES))
def grpo_pair(request, tmp_path_factory):
    """Each case: 1 process; 2 ranks; 2 ranks stopped after step 1 and resumed, with 2 ranks
    (dynamic-minibatches: must equal the straight 2-rank run exactly) or with 1 process (demo:
    resharded, must equal the 1-process run to 1e-5)."""
    d = tmp_path_factory.mktemp("grpo-" + request.param)
    flags = GRPO_COMMON + GRPO_CASES[request.param]
    one = run_script([sys.executable, GRPO, *flags, "--out", str(d / "one"), "--dump-rollouts", str(d / "one.jsonl")], d)
    two = run_script([*TORCHRUN, GRPO, *flags, "--out", str(d / "two"), "--dump-rollouts", str(d / "two.jsonl")], d)
    run_script([*TORCHRUN, GRPO, *flags, "--out", str(d / "stop"), "--stop-after", "1"], d)
    launcher = TORCHRUN if "dynamic" in request.param else [sys.executable]
    resumed = run_script([*launcher, GRPO, *flags, "--out", str(d / "stop"), "--resume"], d)
    return d, one, two, resumed


def assert_grpo_metrics_close(m1, m2):
    assert [set(r) for r in m1] == [set(r) for r in m2]
    for r1, r2 in zip(m1, m2):
        for k, v in r1.items():
            if isinstance(v, float):
                assert abs(v - r2[k]) <= 1e-5 * abs(v) + NOISE.get(k, 1e-9), (r1["step"], k, v, r2[k])
            else:
                assert v == r2[k], (r1["step"], k, v, r2[k])


def test_grpo_two_ranks_same_completions_and_metrics(grpo_pair):
    d, one, two, _ = grpo_pair
    c1, c2 = completions(d / "one.jsonl"), completions(d / "two.jsonl")
    assert len(c1) == 3 and c1 == c2  # token ids, rewards, order
    assert_grpo_metrics_close(grpo_metrics(d / "one"), grpo_metrics(d / "two"))
    u1 = [json.loads(line)["updates"] for line in open(d / "one.jsonl")]
    u2 = [json.loads(line)["updates"] for line in open(d / "two.jsonl")]
    assert [[u["samples"] for u in s] for s in u1] == [[u["samples"] for u in s] for s in u2]  # same mini-batches
    assert two.stdout.count("step    3/3") == 1  # rank 0 alone prints
    w1 = minirl.load_model(d / "one" / "final", device="cpu").state_dict()
    w2 = minirl.load_model(d / "two" / "final", device="cpu").state_dict()
    for k in w1:
        assert rel_err(w2[k], w1[k]) < 1e-5, k


def test_grpo_stop_and_resume(grpo_pair):
    d, _, _, resumed = grpo_pair
    stop = grpo_metrics(d / "stop")
    final = minirl.load_model(d / "stop" / "final", device="cpu").state_dict()
    if "dynamic" in d.name:  # resumed with 2 ranks: the straight 2-rank run exactly
        assert "resharded" not in resumed.stdout and "resumed from" in resumed.stdout
        assert stop == grpo_metrics(d / "two")
        straight = minirl.load_model(d / "two" / "final", device="cpu").state_dict()
        assert all(torch.equal(final[k], straight[k]) for k in straight)
    else:  # a 2-rank checkpoint resumed by one process
        assert "resharded from 2 to 1 rank(s)" in resumed.stdout
        assert_grpo_metrics_close(grpo_metrics(d / "one"), stop)


def test_grpo_dynamic_sampling_took_several_rounds(grpo_pair):
    d, _, _, _ = grpo_pair
    rounds = [r["sampling_rounds"] for r in grpo_metrics(d / "two") if "sampling_rounds" in r]
    dynamic = "dynamic" in d.name
    assert (max(rounds) > 1) == dynamic  # the case exercises what it claims


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_grpo_two_nodes_on_one_machine(tmp_path):
    """--nnodes 2, one process each, c10d rendezvous on localhost: one GRPO step."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(r), "--rdzv-backend", "c10d", "--rdzv-id", "minirl-test",
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "--", GRPO, *GRPO_COMMON,
                               "--steps", "1", "--eval-problems", "0", "--out", str(tmp_path / "run")],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")] == [1]
    assert os.path.exists(tmp_path / "run" / "final" / "model.safetensors")


HANG = r'''
import sys, time
from minirl import distributed
dist = distributed.init("cpu")
if dist.rank == 1:
    time.sleep(120)  # a rank that stops answering (stuck, or its node gone)
distributed.all_sum(1.0, dist)
'''


def test_a_rank_that_stops_answering_ends_the_job_within_the_timeout(tmp_path):
    """MINIRL_DIST_TIMEOUT bounds every collective: rank 0 fails after it, torchrun stops rank 1."""
    (tmp_path / "hang.py").write_text(HANG)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, MINIRL_DIST_TIMEOUT="5")
    t0 = time.time()
    proc = subprocess.run([*TORCHRUN, "hang.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode != 0
    assert "Timed out waiting 5000ms" in proc.stderr  # the collective timeout, not another failure
    assert time.time() - t0 < 60, time.time() - t0
