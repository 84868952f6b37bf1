"""A layout is one object: a third one, defined here, works through the writer, the reader and verify unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from quackae import EncodingStore
from quackae.core.atomic import write_atomic
from quackae.core.errors import QuackError
from quackae.stages.configs import VerifyConfig
from quackae.stages.verify import check_store, verify
from quackae.store.job import stored_ids
from quackae.store.layout import LAYOUTS, CorruptUnit, Layout, Unit, known, register
from quackae.store.manifest import provenance_of, read_manifest
from quackae.store.sound import first_copies, stored_ids_checked
from quackae.store.writer import AutoencoderWriter


class JsonLayout(Layout):
    """One JSON file per batch under ``STORE/json/``: the rows' metadata, encodings and the store's provenance."""

    name = "json"
    unit_word = "json files"
    folder = "json"
    suffix = ".json"

    def units(self, store: Path) -> list[Path]:
        folder = store / self.folder
        return sorted(folder.glob("*.json")) if folder.is_dir() else []

    def read(self, path: Path) -> Unit:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            raise CorruptUnit(path, "it is not JSON", "json unit") from None
        ids = np.asarray([row["id"] for row in data["rows"]], dtype=np.int64)
        matrix = np.asarray(data["encodings"], dtype=np.float32).reshape(len(ids), -1)
        return Unit(Path(path), ids, matrix, data["provenance"], data["rows"])

    def row(self, unit: Unit, row: int) -> dict:
        return dict(unit.metadata[row])

    def prepare(self, store: Path) -> None:
        (store / self.folder).mkdir(exist_ok=True)

    def commit(self, store, staging, name, ids, matrix, columns, header) -> int:
        rows = columns.to_pylist()
        payload = {"rows": rows, "encodings": matrix.tolist(), "provenance": provenance_of(header or {}) or None}
        target = store / self.folder / f"{int(ids.min()):08d}.json"
        write_atomic(target, json.dumps(payload).encode(), staging, durable=True)
        return len(ids)

    def table(self, units: list[Unit]):
        import pyarrow as pa

        rows = [row for unit in units for row in unit.metadata]
        matrix = np.concatenate([unit.matrix for unit in units])  # (N, H)
        encoding = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])
        columns = {"id": pa.array([row["id"] for row in rows], pa.int64()), "encoding": encoding}
        columns.update({k: pa.array([row.get(k) for row in rows]) for k in rows[0] if k != "id"})
        return pa.table(columns)


HEADER = {
    "checkpoint_sha256": "a" * 64,
    "tokenizer_sha256": "b" * 64,
    "dataset_fingerprint": "fingerprint",
    "layout": "json",
    "encoding_size": 4,
    "text": False,
    "selection": {},
}


@pytest.fixture
def json_layout():
    layout = register(JsonLayout())
    yield layout
    del LAYOUTS[layout.name]


def _write(store: Path, ids: list[int], matrix: np.ndarray) -> AutoencoderWriter:
    writer = AutoencoderWriter(storage_path=store, layout="json", manifest=HEADER, text=False)
    writer.write_batch([{"id": i, "label": f"l{i % 3}"} for i in ids], matrix)
    writer.flush()
    writer.write_manifest()
    return writer


def test_a_layout_defined_outside_quackae_works_through_writer_reader_and_verify(tmp_path, json_layout):
    assert known()[:2] == ("shards", "files") and "json" in known()
    store = tmp_path / "store"
    matrix = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)  # (6, H)
    ids = [5, 1, 9, 3, 7, 2]
    assert _write(store, ids, matrix).written == 6
    assert [p.name for p in json_layout.units(store)] == ["00000001.json"]
    manifest = read_manifest(store)
    assert manifest["complete"] and manifest["items"] == 6 and manifest["layout"] == "json"

    opened = EncodingStore(store)
    assert opened.layout == "json" and opened.ids() == sorted(ids)
    encoding, metadata = opened[9]
    assert np.array_equal(encoding, matrix[2]) and metadata == {"id": 9, "label": "l0"}
    got_ids, got = opened.to_numpy()
    assert got_ids.tolist() == sorted(ids) and np.array_equal(got, matrix[np.argsort(ids)])
    table = opened.to_arrow()
    assert table.column("id").to_pylist() == sorted(ids) and table.column("label").to_pylist()[0] == "l1"
    opened.check_usable()
    result = verify(VerifyConfig(store=str(store)))
    assert result["problems"] == 0 and result.lines() == [f"{store}: ok, 6 items in 1 json files"]

    # a second batch: the ids stored already are skipped, the new one is one more unit
    again = _write(store, [1, 4], np.full((2, 4), 7.0, dtype=np.float32))
    assert again.written == 1 and again.skipped == 1
    assert stored_ids(store) == sorted([*ids, 4]) and np.array_equal(EncodingStore(store)[1][0], matrix[1])

    # a damaged unit: verify names it, check_usable refuses the store, a job's start sets it aside
    (store / "json" / "00000004.json").write_text("{not json")
    _, problems = check_store(store)
    assert any("00000004.json: does not parse (it is not JSON)" in line for line in problems), problems
    with pytest.raises(QuackError, match="00000004.json"):
        EncodingStore(store, warn=False).check_usable()
    kept = stored_ids_checked(store, json_layout, 4, HEADER, move=True)
    assert kept.tolist() == sorted(ids) and [p.name for p in json_layout.units(store)] == ["00000001.json"]
    assert len(list((store / ".quarantine").iterdir())) == 1


def test_a_unit_of_another_provenance_is_refused_by_every_reader_of_the_layout(tmp_path, json_layout):
    store = tmp_path / "store"
    _write(store, [1, 2], np.ones((2, 4), dtype=np.float32))
    path = store / "json" / "00000001.json"
    data = json.loads(path.read_text())
    data["provenance"]["checkpoint_sha256"] = "c" * 64
    path.write_text(json.dumps(data))
    _, problems = check_store(store)
    assert problems == [f"{path}: provenance differs from the manifest (checkpoint_sha256)"]
    with pytest.raises(QuackError, match="provenance differs from the manifest"):
        EncodingStore(store, warn=False).check_usable()
    assert stored_ids_checked(store, json_layout, 4, HEADER, move=False).tolist() == []


def test_first_copies_keeps_the_first_copy_in_unit_order_against_a_plain_loop():
    rng = np.random.default_rng(0)
    id_lists = [rng.integers(0, 40, size=rng.integers(0, 12)).astype(np.int64) for _ in range(8)]
    ids, unit, row, later = first_copies(id_lists)
    first: dict[int, tuple[int, int]] = {}
    repeats = []
    for u, unit_ids in enumerate(id_lists):
        for r, index in enumerate(unit_ids.tolist()):
            if index in first:
                repeats.append(u)
            else:
                first[index] = (u, r)
    assert ids.tolist() == sorted(first)
    assert list(zip(unit.tolist(), row.tolist(), strict=True)) == [first[i] for i in sorted(first)]
    assert sorted(later.tolist()) == sorted(repeats)


def test_the_writer_keeps_its_selection_for_callers_that_give_every_row(tmp_path):
    # encode predicts only the rows its selection keeps; a caller driving the writer itself may give every row,
    # and filtered=True still keeps only labelled items (the writer's documented meaning)
    selection = {"filtered": True, "label_field": "label", "unlabeled_value": "none"}
    writer = AutoencoderWriter(storage_path=tmp_path, manifest={**HEADER, "layout": "shards"}, **selection)
    writer.write_batch([{"id": i, "label": "none" if i % 2 else "yes"} for i in range(6)], np.ones((6, 4), np.float32))
    writer.flush()
    manifest = writer.write_manifest()
    assert writer.written == 3 and stored_ids(tmp_path) == [0, 2, 4] and writer.filtered_out == 3
    assert manifest["selection"] == HEADER["selection"]  # the header's own selection is the one recorded
