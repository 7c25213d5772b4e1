"""minirl: RL from verifiable rewards (GRPO family) and distillation for reasoning LLMs,
with the analysis of accuracy (pass@1) vs capability (pass@k). Pure PyTorch."""
from minirl.checkpoint import load_model, save_model
from minirl.common import MinirlError
from minirl.model import KVCache, ModelConfig, Transformer
from minirl.tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"
