"""Training data: local json/jsonl in three shapes, or a small arithmetic set qsvd makes itself.

Every row becomes a (prompt, completion) pair; only the completion's tokens carry loss.
- alpaca: instruction (+ input) → output;
- question/answer (GSM8K);
- chat: messages, the last assistant turn being the completion.
"""

import random
from pathlib import Path
from typing import NamedTuple

import datasets
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from .errors import QSVDError

IGNORE_INDEX = -100
PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
FORMATS = {"alpaca": ("instruction", "output"), "qa": ("question", "answer"), "chat": ("messages",)}


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


def read_rows(path: str | Path, flag: str = "--data") -> datasets.Dataset:
    """A local json or jsonl file as a Dataset, with a clear error for a missing or bad file."""
    path = Path(path)
    if not path.is_file():
        raise QSVDError(f"{flag} {path}: no such file")
    try:
        return datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as error:  # datasets wraps json errors in several types
        raise QSVDError(f"{flag} {path} is not a json or jsonl file of records ({type(error).__name__})") from error


def detect_format(columns: list[str], source: str) -> str:
    for name, needed in FORMATS.items():
        if all(column in columns for column in needed):
            return name
    raise QSVDError(f"{source} has none of the known field sets (instruction/output, question/answer, "
                    f"messages); its fields are: {', '.join(columns) or 'none'}")


def to_chat(row: dict, fmt: str) -> list[dict]:
    """The row as chat messages, ending with the assistant's answer."""
    if fmt == "chat":
        return row["messages"]
    if fmt == "alpaca":
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    return [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]


def prompt_and_completion(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """Render with the tokenizer's chat template, or a plain instruction template without one."""
    context, answer = messages[:-1], messages[-1]["content"]
    if tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        return prompt, full[len(prompt):]
    user_text = "\n\n".join(m["content"] for m in context)
    return PLAIN_TEMPLATE.format(prompt=user_text), answer + tokenizer.eos_token


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


class TrainingRows(NamedTuple):
    rows: datasets.Dataset
    fmt: str  # a key of FORMATS
    source: str  # for messages: "--data FILE" or "the built-in dataset"


def training_rows(data: str | None, seed: int = 0) -> TrainingRows:
    """The rows of `data` or the built-in set, and their format: a bad file fails here, before
    any model is loaded."""
    rows = read_rows(data) if data else synthetic_arithmetic(seed=seed)
    source = f"--data {data}" if data else "the built-in dataset"
    return TrainingRows(rows, detect_format(rows.column_names, source), source)


def tokenize_rows(training: TrainingRows, tokenizer: PreTrainedTokenizerBase, seq_len: int) -> datasets.Dataset:
    """Tokenized training rows of at most `seq_len` tokens."""
    rows = training.rows
    tokenized = rows.map(lambda row: tokenize(to_chat(row, training.fmt), tokenizer),
                         remove_columns=rows.column_names, desc="tokenize")
    kept = tokenized.filter(lambda row: len(row["input_ids"]) <= seq_len, desc="filter by --seq-len")
    if len(kept) == 0:
        shortest = min((len(ids) for ids in tokenized["input_ids"]), default=0)
        raise QSVDError(f"no row of {training.source} fits in --seq-len {seq_len} (the shortest has "
                        f"{shortest} tokens); raise --seq-len")
    return kept


def build_dataset(data: str | None, tokenizer: PreTrainedTokenizerBase, seq_len: int,
                  seed: int = 0) -> datasets.Dataset:
    """Tokenized training rows of at most `seq_len` tokens, from `data` or the built-in set."""
    return tokenize_rows(training_rows(data, seed), tokenizer, seq_len)


def collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorForSeq2Seq:
    """Pads a batch to its longest row; padded labels carry no loss."""
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                  return_tensors="pt")


def first_batches(dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, samples: int,
                  batch_size: int, seed: int) -> list[dict]:
    """`samples` rows (shuffled by `seed`) as padded batches, e.g. for LoRA-SB's gradient estimate."""
    rows = dataset.shuffle(seed=seed).select(range(min(samples, len(dataset))))
    collate = collator(tokenizer)
    return [collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
            for start in range(0, len(rows), batch_size)]
