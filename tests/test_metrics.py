import numpy as np
import pytest

from vi_seg_jax.metrics import dice, iou


def test_dice_and_iou_match_set_formulas_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.random((6, 7, 5)) > rng.random()
        b = rng.random((6, 7, 5)) > rng.random()
        pa, pb = set(zip(*np.nonzero(a), strict=True)), set(zip(*np.nonzero(b), strict=True))
        if not pa and not pb:
            continue
        assert dice(a, b) == pytest.approx(2 * len(pa & pb) / (len(pa) + len(pb)))
        assert iou(a, b) == pytest.approx(len(pa & pb) / len(pa | pb))
        d = dice(a, b)
        assert iou(a, b) == pytest.approx(d / (2 - d))


def test_empty_conventions():
    empty = np.zeros((3, 3), bool)
    full = np.ones((3, 3), bool)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert dice(empty, full) == 0.0 and iou(empty, full) == 0.0
    with pytest.raises(ValueError, match="differs from truth"):
        dice(empty, np.zeros((2, 3), bool))
