"""The Triton kernels (kernels/) against float64 references: values and gradients with a
random upstream gradient, on tiny, odd and real-vocabulary shapes.

On CPU they run through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported): about 1 ms per launch and 60 us per program, so shapes stay small
and the real vocabularies (49,152 and 151,936) get only a few rows. On a CUDA machine the
same tests run the compiled kernels on the GPU, plus the GPU-only cases at the end.

Tolerances (max relative error of the whole tensor vs float64):
    fp32: values 1e-5, gradients 1e-4
    bf16: values 1e-2, gradients 2e-2 (+1 bf16 ulp: the interpreter truncates on store), and
          the kernel's error must not exceed PyTorch's own bf16 error (+1 ulp of slack).
"""
import math

import pytest
import torch

triton = pytest.importorskip("triton")

from minirl.losses import grpo_token_loss, linear_logprobs, token_logprobs  # noqa: E402
from conftest import fp64_logprobs, rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16_ULP = 2.0**-7  # relative spacing of bf16 numbers (8 significant bits)
gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_case(N, V, seed, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g) * scale  # spread like a trained model's logits
    targets = torch.randint(0, V, (N,), generator=g)
    keep = (torch.rand(N, generator=g) > 0.25).double()  # masked tokens: no upstream grad
    g_lp = torch.randn(N, generator=g, dtype=torch.float64) * keep
    g_ent = torch.randn(N, generator=g, dtype=torch.float64) * keep
    return logits, targets, g_lp, g_ent


def kernel_1(logits, targets, g_lp, g_ent, dtype):
    """Run the Triton kernel on logits in `dtype`; return (logp, entropy, grad) on the CPU."""
    x = logits.to(dtype).to(DEVICE).clone().requires_grad_()
    lp, ent = token_logprobs(x, targets.to(DEVICE), return_entropy=True, backend="triton")
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    ((lp * g_lp.to(DEVICE)).sum() + (ent * g_ent.to(DEVICE)).sum()).backward()
    assert x.grad.dtype == dtype  # the gradient comes back in the logits' dtype
    return lp.detach().cpu(), ent.detach().cpu(), x.grad.cpu()


def fp64_truth(logits, targets, g_lp, g_ent, dtype):
    """Float64 values and gradient for the logits as rounded to `dtype`."""
    x = logits.to(dtype).double().requires_grad_()
    lp, ent = fp64_logprobs(x, targets)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    return lp.detach(), ent.detach(), x.grad


# --------------------------------------------------------------------------------------
# Kernel 1: token log-probs from logits
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("N,V", [(1, 1), (2, 5), (37, 1031), (3, 49152), (3, 151936)])
def test_token_logprobs_fp32(N, V):
    logits, targets, g_lp, g_ent = make_case(N, V, seed=N + V)
    lp, ent, grad = kernel_1(logits, targets, g_lp, g_ent, torch.float32)
    lp64, ent64, grad64 = fp64_truth(logits, targets, g_lp, g_ent, torch.float32)
    if V == 1:  # a one-token vocabulary: log p = 0, H = 0, gradient 0
        assert lp.abs().max() == 0 and ent.abs().max() < 1e-6 and grad.abs().max() < 1e-6
        return
    assert rel_err(lp, lp64) < 1e-5
    assert rel_err(ent, ent64) < 1e-5
    assert rel_err(grad, grad64) < 1e-4


@pytest.mark.parametrize("N,V", [(37, 1031), (3, 49152), (3, 151936)])
def test_token_logprobs_bf16_no_worse_than_pytorch(N, V):
    logits, targets, g_lp, g_ent = make_case(N, V, seed=3 * N + V)
    lp, ent, grad = kernel_1(logits, targets, g_lp, g_ent, torch.bfloat16)
    lp64, ent64, grad64 = fp64_truth(logits, targets, g_lp, g_ent, torch.bfloat16)

    # PyTorch's own bf16 path: log_softmax in bf16, as a bf16 model computes it natively.
    x = logits.to(torch.bfloat16).requires_grad_()
    logp_all = torch.log_softmax(x, dim=-1)  # [N, V] bf16
    t_lp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    t_ent = -(logp_all.exp() * logp_all).sum(-1)
    ((t_lp * g_lp.bfloat16()).sum() + (t_ent * g_ent.bfloat16()).sum()).backward()

    e_lp, e_ent, e_grad = rel_err(lp, lp64), rel_err(ent, ent64), rel_err(grad, grad64)
    assert e_lp < 1e-2 and e_ent < 1e-2 and e_grad < 2e-2 + BF16_ULP
    # Values are fp32 maths on the bf16 logits: far better than bf16 softmax.
    assert e_lp <= rel_err(t_lp, lp64) + 1e-6 and e_ent <= rel_err(t_ent, ent64) + 1e-6
    # The gradient is rounded to bf16 once (truncated in the interpreter): within an ulp.
    assert e_grad <= rel_err(x.grad, grad64) + BF16_ULP


