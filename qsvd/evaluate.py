"""`qsvd eval`: score a trained run, or a plain model, on held-out data.

Tasks:
- gen: batched greedy generation; the answer is taken from the text and compared with the
  reference: the final number for GSM8K-style rows (after the last '####', else the last
  number), one of the row's options (answer1..answerN, true/false) for the LLM-Adapters format.
- choice: every option k is scored by its log-likelihood Σ_t log p(y_t | prompt, y_<t) as the
  completion (the reference output with its answer replaced by option k); the highest wins.
- nll: the mean negative log-likelihood per token of each row's reference answer, rendered and
  masked as in training: Σ_rows NLL / Σ_rows tokens, a continuous measure far less noisy than
  accuracy on a small model.
- ppl: perplexity exp(Σ NLL / Σ tokens) of plain text, cut into windows of `seq_len` tokens.
- pref: preference pairs; how often the chosen response's reward beats the rejected one's, and
  their mean margin. The reward is the run's objective's (`objectives`): DPO's β(π − π_ref)
  against the run's starting adapter, ORPO's β π̄; for a plain model or an sft run, π̄, the mean
  log-likelihood per token.

Accuracy comes with a 95% Wilson score interval, the answer NLL and the preference margin with a
bootstrap 95% interval over rows, and every example's prediction is written to a JSONL file.
"""

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import torch
from rich.progress import track
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .batching import PairCollator, example_lengths
from .config import check_positive
from .console import console
from .data import (IGNORE_INDEX, Shape, TrainingRows, collator, detect_shape, malformed_row, pick_task,
                   prompt_and_completion, read_eval_rows, row_options, text_windows, to_chat, tokenize,
                   tokenize_prompt, tokenize_rows)
from .errors import QSVDError
from .files import publish
from .loss import row_log_likelihoods
from .objectives import PerToken, adapter_swapped, pairs_log_likelihoods, run_objective
from .run_dir import load_run_or_model

BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED = 2000, 0
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class EvalResult:
    task: str
    examples: int
    correct: int | None = None  # gen, choice
    perplexity: float | None = None  # ppl
    tokens: int | None = None  # ppl, nll
    nll: float | None = None  # nll: per token
    nll_ci95: tuple[float, float] | None = None  # nll: bootstrap over rows
    margin: float | None = None  # pref: the mean reward margin, chosen − rejected
    margin_ci95: tuple[float, float] | None = None  # pref: bootstrap over pairs
    reward: str | None = None  # pref: the objective whose reward compares the pair
    skipped: dict[str, int] | None = None  # pref: pairs not scored, by why
    predictions: str = ""

    @property
    def accuracy(self) -> float | None:
        return None if self.correct is None else self.correct / self.examples

    def summary(self) -> dict:
        interval = wilson_interval(self.correct, self.examples) if self.correct is not None else self.nll_ci95
        return asdict(self) | {"accuracy": self.accuracy, "ci95": interval}

    def line(self) -> str:
        if self.task == "nll":
            low, high = self.nll_ci95
            return (f"answer NLL {self.nll:.4f} per token, 95% CI {low:.4f}–{high:.4f}, over {self.tokens:,} "
                    f"tokens in {self.examples} rows | predictions: {self.predictions}")
        if self.task == "ppl":
            return (f"perplexity {self.perplexity:.3f} over {self.tokens:,} tokens in {self.examples} "
                    f"windows | predictions: {self.predictions}")
        low, high = wilson_interval(self.correct, self.examples)
        accuracy = (f"accuracy {100 * self.accuracy:.1f}% ({self.correct}/{self.examples}), 95% CI "
                    f"{100 * low:.1f}–{100 * high:.1f}%")
        if self.task == "pref":
            skipped = f", {sum(self.skipped.values())} pairs skipped" if self.skipped else ""
            accuracy = (f"preference {accuracy}; mean margin {self.margin:.4f}, 95% CI {self.margin_ci95[0]:.4f}–"
                        f"{self.margin_ci95[1]:.4f} (reward: {self.reward}{skipped})")
        return f"{accuracy} | predictions: {self.predictions}"


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion: (p̂ + z²/2n ± z √(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)."""
    p = correct / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


def bootstrap_interval(nll: list[float], tokens: list[int] | None = None, samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """The 95% percentile bootstrap interval of Σ nll / Σ tokens, the rows resampled with
    replacement. Given per-row differences of two models' NLL on the same rows, it is the paired
    interval of the difference of their means. Without `tokens`, the interval of the plain mean."""
    nll = torch.tensor(nll, dtype=torch.float64)
    tokens = torch.ones_like(nll) if tokens is None else torch.tensor(tokens, dtype=torch.float64)
    rows = torch.randint(len(nll), (samples, len(nll)), generator=torch.Generator().manual_seed(seed))
    means = nll[rows].sum(dim=1) / tokens[rows].sum(dim=1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return low, high


# -- answers ---------------------------------------------------------------------------------

def extract_number(text: str) -> str | None:
    """The final number of a solution: the first after the last '####' if there is one, else the
    last number in the text; thousands separators dropped, '72.0' read as '72'."""
    text = text.replace(",", "")
    marked = NUMBER.findall(text.rsplit("####", 1)[1]) if "####" in text else []
    numbers = marked[:1] or NUMBER.findall(text)[-1:]
    if not numbers:
        return None
    value = float(numbers[0])
    return str(int(value)) if value.is_integer() else str(value)


def extract_option(text: str, options: list[str]) -> str | None:
    """The first of `options` (e.g. answer1..answer4, true/false) that the text names, as the
    LLM-Adapters evaluation reads it."""
    pattern = r"\b(" + "|".join(re.escape(option) for option in options) + r")\b"
    match = re.search(pattern, text, re.IGNORECASE)
    return match[1].lower() if match else None


def reference_answer(row: dict, shape: Shape) -> str:
    """The gold answer: the `answer` field of the LLM-Adapters format, or the final number of a
    GSM8K-style solution, or the whole reference text."""
    if shape.name == "alpaca" and row.get("answer"):
        return str(row["answer"]).strip().lower()
    text = to_chat(row, shape)[-1]["content"]
    return extract_number(text) if "####" in text else text.strip().lower()


def predicted_answer(text: str, gold: str, options: list[str] | None) -> str | None:
    if options:
        return extract_option(text, options)
    if NUMBER.fullmatch(gold):
        return extract_number(text)
    return text.strip().lower()


# -- the four tasks ---------------------------------------------------------------------------

@dataclass
class Example:
    messages: list[dict]  # chat messages ending in the reference answer
    gold: str
    options: list[str] | None


def examples_from(rows: datasets.Dataset, source: str) -> list[Example]:
    shape = detect_shape(rows.column_names, source)
    examples = []
    for number, row in enumerate(rows, 1):
        try:
            examples.append(Example(to_chat(row, shape), reference_answer(row, shape), row_options(row)))
        except ValueError as error:
            raise malformed_row(source, number, error) from None
    return examples


def by_length(items: list, length, batch_size: int) -> list[list[int]]:
    """Batches of indices into `items`, longest first, so each batch pads little."""
    order = sorted(range(len(items)), key=lambda i: -length(items[i]))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


@torch.inference_mode()
def generate_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[Example],
                     batch_size: int, max_new_tokens: int) -> list[dict]:
    """Greedy completions of every prompt, left-padded into batches, with the answer read off."""
    prompts = [tokenize_prompt(prompt_and_completion(e.messages, tokenizer)[0], tokenizer) for e in examples]
    texts = [""] * len(examples)
    for batch in track(by_length(prompts, len, batch_size), description="generate", console=console):
        width = max(len(prompts[i]) for i in batch)
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(prompts[i])) + prompts[i] for i in batch])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in batch])
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                             do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        for i, tokens in zip(batch, out[:, width:]):
            texts[i] = tokenizer.decode(tokens, skip_special_tokens=True)
    return [{"gold": e.gold, "prediction": predicted_answer(text, e.gold, e.options), "output": text}
            for e, text in zip(examples, texts)]


def option_sequences(example: Example, tokenizer: PreTrainedTokenizerBase) -> list[dict[str, list[int]]]:
    """Prompt + completion tokens for each option: the reference output with the gold answer
    replaced by the option (e.g. 'the correct answer is answer3'), or the option alone."""
    if not example.options:
        raise QSVDError("--task choice needs answer options in every row (an 'options' list, or an "
                        "'Answer format: a/b/c' line in the instruction); use --task gen for this data")
    reference = example.messages[-1]["content"]
    sequences = []
    for option in example.options:
        completion = (re.sub(re.escape(example.gold), option, reference, flags=re.IGNORECASE)
                      if example.gold in reference.lower() else option)
        sequences.append(tokenize(example.messages[:-1] + [{"role": "assistant", "content": completion}], tokenizer))
    return sequences


def shared_prefix(rows: list[list[int]]) -> int:
    """The length of the prefix that all rows share, leaving each at least one token of its own."""
    shared = 0
    while shared < min(map(len, rows)) - 1 and len({row[shared] for row in rows}) == 1:
        shared += 1
    return shared


@torch.inference_mode()
def option_log_likelihoods(model: PreTrainedModel, examples: list[list[dict[str, list[int]]]]) -> torch.Tensor:
    """[examples, K]: Σ log p of each option sequence's supervised tokens after the prefix that
    the example's K options share.

    The shared prefixes (the prompt and, e.g., 'the correct answer is ') run once, left-padded
    (rotary positions are relative, so padding shifts nothing); their cache is repeated for the K
    options, which run only their own tokens. What the prefix adds to the log-likelihood is the
    same for every option, so the ranking is that of the full sums.
    """
    device, options = model.device, len(examples[0])
    shared = [shared_prefix([sequence["input_ids"] for sequence in sequences]) for sequences in examples]
    width = max(shared)
    prefix_ids = torch.tensor([[0] * (width - n) + sequences[0]["input_ids"][:n]
                               for sequences, n in zip(examples, shared)], device=device)
    prefix_mask = torch.tensor([[0] * (width - n) + [1] * n for n in shared], device=device)
    prefix = model(input_ids=prefix_ids, attention_mask=prefix_mask, use_cache=True)
    cache = prefix.cache
    cache.batch_repeat_interleave(options)

    suffixes = [(sequence["input_ids"][n:], sequence["labels"][n:])
                for sequences, n in zip(examples, shared) for sequence in sequences]
    length = max(len(ids) for ids, _ in suffixes)
    suffix_ids = torch.tensor([ids + [0] * (length - len(ids)) for ids, _ in suffixes], device=device)
    labels = torch.tensor([labels + [IGNORE_INDEX] * (length - len(labels)) for _, labels in suffixes], device=device)
    own = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids, _ in suffixes], device=device)
    mask = torch.cat([prefix_mask.repeat_interleave(options, dim=0), own], dim=1)
    logits = model(input_ids=suffix_ids, attention_mask=mask, cache=cache).logits
    # suffix token j is predicted by the prefix's last logits (j = 0) or by the suffix's logits at j − 1
    logits = torch.cat([prefix.logits[:, -1:].repeat_interleave(options, dim=0), logits[:, :-1]], dim=1)
    log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    return (log_probs * (labels != IGNORE_INDEX)).sum(dim=1).view(len(examples), options)


def choose_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[Example],
                   batch_size: int) -> list[dict]:
    """The option whose completion has the highest log-likelihood, for every example; examples
    are batched with others that have as many options."""
    sequences = [option_sequences(example, tokenizer) for example in examples]
    scores = [None] * len(examples)
    groups = {}
    for index, example in enumerate(examples):
        groups.setdefault(len(example.options), []).append(index)
    batches = [group[start:start + batch_size] for group in groups.values()
               for start in range(0, len(group), batch_size)]
    for batch in track(batches, description="score options", console=console):
        for i, row in zip(batch, option_log_likelihoods(model, [sequences[i] for i in batch]).tolist()):
            scores[i] = {option: round(score, 4) for option, score in zip(examples[i].options, row)}
    return [{"gold": example.gold, "prediction": max(score, key=score.get), "scores": score}
            for example, score in zip(examples, scores)]


def token_log_likelihoods(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, list[int]]],
                          batch_size: int, description: str) -> list[dict]:
    """Each row's NLL Σ −log p over its supervised tokens (labels not IGNORE_INDEX) and their count,
    the rows batched by length."""
    collate = collator(tokenizer)
    results = [None] * len(rows)
    for batch in track(by_length(rows, lambda row: len(row["input_ids"]), batch_size), description=description,
                       console=console):
        inputs = collate([rows[i] for i in batch])
        sums, counts = row_log_likelihoods(model, {key: value.to(model.device) for key, value in inputs.items()})
        for i, total, count in zip(batch, sums.tolist(), counts.tolist()):
            results[i] = {"tokens": count, "nll": round(-total, 6)}
    return results


@torch.inference_mode()
def text_log_likelihoods(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str],
                         seq_len: int, batch_size: int) -> list[dict]:
    """The texts, joined by the end-of-text token, cut into windows of `seq_len` tokens; each
    window's Σ log p of its tokens after the first, and their count."""
    rows = text_windows(texts, tokenizer, seq_len)
    if not rows:
        raise QSVDError("the text for --task ppl has fewer than 2 tokens")
    return token_log_likelihoods(model, tokenizer, rows, batch_size, "perplexity")


@torch.inference_mode()
def answer_log_likelihoods(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[Example],
                           batch_size: int) -> list[dict]:
    """Each example's reference answer: its NLL Σ −log p over the answer tokens (the prompt masked,
    as in training) and their count."""
    rows = [tokenize(example.messages, tokenizer) for example in examples]
    results = token_log_likelihoods(model, tokenizer, rows, batch_size, "answer NLL")
    return [{"gold": example.gold, **result} for example, result in zip(examples, results)]


def pair_log_likelihoods_of(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: datasets.Dataset,
                            batch_size: int, description: str) -> tuple[torch.Tensor, torch.Tensor]:
    """π and |y| of every pair's responses, as [pairs, 2] (chosen, rejected), in padded batches of
    pairs of similar length."""
    return pairs_log_likelihoods(model, pairs, PairCollator(collator(tokenizer)),
                                 by_length(example_lengths(pairs), lambda length: length, batch_size), description)


def preferences(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: datasets.Dataset, objective,
                reference_adapter: dict[str, torch.Tensor] | None, batch_size: int, seq_len: int,
                source: str) -> tuple[list[dict], dict[str, int]]:
    """Each pair's rewards under `objective` (against `reference_adapter` where it needs a
    reference), and the pairs skipped, by why (a response cut to `seq_len`, as training's)."""
    tokenized = tokenize_rows(TrainingRows(rows, Shape("pairs"), source), tokenizer, seq_len, truncate=True)
    pairs = tokenized.rows
    sums, counts = pair_log_likelihoods_of(model, tokenizer, pairs, batch_size, "preference log-likelihoods")
    reference = None
    if objective.needs_reference:
        if reference_adapter is None:
            raise QSVDError(f"{objective.name}'s reward needs the run's reference adapter, which it lacks")
        with adapter_swapped(model, reference_adapter):
            reference, _ = pair_log_likelihoods_of(model, tokenizer, pairs, batch_size, "reference log-likelihoods")
    rewards = objective.rewards(sums, counts, reference)
    results = [{"chosen_logp": round(s[0], 6), "rejected_logp": round(s[1], 6), "chosen_tokens": c[0],
                "rejected_tokens": c[1], "chosen_reward": round(r[0], 6), "rejected_reward": round(r[1], 6),
                "margin": round(r[0] - r[1], 6), "correct": r[0] > r[1]}
               for s, c, r in zip(sums.tolist(), counts.tolist(), rewards.tolist())]
    return results, tokenized.skipped


# -- running an evaluation -------------------------------------------------------------------

def evaluate_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: datasets.Dataset,
                   task: str, predictions: str | Path, batch_size: int = 8, max_new_tokens: int = 256,
                   seq_len: int = 512, source: str = "--data", objective=PerToken(),
                   reference_adapter: dict[str, torch.Tensor] | None = None) -> EvalResult:
    """Score `model` on `rows` by `task`, write one JSON line an example to `predictions`; a pref
    task compares the pairs by `objective`'s reward (against `reference_adapter`, for DPO's)."""
    was_training = model.training
    model.eval()
    skipped = None
    try:
        if task == "pref":
            results, skipped = preferences(model, tokenizer, rows, objective, reference_adapter, batch_size,
                                           seq_len, source)
        elif task == "ppl":
            results = text_log_likelihoods(model, tokenizer, rows["text"], seq_len, batch_size)
        else:
            scorers = {"gen": lambda examples: generate_answers(model, tokenizer, examples, batch_size, max_new_tokens),
                       "choice": lambda examples: choose_answers(model, tokenizer, examples, batch_size),
                       "nll": lambda examples: answer_log_likelihoods(model, tokenizer, examples, batch_size)}
            results = scorers[task](examples_from(rows, source))
    finally:
        model.train(was_training)
    if task in ("gen", "choice"):
        for result in results:
            result["correct"] = result["prediction"] is not None and same_answer(result["prediction"], result["gold"])
    write_jsonl(Path(predictions), [{"index": i, **result} for i, result in enumerate(results)])
    if task in ("nll", "ppl"):
        nll, tokens = [r["nll"] for r in results], [r["tokens"] for r in results]
        if not sum(tokens):
            raise QSVDError(f"{source} has no answer tokens to score")
        mean = sum(nll) / sum(tokens)
        if task == "ppl":
            return EvalResult(task, len(results), perplexity=math.exp(mean), tokens=sum(tokens),
                              predictions=str(predictions))
        return EvalResult(task, len(results), tokens=sum(tokens), nll=mean, nll_ci95=bootstrap_interval(nll, tokens),
                          predictions=str(predictions))
    if task == "pref":
        margins = [r["margin"] for r in results]
        return EvalResult(task, len(results), correct=sum(r["correct"] for r in results),
                          margin=sum(margins) / len(margins), margin_ci95=bootstrap_interval(margins),
                          reward=objective.name, skipped=skipped, predictions=str(predictions))
    return EvalResult(task, len(results), correct=sum(r["correct"] for r in results), predictions=str(predictions))


