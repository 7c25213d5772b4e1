"""minirl.losses: the PyTorch references against float64, the chunked CPU path, the backend
dispatch, the GRPO loss against hand-computed numbers (on both backends), and input errors.
The Triton kernels' own accuracy tests are in tests/test_kernels.py."""
import math
import subprocess
import sys

import pytest
import torch

from minirl.common import MinirlError
from conftest import fp64_logprobs, rel_err
from minirl.kernels.ops import resolve_backend
from minirl.losses import grpo_token_loss, linear_logprobs, token_logprobs

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not HAVE_TRITON, reason="triton not installed"))]






# --------------------------------------------------------------------------------------
# torch references: values and gradients against float64
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("N,V", [(1, 1), (4, 7), (37, 1031)])
def test_token_logprobs_reference_fp32(N, V):
    g = torch.Generator().manual_seed(N * 1000 + V)
    logits = torch.randn(N, V, generator=g) * 4
    targets = torch.randint(0, V, (N,), generator=g)
    g_lp, g_h = torch.randn(N, generator=g), torch.randn(N, generator=g)

    x = logits.clone().requires_grad_()
    lp, ent = token_logprobs(x, targets, return_entropy=True, backend="torch")
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    ((lp * g_lp).sum() + (ent * g_h).sum()).backward()

    x64 = logits.double().requires_grad_()
    lp64, ent64 = fp64_logprobs(x64, targets)
    ((lp64 * g_lp.double()).sum() + (ent64 * g_h.double()).sum()).backward()
    assert rel_err(lp, lp64) < 1e-5
    if V > 1:
        assert rel_err(ent, ent64) < 1e-5
        assert rel_err(x.grad, x64.grad) < 1e-4
    else:  # one token: log p = 0, H = 0, gradient 0
        assert lp.abs().max() == 0 and ent.abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [1, 8, 37, None])
def test_linear_logprobs_torch_matches_unfused(dtype, chunk_size):
    """The chunked CPU path (custom backward, recomputed logits) == log_softmax(h @ W.T)."""
    g = torch.Generator().manual_seed(7)
    N, H, V = 37, 67, 1031
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / math.sqrt(H) * 3
    targets = torch.randint(0, V, (N,), generator=g)
    keep = torch.rand(N, generator=g) > 0.3  # masked tokens: zero upstream gradient
    g_lp = torch.randn(N, generator=g, dtype=torch.float64) * keep
    g_h = torch.randn(N, generator=g, dtype=torch.float64) * keep

    h = hidden.to(dtype).clone().requires_grad_()  # clone: fp64 .to() is a no-op
    w = weight.to(dtype).clone().requires_grad_()
    lp, ent = linear_logprobs(h, w, targets, return_entropy=True, chunk_size=chunk_size,
                              backend="torch")
    ((lp * g_lp.to(lp.dtype)).sum() + (ent * g_h.to(ent.dtype)).sum()).backward()

    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp64, ent64 = fp64_logprobs(h64 @ w64.t(), targets)
    ((lp64 * g_lp).sum() + (ent64 * g_h).sum()).backward()

    tol_v, tol_g = (1e-5, 1e-4) if dtype == torch.float32 else (1e-12, 1e-12)
    assert rel_err(lp, lp64) < tol_v and rel_err(ent, ent64) < tol_v
    assert rel_err(h.grad, h64.grad) < tol_g and rel_err(w.grad, w64.grad) < tol_g


def test_linear_logprobs_torch_logprob_only_and_entropy_only():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)  # leading dims [B, T, H]
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 50, (2, 5), generator=g)
    h = hidden.clone().requires_grad_()
    lp = linear_logprobs(h, weight, targets, chunk_size=3, backend="torch")  # weight frozen
    assert lp.shape == (2, 5)
    lp.sum().backward()
    h64 = hidden.clone().requires_grad_()
    fp64_logprobs(h64 @ weight.t(), targets)[0].sum().backward()
    assert rel_err(h.grad, h64.grad) < 1e-12

    h = hidden.clone().requires_grad_()
    _, ent = linear_logprobs(h, weight, targets, return_entropy=True, chunk_size=4,
                             backend="torch")
    ent.sum().backward()  # the logprob output unused: its upstream gradient is None
    h64 = hidden.clone().requires_grad_()
    fp64_logprobs(h64 @ weight.t(), targets)[1].sum().backward()
    assert rel_err(h.grad, h64.grad) < 1e-12


