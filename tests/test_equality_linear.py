"""The issue-22 speed and memory changes give what the plain definitions give (linear cost
with the slice count must not change a label, a mask or a statistic)."""

from __future__ import annotations

import numpy as np
import pytest

from ctjoint.gateway.preprocess import context_stack, context_view


@pytest.mark.parametrize(("slices", "context"), [(1, 1), (2, 1), (7, 1), (7, 2), (5, 0)])
def test_the_context_view_equals_the_copied_context_stack(slices: int, context: int) -> None:
    planes = np.random.default_rng(slices).standard_normal((slices, 4, 5)).astype(np.float32)
    padded = np.concatenate([planes[:1]] * context + [planes] + [planes[-1:]] * context)
    view = context_view(padded, context)
    expected = context_stack(planes, context)
    assert view.shape == expected.shape == (slices, 2 * context + 1, 4, 5)
    np.testing.assert_array_equal(view, expected)
    # What streaming takes from it: the stacks it still needs, each a copy.
    rows = [slices - 1, 0]
    np.testing.assert_array_equal(np.ascontiguousarray(view[rows]), expected[rows])
    assert not np.shares_memory(np.ascontiguousarray(view[rows]), padded)