def test_token_logprobs_fp16_and_int32_targets():
    logits, targets, g_lp, g_ent = make_case(37, 1031, seed=2)
    x = logits.half().to(DEVICE).requires_grad_()
    lp, ent = token_logprobs(x, targets.int().to(DEVICE), return_entropy=True, backend="triton")
    ((lp * g_lp.to(DEVICE)).sum() + (ent * g_ent.to(DEVICE)).sum()).backward()
    lp64, ent64, grad64 = fp64_truth(logits, targets, g_lp, g_ent, torch.float16)
    assert x.grad.dtype == torch.float16
    assert rel_err(lp.cpu(), lp64) < 1e-5 and rel_err(ent.cpu(), ent64) < 1e-5
    assert rel_err(x.grad.cpu(), grad64) < 2e-3  # fp16 keeps 11 bits: ulp 2^-10


def test_token_logprobs_strided_rows_and_leading_dims():
    """Row-strided logits (a [N, V] slice of a wider buffer) go to the kernel without a copy
    (it takes the row stride); leading dims [B, T, V] and a transposed (column-strided)
    input, which is copied, give the same answers."""
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(6, 320, generator=g) * 3
    targets = torch.randint(0, 300, (6,), generator=g)
    view = wide.to(DEVICE)[:, :300]  # [6, 300], stride (320, 1)
    lp, ent = token_logprobs(view, targets.to(DEVICE), return_entropy=True, backend="triton")
    lp64, ent64 = fp64_logprobs(wide[:, :300], targets)
    assert rel_err(lp.cpu(), lp64) < 1e-5 and rel_err(ent.cpu(), ent64) < 1e-5

    lp3 = token_logprobs(wide[:, :300].reshape(2, 3, 300).to(DEVICE),
                         targets.reshape(2, 3).to(DEVICE), backend="triton")
    assert lp3.shape == (2, 3) and rel_err(lp3.cpu().reshape(6), lp64) < 1e-5

    logits_t = wide.t().contiguous().to(DEVICE).t()  # [6, 320], stride (1, 6)
    t = targets.to(DEVICE)
    assert rel_err(token_logprobs(logits_t, t, backend="triton").cpu(),
                   fp64_logprobs(wide, targets)[0]) < 1e-5


def test_token_logprobs_one_output_used():
    logits, targets, g_lp, _ = make_case(5, 77, seed=9)
    x = logits.to(DEVICE).clone().requires_grad_()
    lp = token_logprobs(x, targets.to(DEVICE), backend="triton")
    (lp * g_lp.float().to(DEVICE)).sum().backward()
    x64 = logits.double().requires_grad_()
    (fp64_logprobs(x64, targets)[0] * g_lp).sum().backward()
    assert rel_err(x.grad.cpu(), x64.grad) < 1e-4

    x = logits.to(DEVICE).clone().requires_grad_()
    _, ent = token_logprobs(x, targets.to(DEVICE), return_entropy=True, backend="triton")
    ent.sum().backward()  # logprob unused: its upstream gradient is None
    x64 = logits.double().requires_grad_()
    fp64_logprobs(x64, targets)[1].sum().backward()
    assert rel_err(x.grad.cpu(), x64.grad) < 1e-4


def test_entropy_of_peaked_rows_is_accurate():
    """A nearly one-hot row has H ~ 2e-7: the online sum keeps it relative to the running
    max, so it does not come out as lse - sum p z, a difference of two numbers near 25
    whose fp32 rounding (25 x 6e-8 = 1.5e-6) would swamp it. What fp32 still loses is
    log s = log(1 + 499 e^-25) = 7e-9, below fp32's epsilon: hence the 1e-8 bound."""
    logits = torch.zeros(2, 500)
    logits[0, 7] = 25.0
    logits[1, 3] = 60.0
    lp, ent = token_logprobs(logits.to(DEVICE), torch.tensor([7, 3], device=DEVICE),
                             return_entropy=True, backend="triton")
    lp64, ent64 = fp64_logprobs(logits, torch.tensor([7, 3]))
    assert (ent.cpu().double() - ent64).abs().max() < 1e-8
    assert (lp.cpu().double() - lp64).abs().max() < 1e-7