def test_linear_logprobs_torch_gradcheck():
    g = torch.Generator().manual_seed(11)
    h = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 9, (5,), generator=g)
    assert torch.autograd.gradcheck(
        lambda h, w: linear_logprobs(h, w, t, return_entropy=True, chunk_size=2,
                                     backend="torch"), (h, w))


# --------------------------------------------------------------------------------------
# GRPO loss: hand-computed examples, on both backends
# --------------------------------------------------------------------------------------

def _grpo(backend, logp, old_logp, adv, mask, **kw):
    logp = torch.tensor(logp, dtype=torch.float32, device=DEVICE).requires_grad_()
    old = torch.tensor(old_logp, dtype=torch.float32, device=DEVICE)
    adv = torch.tensor(adv, dtype=torch.float32, device=DEVICE)
    mask = torch.tensor(mask, dtype=torch.bool, device=DEVICE)
    if kw.get("ref_logp") is not None:
        kw["ref_logp"] = torch.tensor(kw["ref_logp"], dtype=torch.float32, device=DEVICE)
    loss, stats = grpo_token_loss(logp, old, adv, mask, backend=backend, **kw)
    loss.sum().backward()
    return loss.detach().cpu(), logp.grad.cpu(), {k: v.item() for k, v in stats.items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_clip_cases_by_hand(backend):
    """eps_low = 0.2, eps_high = 0.28 (clip-higher); old_logp = -1, logp = -1 + log r.
    Token by token, surrogate = -min(r A, clip(r, 0.8, 1.28) A), d/dlogp = -r A unless the
    clip is active:
      r=1.1, A=2:   no clip             loss = -min(2.2, 2.2)    = -2.2   grad -2.2
      r=1.5, A=1:   clip high           loss = -min(1.5, 1.28)   = -1.28  grad 0
      r=0.5, A=1:   below, A>0: kept    loss = -min(0.5, 0.8)    = -0.5   grad -0.5
      r=0.5, A=-1:  clip low            loss = -min(-0.5, -0.8)  = 0.8    grad 0
      r=1.5, A=-1:  above, A<0: kept    loss = -min(-1.5, -1.28) = 1.5    grad 1.5
      r=3.0, A=1:   masked (and logp = nan there): loss 0, grad 0"""
    r = [1.1, 1.5, 0.5, 0.5, 1.5, 3.0]
    logp = [[-1 + math.log(x) for x in r[:3]], [-1 + math.log(x) for x in r[3:5]] + [math.nan]]
    old = [[-1.0] * 3, [-1.0] * 3]
    adv = [[2.0, 1.0, 1.0], [-1.0, -1.0, 1.0]]
    mask = [[1, 1, 1], [1, 1, 0]]
    loss, grad, stats = _grpo(backend, logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(loss, torch.tensor([[-2.2, -1.28, -0.5], [0.8, 1.5, 0.0]]),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[-2.2, 0.0, -0.5], [0.0, 1.5, 0.0]]),
                               rtol=1e-6, atol=1e-6)
    assert stats["n_tokens"] == 5
    assert stats["clip_low_frac"] == pytest.approx(1 / 5)
    assert stats["clip_high_frac"] == pytest.approx(1 / 5)
    assert stats["clip_frac"] == pytest.approx(2 / 5)
    assert stats["ratio_mean"] == pytest.approx((1.1 + 1.5 + 0.5 + 0.5 + 1.5) / 5, rel=1e-6)
    assert stats["ratio_min"] == pytest.approx(0.5, rel=1e-6)
    assert stats["ratio_max"] == pytest.approx(1.5, rel=1e-6)
    assert stats["kl_mean"] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator,kl,dkl", [
    # logp = -1, ref_logp = -1.5: log_r = ref - logp = -0.5
    ("k1", 0.5, 1.0),                                  # -log_r;  d/dlogp = 1
    ("k2", 0.125, 0.5),                                # log_r^2/2 = 0.125;  d/dlogp = -log_r
    ("k3", 0.10653065971263342, 0.3934693402873666),   # e^-0.5 + 0.5 - 1;  1 - e^-0.5
])
def test_grpo_kl_estimators_by_hand(backend, estimator, kl, dkl):
    """On-policy (r = 1) with A = 0, the surrogate and its gradient vanish: the loss is
    beta * kl exactly. beta = 0.1; the second token is masked."""
    loss, grad, stats = _grpo(backend, [[-1.0, -2.0]], [[-1.0, -2.0]], [0.0], [[1, 0]],
                              ref_logp=[[-1.5, 5.0]], beta=0.1, kl_estimator=estimator)
    torch.testing.assert_close(loss, torch.tensor([[0.1 * kl, 0.0]]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, torch.tensor([[0.1 * dkl, 0.0]]), rtol=1e-6, atol=1e-7)
    assert stats["kl_mean"] == pytest.approx(kl, rel=1e-6)
    assert stats["ratio_mean"] == pytest.approx(1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_kl_logged_when_beta_zero_and_empty_mask(backend):
    loss, grad, stats = _grpo(backend, [[-1.0]], [[-1.0]], [[1.0]], [[1]],
                              ref_logp=[[-1.5]], beta=0.0, kl_estimator="k1")
    assert loss.item() == pytest.approx(-1.0) and grad.item() == pytest.approx(-1.0)
    assert stats["kl_mean"] == pytest.approx(0.5)
    loss, grad, stats = _grpo(backend, [[-1.0, -2.0]], [[-1.0, -2.0]], [1.0], [[0, 0]])
    assert loss.abs().max() == 0 and grad.abs().max() == 0
    assert stats["n_tokens"] == 0 and stats["clip_frac"] == 0 and stats["ratio_mean"] == 1.0


def test_grpo_reference_matches_autograd_definition():
    """Random inputs: the torch backend's loss equals the textbook formula, token by token,
    and its gradient is autograd's."""
    g = torch.Generator().manual_seed(5)
    N, T = 6, 9
    logp = (torch.randn(N, T, generator=g) - 2).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(N, T, generator=g)
    ref = logp.detach() + 0.2 * torch.randn(N, T, generator=g)
    adv = torch.randn(N, generator=g)
    mask = torch.rand(N, T, generator=g) > 0.2
    loss, _ = grpo_token_loss(logp, old, adv, mask, 0.2, 0.3, ref_logp=ref, beta=0.05,
                              kl_estimator="k3", backend="torch")
    loss.sum().backward()
    x = logp.detach().double().requires_grad_()
    r = torch.exp(x - old.double())
    a = adv.double()[:, None]
    surr = -torch.minimum(r * a, r.clamp(0.8, 1.3) * a)
    lr = ref.double() - x
    expect = (surr + 0.05 * (lr.exp() - lr - 1)) * mask
    expect.sum().backward()
    assert rel_err(loss, expect) < 1e-5 and rel_err(logp.grad, x.grad) < 1e-5


# --------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------

def test_resolve_backend(monkeypatch):
    monkeypatch.delenv("MINIRL_KERNELS", raising=False)
    assert resolve_backend(None, "cpu") == "torch"
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    if HAVE_TRITON:
        assert resolve_backend("auto", "cuda") == "triton"
    monkeypatch.setenv("MINIRL_KERNELS", "torch")
    assert resolve_backend(None, "cuda") == "torch"  # the variable overrides auto ...
    if HAVE_TRITON:
        assert resolve_backend("triton", "cuda") == "triton"  # ... not an explicit choice
    monkeypatch.setenv("MINIRL_KERNELS", "cuda-please")
    with pytest.raises(MinirlError, match="MINIRL_KERNELS"):
        resolve_backend(None, "cpu")
    with pytest.raises(MinirlError, match="backend="):
        resolve_backend("tritonn", "cpu")


@pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(MinirlError, match="TRITON_INTERPRET"):
        resolve_backend("triton", "cpu")


@pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
def test_env_var_selects_triton(monkeypatch):
    """MINIRL_KERNELS=triton on CPU tensors runs the kernel (here, in the interpreter)."""
    import minirl.kernels.logprobs as klp
    calls = []
    real = klp.logprobs_fwd_triton
    monkeypatch.setattr(klp, "logprobs_fwd_triton", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("MINIRL_KERNELS", "triton")
    logits = torch.randn(2, 5, device=DEVICE)
    lp = token_logprobs(logits, torch.tensor([0, 4], device=DEVICE))
    want = fp64_logprobs(logits, torch.tensor([0, 4], device=DEVICE))[0]
    assert calls and rel_err(lp, want) < 1e-6


def test_imports_and_runs_without_triton():
    """minirl.losses must import where triton is absent (macOS): simulate that in a fresh
    interpreter by making `import triton` fail."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from minirl.losses import token_logprobs, linear_logprobs, grpo_token_loss\n"
        "from minirl.common import MinirlError\n"
        "lp = token_logprobs(torch.zeros(2, 4), torch.tensor([0, 3]))\n"
        "assert torch.allclose(lp, torch.full((2,), -1.3862943611198906))\n"
        "linear_logprobs(torch.zeros(2, 3), torch.zeros(4, 3), torch.tensor([0, 3]))\n"
        "try:\n"
        "    token_logprobs(torch.zeros(2, 4), torch.tensor([0, 3]), backend='triton')\n"
        "    raise SystemExit('no error')\n"
        "except MinirlError as e:\n"
        "    assert 'not installed' in str(e)\n"
        "print('ok')\n"
    )
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MINIRL_KERNELS="auto")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=root, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# --------------------------------------------------------------------------------------
# Errors a user can cause: clear messages, never an out-of-bounds read
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_errors(backend):
    logits = torch.randn(3, 10, device=DEVICE)
    with pytest.raises(MinirlError, match=r"outside the vocabulary \[0, 10\)"):
        token_logprobs(logits, torch.tensor([0, 10, 2], device=DEVICE), backend=backend)
    with pytest.raises(MinirlError, match="outside the vocabulary"):
        token_logprobs(logits, torch.tensor([0, -1, 2], device=DEVICE), backend=backend)
    with pytest.raises(MinirlError, match="shape"):
        token_logprobs(logits, torch.tensor([0, 1], device=DEVICE), backend=backend)
    with pytest.raises(MinirlError, match="int64 or int32"):
        token_logprobs(logits, torch.tensor([0.0, 1.0, 2.0], device=DEVICE), backend=backend)
    with pytest.raises(MinirlError, match="floating point"):
        token_logprobs(torch.zeros(3, 10, dtype=torch.long, device=DEVICE),
                       torch.tensor([0, 1, 2], device=DEVICE), backend=backend)
    if backend == "triton":
        with pytest.raises(MinirlError, match="bf16, fp16 or fp32"):
            token_logprobs(logits.double(), torch.tensor([0, 1, 2], device=DEVICE),
                           backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_errors(backend):
    h, w = torch.randn(3, 4, device=DEVICE), torch.randn(10, 4, device=DEVICE)
    t = torch.tensor([0, 1, 2], device=DEVICE)
    with pytest.raises(MinirlError, match="outside the vocabulary"):
        linear_logprobs(h, w, torch.tensor([0, 1, 10], device=DEVICE), backend=backend)
    with pytest.raises(MinirlError, match="H=4"):
        linear_logprobs(torch.randn(3, 5, device=DEVICE), w, t, backend=backend)
    with pytest.raises(MinirlError, match="one floating dtype"):
        linear_logprobs(h.double(), w, t, backend=backend)
    with pytest.raises(MinirlError, match=r"\[V, H\]"):
        linear_logprobs(h, w[None], t, backend=backend)
    with pytest.raises(MinirlError, match="chunk_size"):
        linear_logprobs(h, w, t, chunk_size=0, backend=backend)


def test_grpo_errors():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(MinirlError, match="one shape"):
        grpo_token_loss(x, torch.zeros(2, 4), torch.zeros(2), m)
    with pytest.raises(MinirlError, match="advantages"):
        grpo_token_loss(x, x, torch.zeros(3), m)
    with pytest.raises(MinirlError, match="needs ref_logp"):
        grpo_token_loss(x, x, torch.zeros(2), m, beta=0.1)
    with pytest.raises(MinirlError, match="kl_estimator"):
        grpo_token_loss(x, x, torch.zeros(2), m, ref_logp=x, beta=0.1, kl_estimator="k4")
    with pytest.raises(MinirlError, match="floating point"):
        grpo_token_loss(x.long(), x, torch.zeros(2), m)
    with pytest.raises(MinirlError, match="eps_low"):
        grpo_token_loss(x, x, torch.zeros(2), m, eps_low=1.0)
