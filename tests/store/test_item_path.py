from __future__ import annotations

import numpy as np
import pytest

from quackae.store.items import item_path


@pytest.mark.parametrize(
    ("index", "kwargs", "expected"),
    [
        (0, {}, "0/0/0.png"),
        (999, {"suffix": "npz"}, "0/0/999.npz"),
        (1000, {"suffix": "npz"}, "0/1/1000.npz"),
        (123456, {"suffix": "npz"}, "1/23/123456.npz"),
        (123456, {"dir_only": True}, "1/23"),
        (123456, {"is_collection": True}, "1/23/123456/123456.png"),
        (123456, {"is_collection": True, "dir_only": True}, "1/23/123456"),
        (np.int64(100001), {"suffix": "npz"}, "1/0/100001.npz"),
    ],
)
def test_item_path(index, kwargs, expected):
    assert item_path(index, **kwargs) == expected


@pytest.mark.parametrize(
    ("index", "path"),
    [
        (0, "0/0/0.npz"),
        (999, "0/0/999.npz"),
        (1000, "0/1/1000.npz"),
        (99_999, "0/99/99999.npz"),
        (100_000, "1/0/100000.npz"),
        (123_456, "1/23/123456.npz"),
        (9_999_999, "99/99/9999999.npz"),
        (2**40, "10995116/27/1099511627776.npz"),
    ],
)
def test_item_path_gives_the_known_paths(index, path):
    assert item_path(index, "npz") == path


@pytest.mark.parametrize("index", [-1, 1.5, "3", True])
def test_item_path_rejects_bad_index(index):
    with pytest.raises(ValueError, match="non-negative integer"):
        item_path(index)
