"""The tokenizer and chat templates as a user's fresh process sees them: no test module (and
no transformers) imported first, jinja2 present or absent, and what `import minirl` loads."""
import os
import subprocess
import sys
import textwrap

import pytest

import minirl
from minirl.tokenizer import builtin_chat_template, render_jinja_template

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Meta-llama/Meta-Llama-3-8B-Instruct's chat template (tokenizer_config.json), verbatim.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# Qwen2.5-Instruct's template without its tool branches (a default system prompt written with
# Jinja's "\n" escapes, where SmolLM2's has literal newlines).
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'system' and loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")
# Qwen2.5-Math's default system prompt has a Jinja escape ("\\boxed") and braces in it.
QWEN25_MATH_TEMPLATE = QWEN25_TEMPLATE.replace(
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "Please reason step by step, and put your final answer within \\\\boxed{}.")

CONVERSATIONS = [
    [{"role": "user", "content": "What is 17 * 23?"}],
    [{"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."},
     {"role": "user", "content": "  Solve x^2 = 4.\n"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Ünïcode: 東京, \"quotes\" {braces}"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": " b "}],
]


def run_child(code, env_extra=None, timeout=60):
    """Run `code` in a fresh interpreter from the repository root; return its stdout."""
    env = {**os.environ, "PYTHONPATH": ROOT, **(env_extra or {})}
    env.pop("MINIRL_BLOCK_TRANSFORMERS", None)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.fresh_process
def test_chat_template_in_a_fresh_process(smollm2_dir):
    """The issue's command: a fresh process renders a real model's Jinja chat template (this
    crashed with `module 'jinja2' has no attribute 'ext'` when transformers was not imported
    first), and transformers is never imported."""
    out = run_child(f"""
        import sys
        import minirl
        t = minirl.load_tokenizer({smollm2_dir!r})
        print(repr(t.apply_chat_template([{{'role': 'user', 'content': 'hi'}}])))
        assert 'jinja2' in sys.modules and 'transformers' not in sys.modules
    """)
    assert out.strip() == repr("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                               "Hugging Face<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.fresh_process
def test_import_minirl_is_light():
    """`import minirl` loads neither the 1,700-line grader nor transformers; the grader's
    functions are still reachable as minirl.grade etc. (imported on first use)."""
    out = run_child("""
        import sys
        import minirl
        print(sorted(m for m in ('minirl.grader', 'minirl.data', 'transformers', 'jinja2') if m in sys.modules))
        assert minirl.grade('so the answer is \\\\boxed{0.5}', '1/2').correct
        assert minirl.extract_answer('\\\\boxed{42}') == '42' and minirl.is_equivalent('2/4', '1/2')
        print('minirl.grader' in sys.modules)
    """)
    assert out.split("\n")[:2] == ["[]", "True"]
    with pytest.raises(AttributeError, match="no_such_name"):
        minirl.no_such_name


def jinja2_blocked_env(tmp_path):
    """PYTHONPATH with a `jinja2` that cannot be imported, as on a machine without it."""
    shadow = tmp_path / "shadow" / "jinja2"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('jinja2 blocked by the test')\n")
    return {"PYTHONPATH": f"{shadow.parent}{os.pathsep}{ROOT}"}


@pytest.mark.fresh_process
def test_builtin_chatml_without_jinja2_equals_smollm2_jinja(smollm2_dir, tmp_path):
    """Without jinja2 the builtin ChatML renderer gives exactly the string the model's own
    Jinja template gives (SmolLM2's default system prompt included)."""
    import json
    tok = minirl.load_tokenizer(smollm2_dir)
    expected = [render_jinja_template(tok.chat_template, m, gen, bos_token=tok.bos_token,
                                      eos_token=tok.eos_token) for m in CONVERSATIONS for gen in (True, False)]
    assert expected[0].startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    code = f"""
        import json, sys
        import minirl
        t = minirl.load_tokenizer({smollm2_dir!r})
        out = [t.apply_chat_template(m, add_generation_prompt=gen) for m in {CONVERSATIONS!r} for gen in (True, False)]
        assert 'jinja2' not in sys.modules
        try:
            from minirl.tokenizer import render_jinja_template
            render_jinja_template('x', [], True)
        except ImportError as e:
            assert 'blocked by the test' in str(e)   # the shadow really blocks jinja2
        else:
            raise AssertionError('jinja2 was importable')
        print(json.dumps(out))
    """
    assert json.loads(run_child(code, jinja2_blocked_env(tmp_path))) == expected


@pytest.mark.parametrize("name,template,bos", [("llama3", LLAMA3_TEMPLATE, "<|begin_of_text|>"),
                                               ("qwen2.5", QWEN25_TEMPLATE, None),
                                               ("qwen2.5-math", QWEN25_MATH_TEMPLATE, None)],
                         ids=["llama3", "qwen2.5", "qwen2.5-math"])
def test_builtin_renderers_equal_jinja(name, template, bos):
    for msgs in CONVERSATIONS:
        for gen in (True, False):
            ref = render_jinja_template(template, msgs, gen, bos_token=bos)
            assert builtin_chat_template(msgs, gen, template, bos_token=bos or "") == ref, (name, msgs, gen)
    if name == "qwen2.5-math":
        assert "within \\boxed{}.<|im_end|>" in ref


def test_builtin_refuses_a_template_it_cannot_render():
    """A template that is neither ChatML nor Llama-3 (here Gemma's turn markers) is not
    silently rendered as ChatML."""
    gemma = "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    with pytest.raises(minirl.MinirlError, match="jinja2"):
        builtin_chat_template(CONVERSATIONS[0], True, gemma)


def special_ids_tokenizer(config, generation_config, tmp_path):
    """A tokenizer folder as a user brings it (tokenizer.json + the two config files), loaded."""
    import json

    from minirl import load_tokenizer
    from minirl.tokenizer import char_tokenizer
    char_tokenizer("abc").tk.save(str(tmp_path / "tokenizer.json"))  # ids: <pad> 0 <bos> 1 <eos> 2 <unk> 3 a 4 b 5
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    return load_tokenizer(str(tmp_path))


def test_eos_ids_are_the_tokenizers_plus_every_generation_config_id(tmp_path):
    tok = special_ids_tokenizer({"eos_token": "<eos>"}, {"eos_token_id": [5, 2, 4]}, tmp_path)
    assert tok.eos_token_ids == [2, 5, 4]           # the tokenizer's own first, no repeats
    tok = special_ids_tokenizer({}, {"eos_token_id": 4}, tmp_path)
    assert tok.eos_token_ids == [4]


def test_pad_and_bos_fall_back_to_generation_config_then_eos(tmp_path):
    tok = special_ids_tokenizer({"eos_token": "<eos>"}, {"bos_token_id": 1}, tmp_path)
    assert tok.bos_token_id == 1 and tok.pad_token_id == 2   # no pad anywhere: the first eos
    tok = special_ids_tokenizer({"eos_token": "<eos>"}, {"pad_token_id": 5, "eos_token_id": [4]}, tmp_path)
    assert tok.pad_token_id == 5 and tok.bos_token_id is None
    tok = special_ids_tokenizer({"bos_token": "<bos>", "pad_token": "<pad>", "eos_token": "<eos>"},
                                {"bos_token_id": 4, "pad_token_id": 5}, tmp_path)
    assert (tok.bos_token_id, tok.pad_token_id) == (1, 0)    # the tokenizer's own tokens win
