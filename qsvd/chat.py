"""`qsvd chat`: talk to a trained run, a plain model or a GGUF file in the terminal.

A run is loaded as it trained: its frozen base plus the adapter, unmerged, on its device and in its
compute dtype. Every turn is rendered with the tokenizer's chat template (training's plain template
for a model without one) and the answer streams as it is generated. A .gguf file runs through
llama.cpp (llama-cpp-python), as Ollama and LM Studio would run it. Ctrl-C ends the answer being
generated, not the chat; `/reset` starts a new conversation and `/exit` (or end of input) leaves.
"""

import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from jinja2 import TemplateError
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from .config import check_positive
from .console import console
from .data import render_prompt, tokenize_prompt
from .errors import QSVDError, first_line, handle_signal
from .export_gguf import llama_cpp
from .run_dir import load_run_or_model
from .weights import read_gguf

COMMANDS = {"/reset": "start a new conversation", "/exit": "leave (or Ctrl-D)"}


@dataclass
class Sampling:
    """How an answer is drawn: greedy at temperature 0, else sampled at `temperature` within `top_p`."""

    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.9

    def check(self) -> None:
        check_positive({"max-new-tokens": self.max_new_tokens})
        if self.temperature < 0:
            raise QSVDError(f"--temperature must be 0 (greedy) or more, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise QSVDError(f"--top-p must be in (0, 1], not {self.top_p}")


class StopOnCtrlC(StoppingCriteria):
    """While active, Ctrl-C ends the answer being generated at its next token instead of the program."""

    def __init__(self):
        self.pressed = False

    def __enter__(self):
        self.pressed = False
        self.previous = handle_signal(signal.SIGINT, self.press)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)

    def press(self, signum, frame) -> None:
        self.pressed = True

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.pressed, dtype=torch.bool, device=input_ids.device)


class ContextFull(Exception):
    """The conversation and the longest answer do not fit in the model's context."""


class WriteStreamer(TextStreamer):
    """transformers' streamer, with each finished piece of text handed to `write`."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.write = write

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.write(text)


class ModelChat:
    """A transformers model (a run's, or a plain one) answering with `generate`."""

    def __init__(self, model, tokenizer, description: str):
        self.model, self.tokenizer, self.description = model, tokenizer, description
        self.context = model.config.get_text_config().max_position_embeddings

    @torch.inference_mode()
    def answer(self, messages: list[dict], sampling: Sampling, stop: StopOnCtrlC, write: Callable[[str], None]) -> str:
        try:
            prompt = tokenize_prompt(render_prompt(messages, self.tokenizer), self.tokenizer)
        except TemplateError as error:  # e.g. a template that takes no system prompt
            raise QSVDError(f"the model's chat template refuses this conversation: {error}") from None
        if len(prompt) + sampling.max_new_tokens > self.context:
            raise ContextFull
        ids = torch.tensor([prompt], device=self.model.device)
        drawn = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p} \
            if sampling.temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=sampling.max_new_tokens,
                                  pad_token_id=self.tokenizer.pad_token_id, streamer=WriteStreamer(self.tokenizer, write),
                                  stopping_criteria=StoppingCriteriaList([stop]), **drawn)
        return self.tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)


class GGUFChat:
    """A GGUF file run by llama.cpp, with the chat template the file carries."""

    def __init__(self, path: Path):
        read_gguf(path)  # first: it says what is wrong with a cut or foreign file, llama.cpp does not
        Llama = llama_cpp(f"chatting with {path.name}").Llama
        try:
            self.llama = Llama(model_path=str(path), n_ctx=0, verbose=False)  # n_ctx 0: the model's own
        except (ValueError, RuntimeError) as error:
            raise QSVDError(f"llama.cpp cannot load {path}: {first_line(error)}") from None
        self.description = f"{path.name} (llama.cpp)"

    def answer(self, messages: list[dict], sampling: Sampling, stop: StopOnCtrlC, write: Callable[[str], None]) -> str:
        pieces = []
        try:
            for chunk in self.llama.create_chat_completion(messages, stream=True, max_tokens=sampling.max_new_tokens,
                                                           temperature=sampling.temperature, top_p=sampling.top_p):
                text = chunk["choices"][0]["delta"].get("content") or ""
                write(text)
                pieces.append(text)
                if stop.pressed:
                    break
        except ValueError as error:  # llama-cpp-python: "Requested tokens (N) exceed context window of M"
            if "context window" in str(error):
                raise ContextFull from None
            raise
        return "".join(pieces)


