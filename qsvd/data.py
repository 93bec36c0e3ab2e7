"""Training data: rows read with `datasets` from a local file (json, jsonl, csv, parquet), a
directory written by `save_to_disk` or a hub dataset id, or a small arithmetic set qsvd makes itself.

Every row is one of these shapes; all but `text` become chat messages whose last (assistant) turn
is the completion, and only the completion's tokens carry loss:
- alpaca: instruction (+ input) → output;
- qa: question → answer (GSM8K);
- chat: OpenAI `messages` ({role, content});
- sharegpt: `conversations` ({from, value}, from human/gpt/system);
- fields: --prompt-field → --response-field, for any other layout;
- text: plain `text`, every token of which carries loss;
- pairs: `chosen` and `rejected` responses to one prompt, for the preference objectives: a
  `prompt` and the two as strings, or as message lists (the prompt's turns, then each response's);
  or the two as whole conversations (UltraFeedback), message lists or Anthropic HH transcripts
  ("\n\nHuman: …\n\nAssistant: …"), whose turns before the last are the shared prompt. A pair is
  two rows, `chosen_*` and `rejected_*`, kept or skipped together (and, also skipped, when its
  responses are identical or its conversations differ before the last turn).
A row that is malformed stops the run with its row number; a row with an empty response, or
longer than --seq-len (unless --truncate cuts its response), is skipped and counted.
"""

import random
import re
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import datasets
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from .errors import QSVDError, first_line

IGNORE_INDEX = -100
PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
PAIR_FIELDS = ("chosen", "rejected")
SHAPES = {"pairs": PAIR_FIELDS, "alpaca": ("instruction", "output"), "qa": ("question", "answer"),
          "chat": ("messages",), "sharegpt": ("conversations",), "text": ("text",)}
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
HUB_DATASET = re.compile(r"([A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w-]*(\.[\w-]+)*")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "bing": "assistant", "chatgpt": "assistant"}
SPLIT_FLAGS = {"--data": "--data-split", "--eval-data": "--eval-split"}  # the flag that picks each one's split
EVAL_TASKS = ("gen", "choice", "nll", "ppl", "pref")  # `qsvd eval --task`; see evaluate.py
ANSWER_FORMAT = re.compile(r"Answer format:\s*([^\n]+)", re.IGNORECASE)
HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
SKIPPED_EMPTY = "with an empty response"
SKIPPED_IDENTICAL = "with identical chosen and rejected responses"
SKIPPED_DIVERGING = "whose chosen and rejected conversations differ before their last turn"
SKIPPED_LONG = "longer than --seq-len"


def synthetic_arithmetic(rows: int = 128, seed: int = 0) -> datasets.Dataset:
    """Two-step word problems with a checkable final answer after '####', as in GSM8K."""
    rng = random.Random(seed)
    people = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jun"]
    things = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells"]
    examples = []
    for _ in range(rows):
        who, what = rng.choice(people), rng.choice(things)
        start, more, given = rng.randint(5, 60), rng.randint(2, 40), rng.randint(1, 30)
        after_more = start + more
        given = min(given, after_more)
        final = after_more - given
        examples.append({
            "question": f"{who} has {start} {what}, gets {more} more, then gives away {given}. "
                        f"How many {what} does {who} have now?",
            "answer": f"{who} first has {start} + {more} = {after_more} {what}. "
                      f"After giving away {given}, {who} has {after_more} - {given} = {final}.\n#### {final}",
        })
    return datasets.Dataset.from_list(examples)


