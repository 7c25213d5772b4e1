"""kernels/ops.py: the kernels as torch custom ops. A log-prob + GRPO loss step compiled with
torch.compile(fullgraph=True) equals eager (values and gradients), the ops trace under
FakeTensorMode (fake CPU tensors, bf16 and fp32, forward and backward), and
torch.library.opcheck accepts each op (schema, fake implementation, autograd registration).
The Triton variants run in the interpreter here (TRITON_INTERPRET=1, set by conftest)."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import rel_err
from minirl import grpo
from minirl.kernels import ops
from minirl.losses import grpo_token_loss, linear_logprobs, token_logprobs

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not HAVE_TRITON, reason="triton not installed"))]


def _inputs(seed, B=3, T=5, H=16, V=67, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / 4).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    old = -torch.rand(B, T, generator=g) * 3
    ref = -torch.rand(B, T, generator=g) * 3
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    return hidden, weight, targets, old, ref, adv, mask


def _step(hidden, weight, targets, old, ref, adv, mask, backend):
    """What a GRPO micro-batch does with the policy's hidden states: log-probs and entropy
    through the lm-head, the per-token loss with a KL term, aggregation, an entropy bonus."""
    logp, entropy = linear_logprobs(hidden, weight, targets, return_entropy=True, chunk_size=4,
                                    backend=backend)  # [B, T] each
    loss, stats = grpo_token_loss(logp, old, adv, mask, 0.2, 0.28, ref_logp=ref, beta=0.05,
                                  kl_estimator="k3", backend=backend)
    total = grpo.aggregate(loss, mask, "token-mean", mask.shape[0], int(mask.sum()))
    total = total - 0.01 * (entropy * mask).sum() / mask.sum()
    return total, stats["clip_frac"], stats["kl_mean"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_equals_eager(backend):
    torch._dynamo.reset()
    args = _inputs(0)
    hidden, weight = args[0], args[1]
    eager = _step(*args, backend)
    eager[0].backward()
    want_gh, want_gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    compiled = torch.compile(_step, fullgraph=True, dynamic=False)
    got = compiled(*args, backend)
    got[0].backward()
    for a, b in zip(got, eager):
        assert rel_err(a.detach(), b.detach()) < 1e-5
    assert rel_err(hidden.grad, want_gh) < 1e-4 and rel_err(weight.grad, want_gw) < 1e-4
    assert want_gw.abs().max() > 0  # the gradient is not trivially zero


def test_compiled_step_sees_the_ops_as_single_nodes():
    """torch.compile keeps each custom op as one node (the chunk loop is inside it)."""
    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    args = _inputs(1)
    torch.compile(_step, fullgraph=True, backend=record)(*args, "torch")
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count("minirl.linear_logprobs.default") == 1, targets
    assert not any("addmm" in t or "logsumexp" in t for t in targets)  # not traced into


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_trace_under_fake_tensor_mode(dtype, backend):
    with FakeTensorMode():
        hidden = torch.empty(2, 7, 32, dtype=dtype).requires_grad_()
        weight = torch.empty(151936, 32, dtype=dtype).requires_grad_()  # a real vocabulary, no memory
        targets = torch.zeros(2, 7, dtype=torch.long)
        logp, entropy = linear_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
        logits = torch.empty(14, 151936, dtype=dtype).requires_grad_()
        lp2 = token_logprobs(logits, targets.reshape(-1), backend=backend)
        mask = torch.ones(2, 7, dtype=torch.bool)
        loss, stats = grpo_token_loss(logp, torch.zeros(2, 7), torch.zeros(2), mask,
                                      ref_logp=torch.zeros(2, 7), beta=0.1, backend=backend)
        (loss.sum() + entropy.sum() + lp2.sum()).backward()
        assert logp.shape == entropy.shape == loss.shape == (2, 7) and lp2.shape == (14,)
        assert logp.dtype == entropy.dtype == loss.dtype == torch.float32
        assert hidden.grad.shape == hidden.shape and hidden.grad.dtype == dtype
        assert weight.grad.shape == weight.shape and weight.grad.dtype == dtype
        assert logits.grad.shape == logits.shape and logits.grad.dtype == dtype
        assert stats["clip_frac"].shape == ()


def _opcheck_cases(use_triton):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 11, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (5,), generator=g)
    hidden = torch.randn(5, 8, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, generator=g, requires_grad=True)
    cases = [(ops.token_logprobs_op, (logits, targets, True, use_triton)),
             (ops.token_logprobs_op, (logits, targets, False, use_triton)),
             (ops.linear_logprobs_op, (hidden, weight, targets, True, 2, use_triton)),
             (ops.linear_logprobs_op, (hidden, weight, targets, False, 3, use_triton))]
    if use_triton:
        logp = -torch.rand(3, 4, generator=g)
        logp.requires_grad_()
        f = [-torch.rand(3, 4, generator=g) for _ in range(2)] + [torch.randn(3, 4, generator=g)]
        mask = torch.rand(3, 4, generator=g) > 0.2
        cases += [(ops.grpo_token_loss_op, (logp, f[0], f[2], mask, f[1], 0.2, 0.28, 0.05, "k3")),
                  (ops.grpo_token_loss_op, (logp, f[0], f[2], mask, None, 0.2, 0.2, 0.0, "k1"))]
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    for op, args in _opcheck_cases(backend == "triton"):
        torch.library.opcheck(op, args)


def test_backend_choice_lives_in_ops():
    """minirl.losses and minirl.grpo call kernels/ops.py; neither imports the other."""
    import ast
    import inspect

    import minirl.losses
    for module, banned in ((minirl.losses, "minirl.grpo"), (grpo, "minirl.losses")):
        tree = ast.parse(inspect.getsource(module))
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert banned not in names and "minirl.kernels" in str(names), (module, names)
        assert "def resolve_backend" not in inspect.getsource(module)
