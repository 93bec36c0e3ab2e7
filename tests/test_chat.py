"""`qsvd chat` on a tiny random Llama with a chat template: greedy answers are `generate`'s, the
history is rendered turn by turn, Ctrl-C ends an answer but not the chat, the oldest exchange
gives way to a full context, and bad input is one line. (The real model's run: test_real_model.)"""

import io
import os
import signal

import pytest
import torch
from click.testing import CliRunner

import qsvd
from qsvd.chat import StopOnCtrlC
from qsvd.cli import cli
from qsvd.data import render_prompt, tokenize_prompt
from qsvd.load import load_tokenizer, resolve_model
from qsvd.split import quantized_model

from conftest import char_tokenizer, tiny_model
from gguf_files import write_gguf

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """The tiny Llama, its tokenizer carrying a chat template."""
    path = tmp_path_factory.mktemp("tiny-chat")
    tiny_model().save_pretrained(path)
    tokenizer = char_tokenizer()
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(chat_model_dir):
    """What greedy decoding of a conversation gives, through the model as `qsvd chat` loads it."""
    files = resolve_model(str(chat_model_dir))
    tokenizer, model = load_tokenizer(files), quantized_model(files, 16, progress=False)

    def greedy(messages: list[dict], max_new_tokens: int) -> str:
        prompt = tokenize_prompt(render_prompt(messages, tokenizer), tokenizer)
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)
    return greedy


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def test_one_shot_greedy_answer_is_generates_and_streams(chat_model_dir, reference):
    out = io.StringIO()
    answer = qsvd.chat(chat_model_dir, prompt="2+3=", temperature=0, max_new_tokens=20, out=out)
    assert answer == reference([user("2+3=")], 20) and len(answer) > 5
    assert out.getvalue() == answer + "\n"
    system = qsvd.chat(chat_model_dir, prompt="2+3=", system="be brief", temperature=0, max_new_tokens=20,
                       out=io.StringIO())
    assert system == reference([{"role": "system", "content": "be brief"}, user("2+3=")], 20) != answer


def test_conversation_renders_every_turn_and_reset_empties_it(chat_model_dir, reference):
    out = io.StringIO()
    qsvd.chat(chat_model_dir, temperature=0, max_new_tokens=12, out=out,
              lines=["hello", "  ", "what next?", "/reset", "what next?", "/exit", "never read"])
    first = reference([user("hello")], 12)
    second = reference([user("hello"), {"role": "assistant", "content": first}, user("what next?")], 12)
    fresh = reference([user("what next?")], 12)
    assert second != fresh  # the history changes the answer, so the check below sees it
    assert out.getvalue() == f"{first}\n{second}\n{fresh}\n"


def test_sampling_draws_different_answers_within_top_p(chat_model_dir):
    torch.manual_seed(0)
    answers = {qsvd.chat(chat_model_dir, prompt="hi", temperature=1.5, max_new_tokens=10, out=io.StringIO())
               for _ in range(3)}
    assert len(answers) > 1


def test_ctrl_c_ends_the_answer_not_the_chat(chat_model_dir, reference, monkeypatch):
    """A real SIGINT, sent as the fifth token is checked: that answer ends there, the next is whole."""
    checked = []
    check = StopOnCtrlC.__call__

    def press_at_fifth(self, input_ids, scores, **kwargs):
        checked.append(1)
        if len(checked) == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return check(self, input_ids, scores, **kwargs)

    monkeypatch.setattr(StopOnCtrlC, "__call__", press_at_fifth)
    handler = signal.getsignal(signal.SIGINT)
    out = io.StringIO()
    qsvd.chat(chat_model_dir, temperature=0, max_new_tokens=50, out=out, lines=["hello", "/reset", "hello"])
    whole = reference([user("hello")], 50)
    stopped, after = out.getvalue().split(" [stopped]\n")
    assert stopped == reference([user("hello")], 5) != whole  # the five tokens before Ctrl-C
    assert after == whole + "\n"  # the chat went on
    assert signal.getsignal(signal.SIGINT) is handler  # and Ctrl-C is the program's again


