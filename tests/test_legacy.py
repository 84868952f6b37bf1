"""Stores and checkpoints written by earlier quackae versions still load, verify and read the same.

``tests/legacy/store-4bacc39`` and ``tests/legacy/store-ee38aa6`` were written by those commits' ``quackae``
(``tests/legacy/make.sh``: prepare ``corpus.jsonl``, train 4 steps, encode into both layouts).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from quackae import EncodingStore, QuackAutoEncoder, QuackEncoder, load_model

LEGACY = Path(__file__).resolve().parent / "legacy"
VERSIONS = ["store-4bacc39", "store-ee38aa6"]


def _texts() -> dict[int, str]:
    rows = [json.loads(line) for line in (LEGACY / "corpus.jsonl").read_text().splitlines()]
    return {row["id"]: row["text"] for row in rows}


@pytest.mark.parametrize("version", VERSIONS)
def test_an_old_checkpoint_loads_and_encodes_as_its_store_recorded(version):
    root = LEGACY / version
    model = load_model(root / "run" / "checkpoints" / "best.ckpt")
    assert isinstance(model, QuackAutoEncoder)
    encoder = QuackEncoder.from_run(root / "run", device="cpu")
    store = EncodingStore(root / "store-shards")
    ids, stored = store.to_numpy()
    texts = _texts()
    again = encoder.encode([texts[int(i)] for i in ids])
    np.testing.assert_allclose(again, stored, rtol=1e-4, atol=1e-5)


# (version, layout) pairs that carry the provenance the store checks: 4bacc39 wrote .npz items without it
SOUND = [(v, layout) for v in VERSIONS for layout in ("store-shards", "store-files")]
SOUND.remove(("store-4bacc39", "store-files"))


@pytest.mark.parametrize("version", VERSIONS)
def test_old_stores_of_both_layouts_hold_the_same_rows(version):
    root = LEGACY / version
    shards, files = EncodingStore(root / "store-shards"), EncodingStore(root / "store-files")
    assert len(shards) == len(files) == 40
    ids_s, matrix_s = shards.to_numpy()
    ids_f, matrix_f = files.to_numpy()
    order_s, order_f = np.argsort(ids_s), np.argsort(ids_f)
    assert np.array_equal(ids_s[order_s], ids_f[order_f])
    assert np.array_equal(matrix_s[order_s], matrix_f[order_f])
    assert shards[int(ids_s[0])][1]["label"] in ("a", "b")


@pytest.mark.parametrize(("version", "layout"), SOUND)
def test_verify_finds_nothing_wrong_with_an_old_store_and_readers_take_it(version, layout, tmp_path):
    from quackae.stages.verify import check_store

    store = tmp_path / layout
    shutil.copytree(LEGACY / version / layout, store)
    counts, problems = check_store(store)
    assert problems == [] and counts["items"] == 40, (counts, problems)
    EncodingStore(store).check_usable()


def test_old_items_without_provenance_are_named_by_verify_and_refused_by_readers(tmp_path):
    """4bacc39's ``.npz`` items carry no provenance: refused in one line, as by ee38aa6 before this layout."""
    from quackae.core.errors import QuackError
    from quackae.stages.verify import check_store

    store = tmp_path / "store-files"
    shutil.copytree(LEGACY / "store-4bacc39" / "store-files", store)
    _, problems = check_store(store)
    assert len(problems) == 40 and all("carries no provenance" in line for line in problems)
    with pytest.raises(QuackError, match="carries no provenance"):
        EncodingStore(store).check_usable()


def test_the_old_import_paths_of_the_public_names_still_work():
    import quackae
    from quackae.data import TokenizedDataModule
    from quackae.model import QuackAutoEncoder as Model
    from quackae.store import EncodingStore as Store

    assert Model is quackae.QuackAutoEncoder and Store is quackae.EncodingStore
    assert TokenizedDataModule is quackae.TokenizedDataModule
    for name in ("prepare", "train", "encode", "verify", "export", "classify", "plot", "reconstruct", "run_pipeline"):
        assert callable(getattr(quackae, name)), name
    assert quackae.TrainConfig is quackae.stages.configs.TrainConfig  # the face gives each command's config