def same_answer(prediction: str, gold: str) -> bool:
    """Numbers compare by value (3 == 3.0), anything else as lower-case text."""
    if NUMBER.fullmatch(prediction) and NUMBER.fullmatch(gold):
        return math.isclose(float(prediction), float(gold), rel_tol=0, abs_tol=1e-6)
    return prediction.strip().lower() == gold.strip().lower()


def write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON line a record, published whole (`files.publish`)."""
    text = "".join(json.dumps(record) + "\n" for record in records)
    publish(path, lambda tmp: tmp.write_text(text), directory=False)


def evaluate(target: str | Path, data: str | Path, task: str | None = None, predictions: str | Path | None = None,
             bits: int | None = None, batch_size: int = 8, max_new_tokens: int = 256, seq_len: int = 512,
             max_examples: int | None = None, revision: str | None = None, data_config: str | None = None,
             data_split: str | None = None) -> EvalResult:
    """Evaluate a run directory, or a plain model (alias, hub id, HF directory or GGUF) stored at `bits`
    (default 16), as `qsvd eval` does. The data and task are checked before any model loads."""
    check_positive({"batch-size": batch_size, "max-new-tokens": max_new_tokens, "seq-len": seq_len,
                    "max-examples": max_examples})
    rows = read_eval_rows(data, "--data", data_config, data_split)
    if max_examples is not None:
        rows = rows.select(range(min(max_examples, len(rows))))
    task = pick_task(rows, task, f"--data {data}")
    target = Path(target)
    model, tokenizer, run = load_run_or_model(target, bits, revision)
    if run is not None:
        objective, reference_adapter = run_objective(run.record["config"]), run.reference_adapter
        default_predictions = target / f"eval-{Path(data).stem}-{task}.jsonl"
    else:
        objective, reference_adapter = PerToken(), None
        default_predictions = Path(f"eval-{target.stem}-{Path(data).stem}-{task}.jsonl")
    result = evaluate_model(model, tokenizer, rows, task, predictions or default_predictions, batch_size,
                            max_new_tokens, seq_len, f"--data {data}", objective, reference_adapter)
    console.print(result.line())
    return result