def read_rows(data: str | Path, flag: str = "--data", config: str | None = None, split: str | None = None,
              default_split: str = "train") -> datasets.Dataset:
    """The rows of a local file, a `save_to_disk` directory or a hub dataset (`config`, `split`),
    read with `datasets`, or one line that says why they cannot be."""
    path = Path(data).expanduser()
    if path.is_dir():
        return saved_rows(path, flag, config, split, default_split)
    if path.is_file():
        refuse_split_and_config(path, flag, config, split)
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise QSVDError(f"{flag} {path}: qsvd reads json, jsonl, csv and parquet files (by their "
                            f"extension), or a directory written by datasets' save_to_disk")
        kind = "json or jsonl" if builder == "json" else builder
        if path.stat().st_size == 0:
            raise QSVDError(f"{flag} {path} is empty")
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as error:  # datasets wraps the readers' errors in several types
            if isinstance(error, datasets.exceptions.DatasetGenerationError):  # the reader's own error says where
                error = error.__cause__ or error.__context__ or error
            raise QSVDError(f"{flag} {path} is not a {kind} file of records: {first_line(error)}") from None
    if path.suffix.lower() in (*FILE_BUILDERS, ".txt") or not HUB_DATASET.fullmatch(str(data)):
        raise QSVDError(f"{flag} {data}: no such file")
    return hub_rows(str(data), flag, config, split or default_split)


def refuse_split_and_config(path: Path, flag: str, config: str | None, split: str | None) -> None:
    """A file, or a saved Dataset, is one split of one configuration: a flag that picks one is a mistake."""
    given = [name for name, value in ((SPLIT_FLAGS[flag], split), ("--data-config", config)) if value is not None]
    if given:
        raise QSVDError(f"{given[0]} picks part of a hub dataset or of a saved DatasetDict; {flag} {path} has "
                        f"one split: drop {given[0]}")


def saved_rows(path: Path, flag: str, config: str | None, split: str | None, default_split: str) -> datasets.Dataset:
    """A directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as error:
        raise QSVDError(f"{flag} {path} is not a directory written by datasets' save_to_disk: "
                        f"{first_line(error)}") from None
    if isinstance(saved, datasets.Dataset):
        refuse_split_and_config(path, flag, config, split)
        return saved
    if config is not None:
        refuse_split_and_config(path, flag, config, None)
    split = split or default_split
    if split not in saved:
        raise QSVDError(f"{flag} {path} has no split {split!r}; its splits: {', '.join(saved)} ({SPLIT_FLAGS[flag]})")
    return saved[split]


def hub_rows(name: str, flag: str, config: str | None, split: str) -> datasets.Dataset:
    """A hub dataset, through the datasets cache (offline with HF_HUB_OFFLINE=1, once cached)."""
    try:
        return datasets.load_dataset(name, config, split=split)
    except datasets.exceptions.DatasetNotFoundError:
        raise QSVDError(f"{flag} {name}: no such file, nor a dataset on the hub that qsvd may read (check the "
                        f"name; a gated one needs its terms accepted and `hf auth login`)") from None
    except ConnectionError:
        raise QSVDError(f"{flag} {name} is not in the datasets cache and the hub cannot be reached; load it "
                        f"once online, or pass a local file") from None
    except Exception as error:  # an unknown config or split, which datasets names with the ones there are
        raise QSVDError(f"{flag} {name}: {first_line(error)} (--data-config, {SPLIT_FLAGS[flag]})") from None


class Shape(NamedTuple):
    name: str  # a key of SHAPES, or "fields"
    prompt_field: str | None = None
    response_field: str | None = None


def detect_shape(columns: list[str], source: str, prompt_field: str | None = None,
                 response_field: str | None = None) -> Shape:
    """The shape of rows with these columns, or the explicit --prompt-field/--response-field."""
    if prompt_field or response_field:
        missing = [f"--{flag}-field {field}" for flag, field in (("prompt", prompt_field), ("response", response_field))
                   if field not in columns]
        if missing:
            raise QSVDError(f"{source} has no {missing[0].split()[-1]} field ({missing[0]}); its fields are: "
                            f"{', '.join(columns) or 'none'}")
        return Shape("fields", prompt_field, response_field)
    for name, needed in SHAPES.items():
        if all(column in columns for column in needed):
            return Shape(name)
    raise QSVDError(f"{source} has none of the known field sets (instruction/output, question/answer, messages, "
                    f"conversations, text, chosen/rejected); its fields are: {', '.join(columns) or 'none'}; name "
                    f"yours with --prompt-field and --response-field")


def text_of(value, what: str) -> str:
    """A field's text: a string, a number, or None (empty); anything else is malformed."""
    if value is None:
        return ""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{what} is a {type(value).__name__}, not text")


