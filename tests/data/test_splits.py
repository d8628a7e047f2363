"""Tests of vi_seg_jax.data.splits: the seeded test/validation/train protocol."""

import json

import jax
import numpy as np
import pytest

from vi_seg_jax.data.splits import Splits, make_splits

CASES = [f"BraTS20_Training_{i:03d}" for i in range(1, 70)]


def test_sizes_disjointness_and_no_duplicates():
    splits = make_splits(CASES, 0, test_size=30, validation_size=5, repeats=3)
    assert len(splits.test) == 30 and len(set(splits.test)) == 30
    assert len(splits.validation) == 5 and len(set(splits.validation)) == 5
    assert not set(splits.test) & set(splits.validation)
    assert splits.train_sizes == (5, 10, 15, 20) and splits.repeats == 3
    assert set(splits.train) == {(n, r) for n in (5, 10, 15, 20) for r in range(3)}
    held_out = set(splits.test) | set(splits.validation)
    for (size, _), ids in splits.train.items():
        assert len(ids) == size == len(set(ids))
        assert not set(ids) & held_out
        assert set(ids) <= set(CASES)
        assert list(ids) == sorted(ids)
    assert list(splits.test) == sorted(splits.test)


def test_subsets_are_nested_within_a_repeat():
    splits = make_splits(CASES, 1, test_size=30)
    for repeat in range(3):
        for small, large in [(5, 10), (10, 15), (15, 20)]:
            assert set(splits.train[(small, repeat)]) <= set(splits.train[(large, repeat)])


def test_deterministic_and_seed_dependent():
    a = make_splits(CASES, 3, validation_size=4)
    assert a == make_splits(CASES, 3, validation_size=4)
    assert a == make_splits(CASES, jax.random.key(3), validation_size=4)
    b = make_splits(CASES, 4, validation_size=4)
    assert a.test != b.test


def test_independent_of_input_order():
    shuffled = list(np.random.default_rng(0).permutation(CASES))
    assert make_splits(CASES, 5) == make_splits(shuffled, 5)
    assert make_splits(CASES, 5) == make_splits(reversed(CASES), 5)


def test_repeats_differ():
    splits = make_splits(CASES, 6, repeats=4)
    for size in (5, 10, 15, 20):
        draws = {splits.train[(size, r)] for r in range(4)}
        assert len(draws) == 4


def test_test_set_does_not_depend_on_train_settings():
    a = make_splits(CASES, 7, train_sizes=(5,), repeats=1)
    b = make_splits(CASES, 7, train_sizes=(5, 10, 15, 20), repeats=5, validation_size=3)
    assert a.test == b.test


def test_json_round_trip():
    splits = make_splits(CASES, 8, validation_size=2)
    restored = Splits.from_dict(json.loads(json.dumps(splits.to_dict())))
    assert restored == splits
    with pytest.raises(ValueError, match="malformed"):
        Splits.from_dict({"test": []})
    data = splits.to_dict()
    data["train"][0]["cases"][0] = splits.test[0]
    with pytest.raises(ValueError, match="overlaps"):
        Splits.from_dict(data)


def test_too_few_cases_and_bad_inputs_raise():
    with pytest.raises(ValueError, match="too few"):
        make_splits(CASES[:49], 0, test_size=30)  # 30 + 20 needed
    make_splits(CASES[:50], 0, test_size=30)
    with pytest.raises(ValueError, match="too few"):
        make_splits(CASES[:52], 0, test_size=30, validation_size=3)
    with pytest.raises(ValueError, match="duplicate"):
        make_splits([*CASES, CASES[0]], 0)
    with pytest.raises(TypeError, match="strings"):
        make_splits(list(range(60)), 0)
    with pytest.raises(ValueError, match="repeats"):
        make_splits(CASES, 0, repeats=0)
    with pytest.raises(ValueError, match="train_sizes"):
        make_splits(CASES, 0, train_sizes=(5, 5))
    with pytest.raises(TypeError, match="seed"):
        make_splits(CASES, 1.5)