# --------------------------------------------------------------------------------------
# Kernel 2: fused linear log-probs (chunked matmul + kernel 1)
# --------------------------------------------------------------------------------------

def make_linear_case(N, H, V, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (3 / math.sqrt(H))
    targets = torch.randint(0, V, (N,), generator=g)
    keep = (torch.rand(N, generator=g) > 0.25).double()
    return (hidden, weight, targets, torch.randn(N, generator=g, dtype=torch.float64) * keep,
            torch.randn(N, generator=g, dtype=torch.float64) * keep)


def run_linear(hidden, weight, targets, g_lp, g_ent, dtype, backend, chunk_size=None,
               fused=True):
    h = hidden.to(dtype).to(DEVICE).clone().requires_grad_()  # never flag the caller's
    w = weight.to(dtype).to(DEVICE).clone().requires_grad_()
    t = targets.to(DEVICE)
    if fused:
        lp, ent = linear_logprobs(h, w, t, return_entropy=True, chunk_size=chunk_size,
                                  backend=backend)
    else:  # the unfused path: full logits, then kernel 1
        lp, ent = token_logprobs(h @ w.t(), t, return_entropy=True, backend=backend)
    ((lp * g_lp.to(DEVICE)).sum() + (ent * g_ent.to(DEVICE)).sum()).backward()
    return [x.detach().cpu() for x in (lp, ent, h.grad, w.grad)]


def linear_truth(hidden, weight, targets, g_lp, g_ent, dtype):
    h = hidden.to(dtype).double().requires_grad_()
    w = weight.to(dtype).double().requires_grad_()
    lp, ent = fp64_logprobs(h @ w.t(), targets)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    return lp.detach(), ent.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk_size", [5, 16, 37])
def test_linear_logprobs_fp32_odd_shapes(chunk_size):
    case = make_linear_case(37, 67, 1031, seed=4)
    fused = run_linear(*case, torch.float32, "triton", chunk_size=chunk_size)
    truth = linear_truth(*case, torch.float32)
    for got, want, tol in zip(fused, truth, (1e-5, 1e-5, 1e-4, 1e-4)):
        assert rel_err(got, want) < tol
    # fused == unfused (full logits, then kernel 1), within rounding
    unfused = run_linear(*case, torch.float32, "triton", fused=False)
    for got, want in zip(fused, unfused):
        assert rel_err(got, want) < 1e-5


def test_linear_logprobs_chunk_size_only_changes_rounding():
    case = make_linear_case(37, 67, 1031, seed=5)
    a = run_linear(*case, torch.float32, "triton", chunk_size=1)
    b = run_linear(*case, torch.float32, "triton", chunk_size=None)  # default: one chunk here
    for x, y in zip(a, b):
        assert rel_err(x, y) < 1e-5
    # the torch backend runs the same chunking with torch maths per chunk
    c = run_linear(*case, torch.float32, "torch", chunk_size=8)
    for x, y in zip(a, c):
        assert rel_err(x, y) < 1e-5


def test_linear_logprobs_bf16_no_worse_than_pytorch():
    case = make_linear_case(37, 67, 1031, seed=6)
    hidden, weight, targets, g_lp, g_ent = case
    got = run_linear(*case, torch.bfloat16, "triton", chunk_size=16)
    truth = linear_truth(*case, torch.bfloat16)
    # PyTorch's own bf16 path: bf16 matmul, bf16 log_softmax, autograd in bf16
    h = hidden.bfloat16().requires_grad_()
    w = weight.bfloat16().requires_grad_()
    logp_all = torch.log_softmax(h @ w.t(), dim=-1)
    t_lp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    t_ent = -(logp_all.exp() * logp_all).sum(-1)
    ((t_lp * g_lp.bfloat16()).sum() + (t_ent * g_ent.bfloat16()).sum()).backward()
    torch_out = [t_lp.detach(), t_ent.detach(), h.grad, w.grad]
    for got_x, torch_x, want, tol in zip(got, torch_out, truth, (1e-2, 1e-2, 2e-2, 2e-2)):
        e = rel_err(got_x, want)
        assert e < tol + BF16_ULP
        assert e <= rel_err(torch_x, want) + BF16_ULP


@pytest.mark.parametrize("V", [49152, 151936])
def test_linear_logprobs_real_vocab_few_rows(V):
    case = make_linear_case(3, 32, V, seed=V)
    got = run_linear(*case, torch.float32, "triton", chunk_size=2)
    truth = linear_truth(*case, torch.float32)
    for x, want, tol in zip(got, truth, (1e-5, 1e-5, 1e-4, 1e-4)):
        assert rel_err(x, want) < tol


# --------------------------------------------------------------------------------------
# Kernel 3: GRPO loss (hand-computed cases are in tests/test_losses.py, both backends)
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kl_estimator", [None, "k1", "k2", "k3"])
def test_grpo_kernel_matches_reference(kl_estimator):
    g = torch.Generator().manual_seed(17)
    N, T = 7, 301  # 2107 tokens: not a multiple of the block
    logp = torch.randn(N, T, generator=g) - 2
    old = logp + 0.4 * torch.randn(N, T, generator=g)  # ratios well outside [0.8, 1.28]
    ref = logp + 0.3 * torch.randn(N, T, generator=g)
    adv = torch.randn(N, generator=g)
    mask = torch.rand(N, T, generator=g) > 0.3
    logp[~mask] = float("nan")  # garbage in the padding must not leak
    upstream = torch.randn(N, T, generator=g)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.0 if kl_estimator is None else 0.04,
              ref_logp=None if kl_estimator is None else ref.to(DEVICE),
              kl_estimator=kl_estimator or "k3")
    out = {}
    for backend in ("torch", "triton"):
        x = logp.clone().to(DEVICE).requires_grad_()
        loss, stats = grpo_token_loss(x, old.to(DEVICE), adv.to(DEVICE), mask.to(DEVICE),
                                      backend=backend, **kw)
        (loss * upstream.to(DEVICE)).sum().backward()
        out[backend] = (loss.detach().cpu(), x.grad.cpu(), {k: v.item() for k, v in stats.items()})
    (l_ref, g_ref, s_ref), (l_tri, g_tri, s_tri) = out["torch"], out["triton"]
    assert torch.isfinite(l_tri).all() and torch.isfinite(g_tri).all()
    assert rel_err(l_tri, l_ref) < 1e-5 and rel_err(g_tri, g_ref) < 1e-5
    assert s_tri["clip_low_frac"] > 0 and s_tri["clip_high_frac"] > 0  # both cases exercised
    for k in s_ref:
        assert s_tri[k] == pytest.approx(s_ref[k], rel=1e-5, abs=1e-7), k


