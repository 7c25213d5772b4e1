"""minirl: RL from verifiable rewards (GRPO family) and distillation for reasoning LLMs,
with the analysis of accuracy (pass@1) vs capability (pass@k). Pure PyTorch."""
from minirl.checkpoint import load_model, save_model
from minirl.common import MinirlError
from minirl.losses import grpo_token_loss, linear_logprobs, token_logprobs
from minirl.model import KVCache, ModelConfig, Transformer
from minirl.sampler import Completion, generate
from minirl.tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"

_GRADER_NAMES = ("extract_answer", "grade", "is_equivalent")


def __getattr__(name):
    """minirl.grade, minirl.extract_answer, minirl.is_equivalent: the math grader (1,700
    lines) is imported on first use, not by `import minirl` (PEP 562)."""
    if name in _GRADER_NAMES:
        from minirl import grader
        return getattr(grader, name)
    raise AttributeError(f"module 'minirl' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_GRADER_NAMES))
