"""dpo_teach.utils: padding both ways (masks from lengths, never from the pad id), position ids over
real tokens only, seeding, and the seeded order of the training batches."""

import random

import numpy as np
import pytest
import torch

from dpo_teach.utils import (
    left_pad,
    position_ids_from_mask,
    right_pad,
    seed_everything,
    shuffled_batches,
)

ROWS = [[5, 6, 7], [8], [9, 10]]


def test_right_pad_puts_the_ids_first():
    ids, mask = right_pad(ROWS, pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_left_pad_puts_the_ids_last():
    ids, mask = left_pad(ROWS, pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert ids.dtype == mask.dtype == torch.long


@pytest.mark.parametrize("pad", [right_pad, left_pad])
def test_masks_come_from_lengths_not_from_the_pad_id(pad):
    """GPT-2 pads with EOS, which also ends real responses: a real token equal to the pad id is kept."""
    ids, mask = pad([[4, 4], [4], [7, 4, 4]], pad_id=4)
    assert (ids == 4).sum() == 9 - 1  # every id but the 7 is a 4, real or pad
    assert mask.sum(1).tolist() == [2, 1, 3]


def test_position_ids_count_real_tokens_only():
    _, mask = left_pad(ROWS, pad_id=0)
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 1]]
    _, mask = right_pad(ROWS, pad_id=0)
    positions = position_ids_from_mask(mask)
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0], [0, 1, 1]]
    assert (positions[mask.bool()] == torch.cat([torch.arange(len(r)) for r in ROWS])).all(), "real tokens: 0, 1, ..."


def test_left_padding_does_not_change_a_models_logits(tiny_model):
    """With position ids from the mask, a left-padded row gives the same logits at its real tokens as
    the row alone."""
    ids, mask = left_pad(ROWS, pad_id=0)
    with torch.no_grad():
        padded = tiny_model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        for i, row in enumerate(ROWS):
            alone = tiny_model(input_ids=torch.tensor([row])).logits[0]
            torch.testing.assert_close(padded[i, -len(row):], alone, atol=1e-5, rtol=1e-5)


def test_shuffled_batches_read_each_item_once_per_epoch():
    batches = shuffled_batches(10, 4, seed=0)
    first_epoch = [next(batches) for _ in range(2)]  # 8 of 10 items; the last 2 are too few for a batch
    assert all(len(b) == 4 for b in first_epoch)
    items = [i for b in first_epoch for i in b]
    assert len(set(items)) == 8 and set(items) <= set(range(10)), "no item twice within an epoch"
    second_epoch = [next(batches) for _ in range(2)]  # a new permutation
    assert len({i for b in second_epoch for i in b}) == 8
    assert first_epoch != second_epoch, "each epoch in a new order"
    again = shuffled_batches(10, 4, seed=0)
    assert [next(again) for _ in range(4)] == first_epoch + second_epoch, "seeded"
    other = shuffled_batches(10, 4, seed=1)
    assert [next(other) for _ in range(2)] != first_epoch
    ten = shuffled_batches(10, 5, seed=0)  # batches that fill an epoch exactly
    epoch = next(ten) + next(ten)
    assert sorted(epoch) == list(range(10))


def test_shuffled_batches_with_fewer_items_than_a_batch():
    batches = shuffled_batches(3, 4, seed=0)
    for _ in range(3):
        assert sorted(next(batches)) == [0, 1, 2], "every batch is all the items"


def test_seed_everything_seeds_python_numpy_and_torch():
    seed_everything(7)
    first = (random.random(), np.random.rand(), torch.rand(()).item())
    seed_everything(7)
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == first
    seed_everything(8)
    assert (random.random(), np.random.rand(), torch.rand(()).item()) != first