def turns(value, role_key: str, text_key: str, roles: dict[str, str] | None, what: str) -> list[dict]:
    """A list of chat turns as {role, content}, checked, ending with the assistant's."""
    return ending_with_answer(turn_list(value, role_key, text_key, roles, what), what)


def ending_with_answer(messages: list[dict], what: str) -> list[dict]:
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"the last turn of {what} is the {messages[-1]['role']}'s, not the assistant's answer")
    return messages


def turn_list(value, role_key: str, text_key: str, roles: dict[str, str] | None, what: str) -> list[dict]:
    """A list of chat turns as {role, content}, checked."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{what} is not a non-empty list of turns")
    messages = []
    for number, turn in enumerate(value, 1):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise ValueError(f"turn {number} of {what} has no {role_key!r} and {text_key!r}")
        role = str(turn[role_key])
        if roles is not None:
            if role not in roles:
                raise ValueError(f"turn {number} of {what} is from {role!r}; known: {', '.join(roles)}")
            role = roles[role]
        messages.append({"role": role, "content": text_of(turn[text_key], f"turn {number}'s {text_key}")})
    return messages


# -- preference pairs: `chosen` and `rejected` responses to one prompt ------------------------

def hh_turns(text: str, what: str) -> list[dict]:
    """An Anthropic HH transcript's turns: '\\n\\nHuman: …' and '\\n\\nAssistant: …' in turn."""
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError(f"{what} is a string but not an HH transcript ('\\n\\nHuman: …\\n\\nAssistant: …'); "
                         f"give the prompt as a 'prompt' field")
    return [{"role": HH_ROLES[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def conversation(value, what: str) -> list[dict]:
    """A whole conversation ending with the assistant's turn: {role, content} turns or an HH transcript."""
    messages = hh_turns(value, what) if isinstance(value, str) else turn_list(value, "role", "content", None, what)
    return ending_with_answer(messages, what)


def response(value, what: str) -> str:
    """A response: text, or a message list whose turns are all the assistant's."""
    if not isinstance(value, list):
        return text_of(value, what)
    messages = turn_list(value, "role", "content", None, what)
    if any(message["role"] != "assistant" for message in messages):
        raise ValueError(f"{what} has a turn that is not the assistant's")
    return "\n\n".join(message["content"] for message in messages)


def pair_conversations(row: dict) -> dict[str, list[dict]] | str:
    """The row's two conversations, prompt then response, by column prefix ("chosen_", "rejected_"),
    or why the pair is skipped; ValueError if the row is malformed."""
    if row.get("prompt") is not None:
        prompt = row["prompt"]
        context = (turn_list(prompt, "role", "content", None, "prompt") if isinstance(prompt, list)
                   else [{"role": "user", "content": text_of(prompt, "prompt")}])
        chosen, rejected = response(row["chosen"], "chosen"), response(row["rejected"], "rejected")
    else:
        chosen_turns, rejected_turns = conversation(row["chosen"], "chosen"), conversation(row["rejected"], "rejected")
        if chosen_turns[:-1] != rejected_turns[:-1]:
            return SKIPPED_DIVERGING
        context, chosen, rejected = chosen_turns[:-1], chosen_turns[-1]["content"], rejected_turns[-1]["content"]
    if chosen == rejected:
        return SKIPPED_IDENTICAL
    return {f"{side}_": context + [{"role": "assistant", "content": text}]
            for side, text in zip(PAIR_FIELDS, (chosen, rejected))}


def malformed_row(source: str, number: int, error: ValueError) -> QSVDError:
    return QSVDError(f"{source} row {number}: {error}; fix or remove the row")


def to_chat(row: dict, shape: Shape) -> list[dict]:
    """The row as chat messages, ending with the assistant's answer; ValueError if malformed."""
    if shape.name == "chat":
        return turns(row["messages"], "role", "content", None, "messages")
    if shape.name == "sharegpt":
        return turns(row["conversations"], "from", "value", SHAREGPT_ROLES, "conversations")
    if shape.name == "alpaca":
        context = text_of(row.get("input"), "input")
        prompt = text_of(row["instruction"], "instruction") + (f"\n\n{context}" if context else "")
        answer = text_of(row["output"], "output")
    elif shape.name == "qa":
        prompt, answer = text_of(row["question"], "question"), text_of(row["answer"], "answer")
    else:
        prompt = text_of(row[shape.prompt_field], shape.prompt_field)
        answer = text_of(row[shape.response_field], shape.response_field)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def render_prompt(context: list[dict], tokenizer: PreTrainedTokenizerBase) -> str:
    """The text an assistant's answer to `context` follows: the tokenizer's chat template with its
    generation prompt, or a plain instruction template without one."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
    return PLAIN_TEMPLATE.format(prompt="\n\n".join(m["content"] for m in context))


def prompt_and_completion(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """The prompt (`render_prompt` of the turns before the last) and the answer's text after it."""
    prompt = render_prompt(messages[:-1], tokenizer)
    if tokenizer.chat_template:
        return prompt, tokenizer.apply_chat_template(messages, tokenize=False)[len(prompt):]
    return prompt, messages[-1]["content"] + tokenizer.eos_token


def tokenize_prompt(prompt: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """A rendered prompt's tokens (a chat template already writes its own special tokens)."""
    return tokenizer(prompt, add_special_tokens=not tokenizer.chat_template)["input_ids"]


def tokenize(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """input_ids with labels = IGNORE_INDEX over the prompt tokens."""
    prompt, completion = prompt_and_completion(messages, tokenizer)
    prompt_ids = tokenize_prompt(prompt, tokenizer)
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt_ids + completion_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids}


def tokenize_text(text: str, tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """Plain text and an eos, every token of it with loss."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": ids, "labels": list(ids)}


class TrainingRows(NamedTuple):
    rows: datasets.Dataset
    shape: Shape
    source: str  # for messages: "--data FILE" or "the built-in dataset"


def training_rows(data: str | None, seed: int = 0, config: str | None = None, split: str | None = None,
                  prompt_field: str | None = None, response_field: str | None = None,
                  max_rows: int | None = None, objective: str = "sft") -> TrainingRows:
    """The rows of `data` (the first `max_rows`) or the built-in set, and their shape, which must
    be pairs for a preference `objective` and not for sft: a bad source fails here, before any
    model is loaded."""
    source = f"--data {data}" if data else "the built-in dataset"
    if not data and objective != "sft":
        raise QSVDError(f"--objective {objective} trains on preference pairs: give them with --data (fields "
                        f"prompt/chosen/rejected, or chosen/rejected conversations)")
    rows = read_rows(data, "--data", config, split) if data else synthetic_arithmetic(seed=seed)
    if max_rows is not None:
        rows = rows.select(range(min(max_rows, len(rows))))
    if len(rows) == 0:
        raise QSVDError(f"{source} has no rows")
    shape = detect_shape(rows.column_names, source, prompt_field, response_field)
    if (shape.name == "pairs") != (objective != "sft"):
        raise QSVDError(f"{source} holds preference pairs (chosen/rejected): train them with --objective dpo or orpo"
                        if shape.name == "pairs" else
                        f"--objective {objective} trains on preference pairs (chosen and rejected responses); "
                        f"{source} holds {shape.name} rows, which train with --objective sft")
    return TrainingRows(rows, shape, source)


class Tokenized(NamedTuple):
    rows: datasets.Dataset  # input_ids and labels of the rows kept
    read: int
    skipped: dict[str, int]  # why → how many

    def line(self) -> str:
        why = "; ".join(f"{count} {reason}" for reason, count in self.skipped.items())
        return f"{len(self.rows)} of {self.read} rows kept" + (f", {sum(self.skipped.values())} skipped ({why})"
                                                             if self.skipped else "")


def tokenize_rows(training: TrainingRows, tokenizer: PreTrainedTokenizerBase, seq_len: int,
                  truncate: bool = False) -> Tokenized:
    """Tokenized rows of at most `seq_len` tokens; a longer row is skipped, or with `truncate` its
    response is cut to fit (a prompt that fills `seq_len` alone is still skipped). A preference
    pair is two rows, `chosen_input_ids`/`chosen_labels` and `rejected_…`, kept or skipped together."""
    shape, source = training.shape, training.source
    prefixes = tuple(f"{side}_" for side in PAIR_FIELDS) if shape.name == "pairs" else ("",)
    nothing = {f"{prefix}{key}": [] for prefix in prefixes for key in ("input_ids", "labels")} | {"length": 0}

    def sequences(row: dict) -> dict[str, dict[str, list[int]]] | str:
        """The row's tokenized sequences by column prefix, or why it is skipped."""
        if shape.name == "text":
            text = text_of(row["text"], "text")
            return {"": tokenize_text(text, tokenizer)} if text else SKIPPED_EMPTY
        conversations = pair_conversations(row) if shape.name == "pairs" else {"": to_chat(row, shape)}
        if isinstance(conversations, str):
            return conversations
        if any(not messages[-1]["content"] for messages in conversations.values()):
            return SKIPPED_EMPTY
        return {prefix: tokenize(messages, tokenizer) for prefix, messages in conversations.items()}

    def tokenize_row(row: dict, index: int) -> dict:
        try:
            tokenized = sequences(row)
        except ValueError as error:
            raise malformed_row(source, index + 1, error) from None
        if isinstance(tokenized, str):
            return {**nothing, "skipped": tokenized}
        columns = {}
        for prefix, ids in tokenized.items():
            if len(ids["input_ids"]) > seq_len:
                if not truncate or ids["labels"][seq_len - 1] == IGNORE_INDEX:
                    return {**nothing, "skipped": f"{SKIPPED_LONG} {seq_len}", "length": len(ids["input_ids"])}
                ids = {key: value[:seq_len] for key, value in ids.items()}
            columns |= {f"{prefix}{key}": value for key, value in ids.items()}
        return {**columns, "skipped": "", "length": 0}

    tokenized = training.rows.map(tokenize_row, with_indices=True, remove_columns=training.rows.column_names,
                                  desc="tokenize")
    skipped = dict(Counter(reason for reason in tokenized["skipped"] if reason))
    kept = tokenized.filter(lambda row: not row["skipped"], desc="skip").remove_columns(["skipped", "length"])
    if len(kept) == 0:
        if f"{SKIPPED_LONG} {seq_len}" not in skipped:
            reasons = "; ".join(skipped)
            raise QSVDError(f"no row of {source} is left to train on: every one is skipped ({reasons})")
        shortest = min(length for length in tokenized["length"] if length)
        raise QSVDError(f"no row of {source} fits in --seq-len {seq_len} (the shortest has {shortest} tokens); "
                        f"raise --seq-len, or pass --truncate to cut the responses")
    return Tokenized(kept, len(training.rows), skipped)


def build_dataset(data: str | None, tokenizer: PreTrainedTokenizerBase, seq_len: int,
                  seed: int = 0) -> datasets.Dataset:
    """Tokenized training rows of at most `seq_len` tokens, from `data` or the built-in set."""
    return tokenize_rows(training_rows(data, seed), tokenizer, seq_len).rows


def collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorForSeq2Seq:
    """Pads a batch to its longest row; padded labels carry no loss."""
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                  return_tensors="pt")


def text_windows(texts: list[str], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> list[dict[str, list[int]]]:
    """The texts, joined by the end-of-text token, cut into windows of `seq_len` tokens (of at least
    2), every token of each supervised: the rows of a perplexity."""
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    windows = [stream[start:start + seq_len] for start in range(0, len(stream), seq_len)]
    return [{"input_ids": window, "labels": window} for window in windows if len(window) > 1]


def held_out_rows(rows: datasets.Dataset, source: str, tokenizer: PreTrainedTokenizerBase, seq_len: int,
                  max_rows: int) -> datasets.Dataset:
    """The first `max_rows` rows tokenized for a held-out loss during training: text as perplexity
    windows, other rows as training rows (NLL of the answer, a long one cut to `seq_len`)."""
    rows = rows.select(range(min(max_rows, len(rows))))
    if "text" in rows.column_names:
        return datasets.Dataset.from_list(text_windows([text_of(text, "text") for text in rows["text"]], tokenizer,
                                                       seq_len)[:max_rows])
    return tokenize_rows(TrainingRows(rows, detect_shape(rows.column_names, source), source), tokenizer, seq_len,
                         truncate=True).rows


def first_batches(dataset: datasets.Dataset, collate, samples: int, batch_size: int, seed: int) -> list[dict]:
    """`samples` rows (shuffled by `seed`) as batches made by `collate`, e.g. for LoRA-SB's gradient estimate."""
    rows = dataset.shuffle(seed=seed).select(range(min(samples, len(dataset))))
    return [collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
            for start in range(0, len(rows), batch_size)]


# -- evaluation data ------------------------------------------------------------------------

def row_options(row: dict) -> list[str] | None:
    """The answer options of a row: an `options` field, or the 'Answer format: a/b/c' line."""
    if row.get("options"):
        return [str(option).lower() for option in row["options"]]
    match = ANSWER_FORMAT.search(row.get("instruction") or row.get("question") or "")
    return [option.strip().lower() for option in match[1].split("/")] if match else None


def read_eval_rows(path: str | Path, flag: str = "--data", config: str | None = None,
                   split: str | None = None) -> datasets.Dataset:
    """Records in any form `--data` takes (a hub dataset's or saved DatasetDict's `split`), or a
    .txt file read as one text."""
    path = Path(path)
    if path.suffix == ".txt" and path.is_file():
        return datasets.Dataset.from_list([{"text": path.read_text()}])
    return read_rows(path, flag, config, split, default_split="test")


def pick_task(rows: datasets.Dataset, task: str | None, source: str) -> str:
    """The task asked for, or one that fits the rows: text → ppl; preference pairs → pref; rows
    with answer options → choice; any other row with a reference answer → gen."""
    if task is not None and task not in EVAL_TASKS:
        raise QSVDError(f"--task must be one of {', '.join(EVAL_TASKS)}, got {task!r}")
    if "text" in rows.column_names:
        if task not in (None, "ppl"):
            raise QSVDError(f"{source} holds plain text: it takes --task ppl, not {task}")
        return "ppl"
    if task == "ppl":
        raise QSVDError(f"--task ppl needs a 'text' field or a .txt file; {source} has fields "
                        f"{', '.join(rows.column_names)}")
    pairs = detect_shape(rows.column_names, source).name == "pairs"
    if task is None:
        return "pref" if pairs else "choice" if row_options(rows[0]) else "gen"
    if pairs != (task == "pref"):
        raise QSVDError(f"{source} holds preference pairs (chosen/rejected): it takes --task pref, not {task}" if pairs
                        else f"--task pref needs preference pairs (chosen and rejected responses); {source} has "
                             f"fields {', '.join(rows.column_names)}")
    return task


def eval_sets(paths: list[str], task: str | None, split: str | None = None) -> list[tuple[Path, datasets.Dataset, str]]:
    """`finetune --eval-data`: each source's rows and task, checked before training starts."""
    sets = []
    for path in paths:
        rows = read_eval_rows(path, "--eval-data", split=split)
        sets.append((Path(path), rows, pick_task(rows, task, f"--eval-data {path}")))
    return sets
