"""minirl's Triton kernels, each beside the PyTorch code that defines it.

    reference.py        the PyTorch definitions (pure torch, importable everywhere):
                        token log-probs and entropy, the per-chunk forward/backward maths
                        used by the chunked linear path, and the GRPO per-token loss
    logprobs.py         Triton kernel 1: token log-probs (+ entropy) from logits [N, V]
    linear_logprobs.py  kernel 2: log-probs from hidden [N, H] and the lm-head [V, H],
                        chunked over tokens so memory grows with chunk x V, not N x V
                        (torch matmuls + the per-chunk maths of reference.py or kernel 1)
    grpo_loss.py        Triton kernel 3: GRPO clipped surrogate + KL, per token
    ops.py              the one backend dispatch, and the kernels as torch custom ops
                        (fake implementations and autograd registered: torch.compile and
                        FakeTensorMode see them as single ops)
    aot.py              compiles every kernel variant for sm_80 / sm_90 on a CPU and checks
                        the targets' limits (`python -m minirl.kernels.aot`)

Nothing here imports triton at package import: `logprobs.py` and `grpo_loss.py` import it
themselves, and `ops.py` imports them only when the Triton backend is chosen. So minirl
works where triton is absent (macOS, Windows, CPU-only wheels).
"""
