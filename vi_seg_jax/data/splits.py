"""Seeded case splits for the paper's small-data protocol (method.md §1).

A fixed test set (30 patients in the paper), an optional fixed validation set, and for
each repeat `r` a training subset of each size in `train_sizes` (5/10/15/20 in the paper),
drawn without replacement from the remaining cases. Within one repeat the subsets are
nested (the size-5 set is the first 5 of a random order of the pool, the size-10 set its
first 10, ...), so a larger training set only adds cases; this pairs the train-size
comparison within a repeat. Different repeats use independent orders (our choice; the
paper does not say).

The draw depends only on the seed and the *set* of case ids (they are sorted first), not
on the order they are listed in. The result is a `Splits` record whose `to_dict` output
is meant to be written next to the experiment, so the exact cases stay on record even if
a library's random stream changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

# fold_in tags of the three independent draws.
_TEST, _VALIDATION, _TRAIN = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Splits:
    """Case ids of each split; all tuples are sorted.

    Attributes:
      test: the fixed test cases.
      validation: the fixed validation cases (empty when none).
      train: `(size, repeat)` -> training cases; disjoint from test and validation.
    """

    test: tuple[str, ...]
    validation: tuple[str, ...]
    train: dict[tuple[int, int], tuple[str, ...]]

    def __post_init__(self):
        held_out = set(self.test) | set(self.validation)
        for name, ids in [("test", self.test), ("validation", self.validation)]:
            _check_unique(ids, name)
        if set(self.test) & set(self.validation):
            raise ValueError("test and validation cases overlap")
        for (size, repeat), ids in self.train.items():
            _check_unique(ids, f"train[{size}, {repeat}]")
            if len(ids) != size:
                raise ValueError(f"train[{size}, {repeat}] holds {len(ids)} cases, not {size}")
            if held_out & set(ids):
                raise ValueError(f"train[{size}, {repeat}] overlaps the test or validation set")

    @property
    def train_sizes(self) -> tuple[int, ...]:
        return tuple(sorted({size for size, _ in self.train}))

    @property
    def repeats(self) -> int:
        return len({repeat for _, repeat in self.train})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {
            "test": list(self.test),
            "validation": list(self.validation),
            "train": [
                {"size": size, "repeat": repeat, "cases": list(ids)}
                for (size, repeat), ids in sorted(self.train.items())
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Splits:
        """Inverse of `to_dict`; raises ValueError on a malformed or inconsistent dict."""
        try:
            train = {
                (int(entry["size"]), int(entry["repeat"])): tuple(entry["cases"])
                for entry in data["train"]
            }
            return cls(tuple(data["test"]), tuple(data.get("validation", ())), train)
        except (KeyError, TypeError) as error:
            raise ValueError(f"malformed splits dict: {error!r}") from error


def make_splits(
    case_ids: Iterable[str],
    seed: int | jax.Array,
    *,
    test_size: int = 30,
    validation_size: int = 0,
    train_sizes: Sequence[int] = (5, 10, 15, 20),
    repeats: int = 3,
) -> Splits:
    """Draws the test, validation and training splits.

    Args:
      case_ids: unique case id strings, in any order.
      seed: an int or a typed JAX key (`jax.random.key(seed)`); an int `s` gives the same
        splits as `jax.random.key(s)`.
      test_size: cases in the fixed test set (30 in the paper).
      validation_size: cases in the fixed validation set (0 for none).
      train_sizes: training-set sizes, each drawn from the cases left over.
      repeats: independent draws of the training sets (the protocol uses R >= 3 and
        reports mean ± std over them).

    Returns:
      A `Splits` with `train[(size, r)]` for every size and `r in range(repeats)`.

    Raises:
      ValueError: duplicate ids, bad sizes, or fewer cases than
        `test_size + validation_size + max(train_sizes)`.
      TypeError: a case id is not a string.
    """
    ids = _sorted_ids(case_ids)
    sizes = _check_sizes(test_size, validation_size, train_sizes, repeats)
    needed = test_size + validation_size + max(sizes)
    if len(ids) < needed:
        raise ValueError(
            f"{len(ids)} cases are too few: test ({test_size}) + validation "
            f"({validation_size}) + the largest training set ({max(sizes)}) need {needed}"
        )
    key = _as_key(seed)
    test_order = _permutation(jax.random.fold_in(key, _TEST), len(ids))
    test = ids[test_order[:test_size]]
    rest = ids[np.sort(test_order[test_size:])]
    val_order = _permutation(jax.random.fold_in(key, _VALIDATION), len(rest))
    validation = rest[val_order[:validation_size]]
    pool = rest[np.sort(val_order[validation_size:])]
    train_key = jax.random.fold_in(key, _TRAIN)
    train = {}
    for repeat in range(repeats):
        order = pool[_permutation(jax.random.fold_in(train_key, repeat), len(pool))]
        for size in sizes:
            train[(size, repeat)] = _as_sorted_tuple(order[:size])
    return Splits(_as_sorted_tuple(test), _as_sorted_tuple(validation), train)


def _permutation(key: jax.Array, n: int) -> np.ndarray:
    """A random order of `range(n)` from the key's data (numpy PCG64)."""
    data = np.asarray(jax.random.key_data(key)).astype(np.uint64).ravel()
    return np.random.default_rng(data).permutation(n)


def _as_key(seed: int | jax.Array) -> jax.Array:
    if isinstance(seed, int | np.integer) and not isinstance(seed, bool):
        return jax.random.key(int(seed))
    if isinstance(seed, jax.Array) and jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
        if seed.shape != ():
            raise TypeError(f"expected one scalar key, got a key array of shape {seed.shape}")
        return seed
    raise TypeError(f"seed must be an int or a typed jax.random.key, got {type(seed).__name__}")


def _sorted_ids(case_ids: Iterable[str]) -> np.ndarray:
    ids = list(case_ids)
    bad = [c for c in ids if not isinstance(c, str)]
    if bad:
        raise TypeError(f"case ids must be strings, got {bad[:3]!r}")
    _check_unique(ids, "case_ids")
    return np.array(sorted(ids), dtype=object)


def _check_sizes(
    test_size: int, validation_size: int, train_sizes: Sequence[int], repeats: int
) -> tuple[int, ...]:
    sizes = tuple(train_sizes)
    if not sizes or any(not _is_int(s) or s < 1 for s in sizes):
        raise ValueError(f"train_sizes must be positive ints, got {train_sizes!r}")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"train_sizes has duplicates: {train_sizes!r}")
    if not _is_int(test_size) or test_size < 0:
        raise ValueError(f"test_size must be a non-negative int, got {test_size!r}")
    if not _is_int(validation_size) or validation_size < 0:
        raise ValueError(f"validation_size must be a non-negative int, got {validation_size!r}")
    if not _is_int(repeats) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    return tuple(int(s) for s in sizes)


def _check_unique(ids: Sequence[str], name: str) -> None:
    if len(set(ids)) != len(ids):
        duplicates = sorted({c for c in ids if list(ids).count(c) > 1})
        raise ValueError(f"{name} has duplicate case ids {duplicates[:5]}")


def _as_sorted_tuple(ids: np.ndarray) -> tuple[str, ...]:
    return tuple(sorted(str(c) for c in ids))


def _is_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)
