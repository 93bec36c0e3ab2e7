"""Preference pairs (`--objective dpo|orpo`): a prompt and two responses, the chosen and the rejected.

A pair row (fields `chosen` and `rejected`) is one of these forms:
- `prompt`, `chosen`, `rejected` as strings;
- the same as message lists ({role, content}): the prompt's turns, then each response's;
- `chosen` and `rejected` as whole conversations (UltraFeedback): the turns before the last are
  the shared prompt, the last are the responses;
- `chosen` and `rejected` as Anthropic HH transcripts ("\\n\\nHuman: …\\n\\nAssistant: …"), read
  as such conversations.
Each response is rendered after the prompt with the chat template, as a supervised row is
(`data.tokenize`), and only its tokens carry loss. A pair is stored as two rows, `chosen_*` and
`rejected_*`, and a batch of B pairs is the 2B rows [chosen…, rejected…] (TRL's order).
"""

import re

import torch

PAIR_FIELDS = ("chosen", "rejected")
HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
SKIPPED_IDENTICAL = "with identical chosen and rejected responses"
SKIPPED_DIVERGING = "whose chosen and rejected conversations differ before their last turn"


def hh_turns(text: str, what: str) -> list[dict]:
    """An Anthropic HH transcript's turns: '\\n\\nHuman: …' and '\\n\\nAssistant: …' in turn."""
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError(f"{what} is a string but not an HH transcript ('\\n\\nHuman: …\\n\\nAssistant: …'); "
                         f"give the prompt as a 'prompt' field")
    return [{"role": HH_ROLES[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def message_list(value, what: str) -> list[dict]:
    """A list of {role, content} turns, checked."""
    if not isinstance(value, list) or not value or not all(
            isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)
            for turn in value):
        raise ValueError(f"{what} is not a non-empty list of {{role, content}} turns")
    return [{"role": turn["role"], "content": turn["content"]} for turn in value]


def conversation(value, what: str) -> list[dict]:
    """A whole conversation ending with the assistant's turn: a message list or an HH transcript."""
    turns = hh_turns(value, what) if isinstance(value, str) else message_list(value, what)
    if turns[-1]["role"] != "assistant":
        raise ValueError(f"the last turn of {what} is the {turns[-1]['role']}'s, not the assistant's response")
    return turns


def response(value, what: str) -> str:
    """A response: a string, or a message list whose turns are all the assistant's."""
    if isinstance(value, str):
        return value
    turns = message_list(value, what)
    if any(turn["role"] != "assistant" for turn in turns):
        raise ValueError(f"{what} has a turn that is not the assistant's")
    return "\n\n".join(turn["content"] for turn in turns)


def pair_conversations(row: dict) -> dict[str, list[dict]] | str:
    """The row's two conversations, prompt then response, by column prefix ("chosen_", "rejected_"),
    or why the pair is skipped; ValueError if the row is malformed."""
    if row.get("prompt") is not None:
        prompt = row["prompt"]
        context = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else message_list(prompt, "prompt")
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


class PairCollator:
    """A batch of B pairs as the 2B rows [chosen…, rejected…], collated by `collate_rows`; with
    `reference` (the starting model's log-likelihoods, `objectives.reference_log_likelihoods`) in
    the same order."""

    def __init__(self, collate_rows):
        self.collate_rows = collate_rows

    def __call__(self, features: list[dict]) -> dict:
        rows = [{"input_ids": f[f"{side}_input_ids"], "labels": f[f"{side}_labels"]}
                for side in PAIR_FIELDS for f in features]
        batch = self.collate_rows(rows)
        if "reference_chosen" in features[0]:
            batch["reference"] = torch.tensor([f[f"reference_{side}"] for side in PAIR_FIELDS for f in features],
                                              dtype=torch.float64)
        return batch


def pair_lengths(rows) -> list[int]:
    """Each pair's tokens, its two rows together."""
    return [len(c) + len(r) for c, r in zip(rows["chosen_input_ids"], rows["rejected_input_ids"])]


def is_pairs(rows) -> bool:
    """Whether tokenized rows are preference pairs."""
    return "chosen_input_ids" in rows.column_names
