"""Batches without compute on padding: a flattened batch trains exactly as the padded one, for every
method; no row attends to another; packing is best-fit decreasing and cuts no row; length-grouped
batches are a seeded order of every row."""

import datasets
import pytest
import torch
from click.testing import CliRunner

import qsvd
from qsvd.batching import ROWS_ATTENTION, Batching, FlattenRows, LengthGroupedSampler, attend_rows_alone, choose, pack
from qsvd.cli import cli
from qsvd.data import IGNORE_INDEX, collator
from qsvd.loss import supervised_loss, supervised_token_losses
from qsvd.methods import METHODS
from conftest import char_tokenizer, tiny_model, tiny_run_args

LENGTHS = [(9, 3), (17, 5), (6, 2), (13, 13)]  # (tokens, of which prompt); the last row: loss on every token


def rows(lengths=LENGTHS, seed=0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    made = []
    for length, prompt in lengths:
        ids = torch.randint(4, 100, (length,), generator=generator).tolist()
        made.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:] if prompt < length else ids})
    return made


def prepared(method):
    options = {"grad_batches": [collator(char_tokenizer())(rows())], "lr": 1e-3} if METHODS[method].needs_gradient_init else {}
    model = qsvd.prepare(tiny_model(), method, bits=4, rank=4, device="cpu", progress=False, **options)
    for parameter in model.parameters():  # LoRA's B = 0 would leave A's gradient zero: give every factor one
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.05, generator=torch.Generator().manual_seed(parameter.numel()))
    return model


def accumulated(model, batches) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and the adapter's gradients of micro-batches accumulated as Trainer does: each
    normalised by the supervised tokens of them all (Trainer counts labels[..., 1:])."""
    total = sum((batch["labels"][..., 1:] != IGNORE_INDEX).sum() for batch in batches)
    model.zero_grad()
    loss = 0.0
    for batch in batches:
        step = supervised_loss(model, batch, total)
        step.backward()
        loss += step.item()
    return loss, {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", list(METHODS))
def test_a_flattened_batch_trains_as_the_padded_batch_with_accumulation(method):
    model = prepared(method)
    micro = [rows(seed=1), rows(LENGTHS[::-1], seed=2)]
    padded_loss, padded = accumulated(model, [collator(char_tokenizer())(batch) for batch in micro])
    attend_rows_alone(model, Batching("padding-free", "test"), torch.float32)  # as training does
    flat_loss, flat = accumulated(model, [FlattenRows()(batch) for batch in micro])
    assert flat_loss == pytest.approx(padded_loss, rel=1e-5)
    assert padded.keys() == flat.keys() and padded
    for name, gradient in padded.items():
        assert gradient.norm() > 0, name
        assert (flat[name] - gradient).norm() <= 1e-5 * gradient.norm(), name


def token_losses(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return supervised_token_losses(model, batch, reduction="none")[0]


@pytest.mark.parametrize("attention", [ROWS_ATTENTION, "sdpa"])  # qsvd's, and sdpa's block-diagonal mask
def test_no_row_attends_to_another(attention):
    """Each row's token losses in a flattened batch are its own alone, whatever the other rows hold."""
    model = tiny_model().float()
    model.set_attn_implementation(attention)
    batch = rows()
    alone = [token_losses(model, FlattenRows()([row])) for row in batch]
    together = token_losses(model, FlattenRows()(batch))
    assert torch.allclose(together, torch.cat(alone), atol=1e-6)
    changed = batch[:1] + rows(LENGTHS[1:], seed=7)  # every row but the first, other tokens
    first = len(alone[0])
    assert torch.allclose(token_losses(model, FlattenRows()(changed))[:first], alone[0], atol=1e-6)
    assert not torch.allclose(token_losses(model, collator(char_tokenizer())(changed))[first:], together[first:])


def test_rows_attention_takes_each_row_alone_and_other_batches_as_sdpa(monkeypatch):
    """A flattened batch's attention runs row by row, causal and with no mask (no [Σ lengths]² one);
    a padded batch's runs once, with sdpa's mask, and its losses are sdpa's."""
    model = tiny_model().float()
    padded = collator(char_tokenizer())(rows())
    plain = token_losses(model, padded)
    attend_rows_alone(model, Batching("padding-free", "test"), torch.float32)
    calls = []
    sdpa = qsvd.batching.sdpa_attention_forward
    monkeypatch.setattr(qsvd.batching, "sdpa_attention_forward",
                        lambda module, query, key, value, mask, **kwargs:
                        calls.append((query.shape[2], mask is None)) or sdpa(module, query, key, value, mask, **kwargs))
    token_losses(model, FlattenRows()(rows()))
    layers = model.config.num_hidden_layers
    assert calls == [(length, True) for length, _ in LENGTHS] * layers
    calls.clear()
    assert torch.equal(token_losses(model, padded), plain)
    assert calls == [(max(length for length, _ in LENGTHS), False)] * layers