def open_chat(target: str | Path, bits: int | None = None, revision: str | None = None) -> ModelChat | GGUFChat:
    """What `target` names: a run directory, a .gguf file (llama.cpp) or a plain model stored at `bits`."""
    target = Path(target)
    if target.suffix == ".gguf" and target.is_file():
        if bits is not None or revision is not None:
            raise QSVDError(f"{target} is a GGUF file: llama.cpp runs it with its own weight types; drop --bits "
                            f"and --revision")
        return GGUFChat(target)
    model, tokenizer, run = load_run_or_model(target, bits, revision, progress=False)
    if run is None:
        return ModelChat(model, tokenizer, f"{target} ({bits or 16}-bit, {model.device})")
    return ModelChat(model, tokenizer, f"{target} ({run.spec.method} on a {run.record['config']['bits']}-bit base, "
                                       f"{model.device}, {str(run.compute_dtype).removeprefix('torch.')})")


def reply(chat, messages: list[dict], sampling: Sampling, out) -> str:
    """The answer to the conversation, streamed to `out`; the oldest turns are dropped (and said so)
    while it would overflow the model's context."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    while True:
        with StopOnCtrlC() as stop:
            try:
                text = chat.answer(messages, sampling, stop, lambda piece: (out.write(piece), out.flush()))
            except ContextFull:
                turns = messages[len(system):]
                if len(turns) <= 1:
                    raise QSVDError(f"the message and --max-new-tokens {sampling.max_new_tokens} do not fit in the "
                                    f"model's context; write less or lower --max-new-tokens") from None
                messages[len(system):] = turns[2:]
                console.print("[dim](the oldest exchange was dropped: the conversation outgrew the model's context)[/]")
                continue
        out.write("\n" if not stop.pressed else " [stopped]\n")
        out.flush()
        return text


def chat(target: str | Path, prompt: str | None = None, system: str | None = None, bits: int | None = None,
         revision: str | None = None, max_new_tokens: int = 512, temperature: float = 0.7, top_p: float = 0.9,
         lines=None, out=None) -> str | None:
    """Chat with a run, a model or a GGUF file, as `qsvd chat` does: one answer to `prompt` (returned),
    or a conversation over `lines` (default: the terminal), answers to `out` (default stdout)."""
    sampling = Sampling(max_new_tokens, temperature, top_p)
    sampling.check()
    out = out or sys.stdout
    backend = open_chat(target, bits, revision)
    start = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        return reply(backend, start + [{"role": "user", "content": prompt}], sampling, out)
    console.print(f"chatting with {backend.description} · " + " · ".join(f"{c}: {what}" for c, what in COMMANDS.items()))
    messages = list(start)
    for line in lines if lines is not None else read_lines():
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            messages = list(start)
            console.print("[dim](a new conversation)[/]")
        elif text:
            messages.append({"role": "user", "content": text})
            messages.append({"role": "assistant", "content": reply(backend, messages, sampling, out)})
    return None


def read_lines():
    """The user's lines, with a prompt on a terminal; Ctrl-C at the prompt says how to leave."""
    prompt = "> " if sys.stdin.isatty() else ""
    while True:
        try:
            yield input(prompt)
        except EOFError:
            return
        except KeyboardInterrupt:
            console.print("\n[dim](/exit or Ctrl-D leaves)[/]")
