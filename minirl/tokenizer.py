"""Tokenizer and chat templates, on top of the `tokenizers` library.

load_tokenizer(folder) reads tokenizer.json plus the special tokens from
tokenizer_config.json and generation_config.json (eos may be a list). apply_chat_template
renders the model's own Jinja template (tokenizer_config.json "chat_template" or
chat_template.jinja) with the same Jinja settings transformers uses, so the string is
identical; without jinja2, or for a tokenizer with no template, the built-in ChatML or
Llama-3 renderer is used.
"""
import json
import os
from datetime import datetime

from tokenizers import Tokenizer as HFTokenizer

from minirl.common import MinirlError


def _token_text(tok):
    """tokenizer_config.json stores special tokens as strings or {"content": ...} dicts."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def _read_json(path):
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise MinirlError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, config: dict = None, generation_config: dict = None,
                 chat_template: str = None):
        self.tk = tokenizer
        self.config = dict(config or {})
        self.generation_config = dict(generation_config or {})
        self.chat_template = chat_template
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.pad_token = _token_text(self.config.get("pad_token"))
        self.unk_token = _token_text(self.config.get("unk_token"))
        self.bos_token_id = self._id_or_none(self.bos_token)
        if self.bos_token_id is None:
            self.bos_token_id = self.generation_config.get("bos_token_id")
        # eos: the tokenizer's eos plus every id generation_config lists (chat models stop on
        # several, e.g. Llama-3's <|eot_id|> and <|end_of_text|>).
        eos = []
        if self._id_or_none(self.eos_token) is not None:
            eos.append(self._id_or_none(self.eos_token))
        gen_eos = self.generation_config.get("eos_token_id")
        for i in (gen_eos if isinstance(gen_eos, list) else [gen_eos]):
            if i is not None and i not in eos:
                eos.append(i)
        self.eos_token_ids = eos
        pad = self._id_or_none(self.pad_token)
        if pad is None:
            pad = self.generation_config.get("pad_token_id")
        self.pad_token_id = pad if pad is not None else (eos[0] if eos else 0)
        self.add_bos_token = bool(self.config.get("add_bos_token", False))

    def _id_or_none(self, text):
        return None if text is None else self.tk.token_to_id(text)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict:
        return self.tk.get_vocab(with_added_tokens=True)

    def id_to_token(self, i: int):
        return self.tk.id_to_token(i)

    def token_to_id(self, s: str):
        return self.tk.token_to_id(s)

    def encode(self, text: str, add_special_tokens: bool = False) -> list:
        """Token ids of `text`. Special tokens written in the text (<|im_start|>) are kept as
        such, as in transformers. add_special_tokens runs the tokenizer's post-processor
        (e.g. a BOS for Llama-3)."""
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise MinirlError(f"messages[{i}]: needs 'role' and 'content'")
        if self.chat_template is not None:
            try:
                import jinja2  # noqa: F401
            except ImportError:
                return builtin_chat_template(messages, add_generation_prompt, self.chat_template,
                                             bos_token=self.bos_token or "")
            return render_jinja_template(self.chat_template, messages, add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token,
                                         pad_token=self.pad_token, unk_token=self.unk_token)
        return builtin_chat_template(messages, add_generation_prompt, "chatml")

    def save(self, out_dir):
        """tokenizer.json, tokenizer_config.json (with the chat template) and nothing else."""
        os.makedirs(out_dir, exist_ok=True)
        self.tk.save(os.path.join(out_dir, "tokenizer.json"))
        cfg = dict(self.config)
        cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)


def load_tokenizer(path) -> Tokenizer:
    from minirl.checkpoint import resolve_model_path
    folder = resolve_model_path(path)
    tj = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(tj):
        raise MinirlError(f"{tj}: file not found (minirl reads the fast-tokenizer file tokenizer.json)")
    try:
        tk = HFTokenizer.from_file(tj)
    except Exception as e:
        raise MinirlError(f"{tj}: unreadable tokenizer file ({e})") from None
    cfg = _read_json(os.path.join(folder, "tokenizer_config.json"))
    gen = _read_json(os.path.join(folder, "generation_config.json"))
    template = cfg.pop("chat_template", None)
    if isinstance(template, list):  # older format: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    jinja_file = os.path.join(folder, "chat_template.jinja")
    if template is None and os.path.exists(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            template = f.read()
    return Tokenizer(tk, cfg, gen, template)


def render_jinja_template(template: str, messages, add_generation_prompt: bool, **special) -> str:
    """Render with the Jinja settings transformers uses (trim_blocks, lstrip_blocks,
    loopcontrols, raise_exception, strftime_now, tojson without ASCII escaping)."""
    import jinja2
    import jinja2.ext  # not imported by `import jinja2` (transformers happens to import it)
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise MinirlError(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        compiled = env.from_string(template)
    except jinja2.TemplateError as e:
        raise MinirlError(f"chat template does not parse: {e}") from None
    return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           **{k: v for k, v in special.items()})


def builtin_chat_template(messages, add_generation_prompt: bool, template: str, bos_token: str = "") -> str:
    """ChatML (Qwen, SmolLM2) or Llama-3 rendered in Python, for tokenizers without a
    template or machines without jinja2. `template` is "chatml", "llama3", or a Jinja
    source whose special tokens tell which of the two it is."""
    if "<|start_header_id|>" in template or template == "llama3":
        out = bos_token or "<|begin_of_text|>"
        for m in messages:
            out += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
        if add_generation_prompt:
            out += "<|start_header_id|>assistant<|end_header_id|>\n\n"
        return out
    out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    if add_generation_prompt:
        out += "<|im_start|>assistant\n"
    return out


CHAR_SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


def char_tokenizer(chars: str) -> Tokenizer:
    """A character-level tokenizer (one token per character, plus <pad> <bos> <eos> <unk>)
    stored as a standard tokenizer.json that transformers loads too. Used by the bundled
    tiny model, whose whole world is arithmetic."""
    from tokenizers import decoders, models, pre_tokenizers

    special = list(CHAR_SPECIAL_TOKENS)
    vocab = {t: i for i, t in enumerate(special + sorted(set(chars)))}
    tk = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # every character alone
    tk.decoder = decoders.Fuse()  # join without spaces
    tk.add_special_tokens(special)
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
              "tokenizer_class": "PreTrainedTokenizerFast"}
    return Tokenizer(tk, config, {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