def test_flattened_rows_restart_positions_and_ignore_each_rows_first_label():
    (a, b) = made = rows([(3, 1), (2, 0)])
    batch = FlattenRows()(made)
    assert batch["input_ids"].tolist() == [a["input_ids"] + b["input_ids"]] and "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, *a["input_ids"][1:], IGNORE_INDEX, b["input_ids"][1]]]


def test_packing_is_best_fit_decreasing_and_cuts_no_row():
    lengths = [2, 5, 1, 3, 4, 3]
    made = rows([(n, 0) for n in lengths])
    packs = pack(datasets.Dataset.from_list(made), seq_len=8)
    # 5 → new; 4 → new; 3 → the 5's (3 free, exact); 3 → the 4's; 2 → new (nothing has 2 free); 1 → the 4's (1 free)
    assert [positions.count(0) for positions in packs["position_ids"]] == [2, 3, 1]
    assert [len(ids) for ids in packs["input_ids"]] == [8, 8, 2]
    by_start = {tuple(row["input_ids"]): row for row in made}
    for ids, labels, positions in zip(packs["input_ids"], packs["labels"], packs["position_ids"]):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        for start, end in zip(starts, starts[1:]):
            row = by_start[tuple(ids[start:end])]  # each row whole
            assert labels[start:end] == [IGNORE_INDEX] + row["labels"][1:]
    assert sum(map(len, packs["input_ids"])) == sum(lengths)
    flattened = FlattenRows()([packs[0], packs[2]])  # a batch of packs keeps each pack's own positions
    assert flattened["position_ids"].tolist() == [packs["position_ids"][0] + packs["position_ids"][2]]


def test_length_grouped_batches_are_a_seeded_order_of_every_row_per_epoch():
    lengths = torch.randint(5, 500, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    sampler = LengthGroupedSampler(8, lengths, seed=42)
    first, again = list(sampler), list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(first) == sorted(second) == list(range(400)) and first == again and first != second
    assert list(LengthGroupedSampler(8, lengths, seed=42)) == first
    padding = lambda order: sum(8 * max(lengths[i] for i in order[s:s + 8]) - sum(lengths[i] for i in order[s:s + 8])
                                for s in range(0, 400, 8))
    shuffled = torch.randperm(400, generator=torch.Generator().manual_seed(0)).tolist()
    assert padding(first) < padding(shuffled) / 5


def test_auto_picks_padding_free_where_rows_attend_alone(monkeypatch):
    """Flattened batches wherever each row can attend alone: by flash-attention's varlen kernels
    where they run (a GPU, half precision, flash_attn installed), else by sdpa row by row; a model
    on eager attention, which would attend across rows through the block mask, has its rows
    grouped by length instead. The run says which, and why."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    by_rows = Batching("padding-free", "no compute on padding, attention by sdpa row by row; --batching to choose")
    assert choose("auto", cpu, torch.float32, "sdpa") == choose("auto", gpu, torch.bfloat16, "sdpa") == by_rows
    assert choose("auto", cpu, torch.float32, ROWS_ATTENTION) == by_rows  # once set for training
    assert choose("auto", cpu, torch.float32, "eager") == Batching(
        "grouped", "the model's eager attention would attend across a flattened batch's rows; --batching to choose")
    assert choose("packed", cpu, torch.float32, "eager") == Batching("packed", "--batching")
    monkeypatch.setattr("qsvd.batching.is_flash_attn_2_available", lambda: True)
    for attention in ("sdpa", "eager"):
        assert "flash-attention's varlen kernels" in choose("auto", gpu, torch.bfloat16, attention).why
    assert choose("auto", gpu, torch.float32, "sdpa") == choose("auto", cpu, torch.bfloat16, "sdpa") == by_rows


def test_rows_attend_alone_only_where_the_model_allows():
    """attend_rows_alone sets sdpa row by row for a flattened batch on an sdpa model, and leaves an
    eager model's attention (soft-capping) and any batch that is not flattened as they are."""
    for attention, batching, expected in [("sdpa", "padding-free", ROWS_ATTENTION), ("sdpa", "grouped", "sdpa"),
                                          ("eager", "packed", "eager")]:
        model = tiny_model()
        model.set_attn_implementation(attention)
        attend_rows_alone(model, Batching(batching, "test"), torch.float32)
        assert model.config._attn_implementation == expected, (attention, batching)


def test_the_batching_is_said_recorded_and_checked(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(cli, ["finetune", *tiny_run_args(tiny_model_dir, tmp_path / "run", "--max-steps", 2,
                                                                 "--packing")])
    assert result.exit_code == 0, result.output
    assert "batching: packed (--batching)" in result.output
    assert '"batching": "packed"' in (tmp_path / "run" / "qsvd_config.json").read_text()
    both = CliRunner().invoke(cli, ["finetune", *tiny_run_args(tiny_model_dir, tmp_path / "x", "--packing",
                                                               "--batching", "grouped")])
    assert both.exit_code == 2 and "give one of --packing and --batching grouped" in both.output
    unknown = CliRunner().invoke(cli, ["finetune", *tiny_run_args(tiny_model_dir, tmp_path / "x", "--batching", "bins")])
    assert unknown.exit_code == 2 and "'bins' is not one of" in unknown.output