# --------------------------------------------------------------------------------------
# GPU only
# --------------------------------------------------------------------------------------

@gpu_only
def test_int64_offsets_beyond_2_31_elements():
    """N x V > 2^31 (14,200 x 151,936 bf16 = 4.3 GB): row * stride must not wrap in int32."""
    N, V = 14200, 151936
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(N, V, generator=g, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, V, (N,), generator=g, device="cuda")
    x = logits.requires_grad_()
    lp = token_logprobs(x, targets, backend="triton")
    lp[-3:].sum().backward()  # the last rows live past element 2^31
    rows = torch.arange(N - 3, N, device="cuda")
    lp64, _ = fp64_logprobs(logits[rows].detach(), targets[rows])
    assert rel_err(lp[rows], lp64) < 1e-5
    want = torch.softmax(logits[rows].detach().double(), -1).neg_()
    want[torch.arange(3), targets[rows]] += 1
    assert rel_err(x.grad[rows], want) < 2e-2
    assert x.grad[: N - 3].abs().max() == 0


@gpu_only
def test_gpu_bf16_head_triton_matches_torch():
    """A Qwen2.5-1.5B-sized head in bf16: Triton and torch backends agree."""
    case = make_linear_case(1024, 1536, 151936, seed=0)
    a = run_linear(*case, torch.bfloat16, "triton")
    b = run_linear(*case, torch.bfloat16, "torch")
    for x, y in zip(a, b):
        assert rel_err(x, y) < 2e-2


@gpu_only
def test_gpu_no_fp32_copy_of_logits():
    """Kernel 1 on bf16 logits [N, V]: forward + backward allocate the bf16 gradient and
    O(N) vectors, nothing like an fp32 [N, V] (which would be 2x the logits' bytes)."""
    N, V = 2048, 151936
    logits = torch.randn(N, V, device="cuda", dtype=torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V, (N,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lp, ent = token_logprobs(logits, targets, return_entropy=True, backend="triton")
    (lp.sum() + ent.sum()).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 1.1 * logits.numel() * logits.element_size()  # the gradient, ~ nothing more
