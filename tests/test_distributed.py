"""minirl.distributed on CPU with gloo: 2 processes under torchrun against 1 process.

One worker script does every check (a torchrun start costs seconds); the test compares what
the 2-rank and the 1-rank runs wrote: gradients of the GRPO loss split over ranks with global
denominators, per-rank parameter bytes, the gathered full state dict, and a DCP checkpoint
written by 2 ranks and read back by 1 (resharded)."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import make_tiny_model, rel_err
from minirl import distributed

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
