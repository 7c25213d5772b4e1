"""minirl: RL from verifiable rewards (GRPO family) and distillation for reasoning LLMs,
with the analysis of accuracy (pass@1) vs capability (pass@k). Pure PyTorch."""
from minirl.checkpoint import load_model, save_model
from minirl.common import MinirlError
from minirl.grader import extract_answer, grade, is_equivalent
from minirl.losses import grpo_token_loss, linear_logprobs, token_logprobs
from minirl.model import KVCache, ModelConfig, Transformer
from minirl.sampler import Completion, generate
from minirl.tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"