def test_the_oldest_exchange_gives_way_to_a_full_context(chat_model_dir, reference, capsys):
    long = "x" * 150  # 512 positions: one exchange and the longest answer fit, two do not
    out = io.StringIO()
    qsvd.chat(chat_model_dir, temperature=0, max_new_tokens=200, out=out, lines=[long, long + "?"])
    first = reference([user(long)], 200)
    assert "the oldest exchange was dropped" in capsys.readouterr().err
    assert out.getvalue() == f"{first}\n{reference([user(long + '?')], 200)}\n"


def chat_cli(*args, input=None):
    return CliRunner().invoke(cli, ["chat", *map(str, args)], input=input)


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "--temperature must be 0 (greedy) or more"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be"),
    (["--bits", "3"], "bits"),
    (["--max-new-tokens", "600"], "do not fit in the model's context"),
])
def test_bad_options_are_one_line(chat_model_dir, args, message):
    result = chat_cli(chat_model_dir, "--prompt", "hi", *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert result.output.count("error:") == 1


def test_a_missing_model_or_gguf_runtime_is_one_line(tmp_path, monkeypatch):
    result = chat_cli(tmp_path / "nothing-here", "--prompt", "hi")
    assert result.exit_code == 2 and "error:" in result.output
    gguf = write_gguf(tiny_model(), tmp_path / "model.gguf")
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)  # as if not installed
    result = chat_cli(gguf, "--prompt", "hi")
    assert result.exit_code == 2 and result.output.startswith(
        "error: chatting with model.gguf needs llama-cpp-python: pip install 'qsvd[llama-cpp]'")
    assert result.output.count("\n") == 1
    result = chat_cli(gguf, "--bits", "4")
    assert result.exit_code == 2 and "drop --bits" in result.output


@pytest.mark.parametrize("damage", ["empty", "text", "cut in the header", "cut in the weights"])
def test_a_damaged_gguf_is_one_line_before_llama_cpp_is_needed(tmp_path, monkeypatch, damage):
    whole = write_gguf(tiny_model(), tmp_path / "whole.gguf").read_bytes()
    damaged = {"empty": b"", "text": b"hello\n", "cut in the header": whole[:300],
               "cut in the weights": whole[:len(whole) - 100]}[damage]
    path = tmp_path / "model.gguf"
    path.write_bytes(damaged)
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)  # not needed to tell
    result = chat_cli(path, "--prompt", "hi")
    assert result.exit_code == 2 and result.output.startswith(f"error: {path} is not a readable GGUF file: ")
    assert result.output.endswith("is it whole, as downloaded or exported?\n") and result.output.count("\n") == 1


def test_a_run_whose_base_changed_is_refused(chat_model_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(chat_model_dir, model)
    qsvd.finetune(model=str(model), method="lora", bits=4, rank=4, seq_len=400, max_steps=1, batch_size=4,
                  output=str(tmp_path / "run"))
    answer = qsvd.chat(tmp_path / "run", prompt="hi", temperature=0, max_new_tokens=5, out=io.StringIO())
    model_run, tokenizer = qsvd.load_run(tmp_path / "run")
    prompt = tokenize_prompt(render_prompt([user("hi")], tokenizer), tokenizer)
    out = model_run.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=5, pad_token_id=tokenizer.pad_token_id)
    assert answer == tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)
    result = chat_cli(tmp_path / "run", "--bits", "4")
    assert result.exit_code == 2 and "trained run" in result.output
    tiny_model(seed=1).save_pretrained(model)  # the base changed under the run
    result = chat_cli(tmp_path / "run", "--prompt", "hi")
    assert result.exit_code == 2 and "is not the one" in result.output, result.output
