"""The validation split by size (lmforge/data/split_mix.py `plan_val_split`, `split_text`):
whole documents within one document of the target, else the tail of one document."""

from __future__ import annotations

import numpy as np
import pytest

from lmforge.data.split_mix import plan_val_split, split_text


def _val_bytes(sizes: np.ndarray, plan) -> int:
    return int(sizes[plan.val].sum()) + plan.cut_bytes


def test_many_documents_go_whole_within_one_document_of_the_target():
    sizes = np.random.default_rng(0).integers(50, 5000, size=1000)
    plan = plan_val_split(sizes, 0.05, seed=1, name="web")
    target = 0.05 * sizes.sum()
    got = int(sizes[plan.val].sum())
    assert plan.cut == -1 and plan.cut_bytes == 0  # nothing cut
    assert got <= target and target - got < sizes[~plan.val].min()  # within one document
    again = plan_val_split(sizes, 0.05, seed=1, name="web")
    assert (again.val == plan.val).all()  # seeded: the same split every time
    assert (plan_val_split(sizes, 0.05, seed=2, name="web").val != plan.val).any()
    assert (plan_val_split(sizes, 0.05, seed=1, name="books").val != plan.val).any()


def test_a_single_document_is_cut_by_position():
    plan = plan_val_split(np.array([100_000]), 0.05, seed=1, name="book")
    assert not plan.val.any() and plan.cut == 0 and plan.cut_bytes == 5000


def test_only_documents_larger_than_the_budget_cut_the_largest():
    sizes = np.array([20_000, 30_000, 25_000, 25_000])
    plan = plan_val_split(sizes, 0.1, seed=3, name="books")
    assert not plan.val.any() and plan.cut == 1 and plan.cut_bytes == 10_000


@pytest.mark.parametrize(
    ("fraction", "small_whole", "cut"),
    [
        (0.03, "some", False),  # small documents reach 3% within one of them: huge stays whole
        (0.10, "all", True),  # all small ones give ~5%: the other ~5% is the huge one's tail
    ],
)
def test_one_huge_document_and_many_small_ones(fraction, small_whole, cut):
    """Documented behaviour: whole small documents fill the budget first and the huge one,
    larger than the budget, is skipped; only when they fall short of the target by more than
    a point is the remainder cut from the end of the huge document (its head stays in train).
    Either way the held-out bytes come within a point of the fraction."""
    sizes = np.array([95_000] + [100] * 50)  # the huge document, then 5% of the bytes in small
    plan = plan_val_split(sizes, fraction, seed=1, name="mix")
    assert not plan.val[0]
    assert plan.val[1:].all() == (small_whole == "all") and plan.val[1:].any()
    assert (plan.cut == 0) == cut
    assert abs(_val_bytes(sizes, plan) / sizes.sum() - fraction) < 0.01


def test_a_tiny_fraction_still_gives_some_validation_and_zero_gives_none():
    sizes = np.full(10, 1000)
    plan = plan_val_split(sizes, 0.001, seed=1, name="a")  # 10 bytes: less than any document
    assert not plan.val.any() and plan.cut >= 0 and plan.cut_bytes == 10
    for fraction in (0.0, 0.2):
        none = plan_val_split(np.array([]), fraction, seed=1, name="a")
        assert len(none.val) == 0 and none.cut == -1
    zero = plan_val_split(sizes, 0.0, seed=1, name="a")
    assert not zero.val.any() and zero.cut == -1


def test_split_text_cuts_at_a_nearby_line_break_else_a_character_boundary():
    text = "".join(f"line {i:03d} of the play\n" for i in range(200))  # 22 bytes a line
    head, tail = split_text(text, 1000)
    assert head + tail == text and head.endswith("\n") and tail.startswith("line ")
    assert abs(len(tail.encode()) - 1000) <= 11  # the nearest line break
    prose = "é" * 3000  # no line break, two bytes a character
    head, tail = split_text(prose, 1001)
    assert head + tail == prose and len(tail.encode()) == 1002  # back to a character start
    far = "x" * 5000 + "\n" + "y" * 5000  # the only break is 4000 bytes from the cut point
    head, tail = split_text(far, 1000)
    assert tail == "y" * 1000
    head, tail = split_text("ab", 5)
    assert (head, tail) == ("a", "b")  # both parts non-empty
