"""Batch manifests (cnpose_trt.batch.manifest): JSON Lines, CSV, Parquet and COCO detections parse to the
same entries, and every record that cannot be used is refused naming its file, line (or row) and field."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from test_batch import _scene_records, _write_jsonl

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from cnpose_trt import batch  # noqa: E402
from cnpose_trt.io.draw import demo_image, save_image  # noqa: E402


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("manifest_scenes")
    records = _scene_records(folder)
    return folder, records, _write_jsonl(folder / "manifest.jsonl", records)



def _write_all_formats(folder: Path, records: list[dict]) -> dict[str, Path]:
    paths = {"jsonl": _write_jsonl(folder / "m.jsonl", records)}
    with open(folder / "m.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(batch.FIELDS))
        w.writeheader()
        for r in records:
            w.writerow({k: (v if isinstance(v, str) else json.dumps(v)) for k, v in r.items()})
    paths["csv"] = folder / "m.csv"
    # Parquet: nested lists where they are regular, JSON strings in a column where they are not
    table = pa.table({
        "image": [r["image"] for r in records],
        "boxes": [r.get("boxes") for r in records],
        "crop_boxes": [r.get("crop_boxes") for r in records],
        "root_depth": [None if "root_depth" not in r else json.dumps(r["root_depth"]) for r in records],
        "intrinsics": [r.get("intrinsics") for r in records]})
    pq.write_table(table, folder / "m.parquet")
    paths["parquet"] = folder / "m.parquet"
    return paths


def _entries_equal(a: batch.Entry, b: batch.Entry) -> None:
    assert (a.key, a.path) == (b.key, b.path)
    for name in ("boxes", "crop_boxes", "root_depth", "intrinsics"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_array_equal(x, y)


def test_manifest_formats_parse_the_same(scenes, tmp_path):
    folder, records, _ = scenes
    paths = _write_all_formats(folder, records)
    parsed = {fmt: list(batch.read_manifest(p)) for fmt, p in paths.items()}
    assert len(parsed["jsonl"]) == len(records)
    for rec, entry in zip(records, parsed["jsonl"], strict=True):
        key = "crop_boxes" if "crop_boxes" in rec else "boxes"
        np.testing.assert_array_equal(getattr(entry, key), np.asarray(rec[key], np.float64).reshape(-1, 4))
        assert entry.path == str(folder / rec["image"])
    for fmt in ("csv", "parquet"):
        for a, b in zip(parsed["jsonl"], parsed[fmt], strict=True):
            _entries_equal(a, b)
    # an entry survives the trip to a Ray worker exactly (NaN included)
    for e in parsed["jsonl"] + [batch.Entry("a", "b", "c", crop_boxes=np.asarray([[np.nan, 1e-300, 3.3, 1 / 3]]))]:
        _entries_equal(e, batch.Entry.from_json(e.to_json()))
    # relative paths against --image-root instead of the manifest's folder
    other = next(batch.read_manifest(paths["jsonl"], image_root=tmp_path))
    assert other.path == str(tmp_path / records[0]["image"])


def test_coco_detections(tmp_path):
    base, _ = demo_image()
    for name in ("000000000139.jpg", "000000000285.jpg", "7.png", "notes.txt"):
        if name.endswith(".txt"):
            (tmp_path / name).write_text("not an image")
        else:
            save_image(tmp_path / name, base)
    dets = [
        {"image_id": 139, "category_id": 1, "bbox": [10, 20, 100, 200], "score": 0.9},
        {"image_id": 139, "category_id": 1, "bbox": [200, 20, 100, 200], "score": 0.3},   # under the threshold
        {"image_id": 139, "category_id": 18, "bbox": [300, 20, 100, 200], "score": 0.99},  # a dog
        {"image_id": 139, "category_id": 1, "bbox": [50, 60, 70, 80], "score": 0.5},      # at the threshold: kept
        {"image_id": 7, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.8},
    ]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    entries = {e.key: e for e in batch.read_manifest(tmp_path / "dets.json")}
    assert sorted(entries) == ["000000000139.jpg", "000000000285.jpg", "7.png"]  # 285: no detections, no people
    np.testing.assert_array_equal(entries["000000000139.jpg"].boxes, [[10, 20, 100, 200], [50, 60, 70, 80]])
    assert entries["000000000285.jpg"].boxes.shape == (0, 4) and entries["7.png"].people == 1
    lower = {e.key: e.people for e in batch.read_manifest(tmp_path / "dets.json", score_threshold=0.2)}
    assert lower["000000000139.jpg"] == 3
    dogs = {e.key: e.people for e in batch.read_manifest(tmp_path / "dets.json", category_id=18)}
    assert dogs == {"000000000139.jpg": 1, "000000000285.jpg": 0, "7.png": 0}
    # the dict form: images and categories from the file ('person' is category 3 here)
    doc = {"images": [{"id": 1, "file_name": "7.png"}, {"id": 2, "file_name": "000000000285.jpg"}],
           "categories": [{"id": 1, "name": "bicycle"}, {"id": 3, "name": "person"}],
           "annotations": [{"image_id": 1, "category_id": 3, "bbox": [5, 5, 50, 60], "score": 0.7},
                           {"image_id": 1, "category_id": 1, "bbox": [5, 5, 50, 60], "score": 0.9}]}
    (tmp_path / "coco.json").write_text(json.dumps(doc))
    got = {e.key: e for e in batch.read_manifest(tmp_path / "coco.json")}
    assert sorted(got) == ["000000000285.jpg", "7.png"] and got["7.png"].people == 1
    np.testing.assert_array_equal(got["7.png"].boxes, [[5, 5, 50, 60]])
    dets.append({"image_id": 999, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.8})
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    with pytest.raises(batch.ManifestError, match=r"detection 5, field 'image_id': 999 matches no image"):
        list(batch.read_manifest(tmp_path / "dets.json"))


BAD_JSONL = [
    ('{"image": "a.png", "boxes": [[1, 2, 3, 4]]}\n{"image": "b.png", "boxes": [[1, 2, 3]]}',
     r"m\.jsonl, line 2, field 'boxes': entry 0 must be 4 numbers"),
    ('{"image": "a.png", "boxes": [[1, 2, 3, 4]]}\n\n{"image": "b.png" "boxes": []}', r"line 3: not valid JSON"),
    ('{"boxes": [[1, 2, 3, 4]]}', r"line 1, field 'image': must be an image path"),
    ('{"image": "", "boxes": []}', r"field 'image': must be an image path"),
    ('{"image": "a.png"}', r"field 'boxes': give exactly one of 'boxes'"),
    ('{"image": "a.png", "boxes": [], "crop_boxes": []}', r"give exactly one"),
    ('{"image": "a.png", "box": [1, 2, 3, 4]}', r"field 'box': unknown field; a record has image, boxes"),
    ('{"image": "a.png", "boxes": "[[1, 2, 3, 4]]"}', r"field 'boxes': must be a list .* got str"),
    ('{"image": "a.png", "boxes": [[1, 2, true, 4]]}', r"field 'boxes': entry 0 must be 4 numbers"),
    ('{"image": "a.png", "boxes": [[1, 2, 3, 4]], "root_depth": [1, 2]}',
     r"field 'root_depth': needs one number for all people or one per person \(1\), got 2"),
    ('{"image": "a.png", "boxes": [[1, 2, 3, 4]], "root_depth": "far"}', r"field 'root_depth': must be a number"),
    ('{"image": "a.png", "boxes": [[1, 2, 3, 4]], "intrinsics": [1, 1, 1, 1]}',
     r"field 'intrinsics': needs root_depth"),
    ('{"image": "a.png", "boxes": [[1, 2, 3, 4]], "root_depth": 4000, "intrinsics": [[1, 1, 1, 1], [1, 1, 1, 1]]}',
     r"field 'intrinsics': needs one \[fx, fy, cx, cy\] for all people or one per person \(1\), got 2"),
    ('[1, 2]', r"line 1: each line must be a JSON object, got list"),
    ('{"image": "a.png", "boxes": [[1, 2, 3, %s]]}' % ("9" * 400),
     r"line 1, field 'boxes': holds an integer too large for a float64 number"),
    ('{"image": "a.png", "boxes": [[1, 2, 3, 4]], "root_depth": %s}' % ("9" * 400),
     r"line 1, field 'root_depth': holds an integer too large"),
    ('{"image": "a.png", "boxes": ' + "[" * 100_000, r"line 1: not valid JSON here: nested too deeply"),
]


@pytest.mark.parametrize("text, message", BAD_JSONL)
def test_bad_jsonl_records_name_file_line_and_field(tmp_path, text, message):
    (tmp_path / "m.jsonl").write_text(text + "\n")
    with pytest.raises(batch.ManifestError, match=message):
        list(batch.read_manifest(tmp_path / "m.jsonl"))


def test_bad_csv_and_parquet_records(tmp_path):
    (tmp_path / "m.csv").write_text('image,boxes\na.png,"[[1,2,3,4]]"\nb.png,"[[1,2,3,4]"\n')
    with pytest.raises(batch.ManifestError, match=r"m\.csv, line 3, field 'boxes': is not valid JSON"):
        list(batch.read_manifest(tmp_path / "m.csv"))
    (tmp_path / "n.csv").write_text("path,boxes\na.png,[]\n")
    with pytest.raises(batch.ManifestError, match=r"n\.csv, line 1: the header must name an 'image' column"):
        list(batch.read_manifest(tmp_path / "n.csv"))
    (tmp_path / "o.csv").write_text('image,boxes\na.png,[[1,2,3,4]]\n')  # an unquoted JSON list: too many cells
    with pytest.raises(batch.ManifestError, match=r"o\.csv, line 2: more cells than the header"):
        list(batch.read_manifest(tmp_path / "o.csv"))
    pq.write_table(pa.table({"image": ["a.png", "b.png"], "boxes": [[[1.0, 2.0, 3.0, 4.0]], [[1.0, 2.0]]]}),
                   tmp_path / "m.parquet")
    with pytest.raises(batch.ManifestError, match=r"m\.parquet, row 2, field 'boxes': entry 0 must be 4 numbers"):
        list(batch.read_manifest(tmp_path / "m.parquet"))
    (tmp_path / "p.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(batch.ManifestError, match=r"p\.parquet: not a readable Parquet file"):
        list(batch.read_manifest(tmp_path / "p.parquet"))
    with pytest.raises(ValueError, match=r"cannot tell the format .* '\.txt'"):
        batch.read_manifest(tmp_path / "m.txt")
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        batch.read_manifest(tmp_path / "none.jsonl")


def test_text_and_csv_problems_name_the_file(tmp_path):
    """Not UTF-8, an over-long CSV cell, duplicate CSV columns: one ManifestError naming the file
    (and line), not a UnicodeDecodeError or _csv.Error; a UTF-8 byte order mark is read past."""
    (tmp_path / "latin.jsonl").write_bytes('{"image": "caf\xe9.png", "boxes": []}\n'.encode("latin-1"))
    (tmp_path / "wide.csv").write_bytes("image,boxes\na.png,[]\n".encode("utf-16"))
    (tmp_path / "latin.json").write_bytes('[{"image_id": "\xe9"}]'.encode("latin-1"))
    for name, what in (("latin.jsonl", "byte 0xe9"), ("wide.csv", "it is UTF-16"), ("latin.json", "byte 0xe9")):
        with pytest.raises(batch.ManifestError, match=rf"{name}: not UTF-8 text \({what}"):
            list(batch.read_manifest(tmp_path / name, image_root=tmp_path))
    (tmp_path / "cell.csv").write_text('image,boxes\na.png,"[[1,2,3,4]]"\nb.png,"' + "1" * 140_000 + '"\n')
    with pytest.raises(batch.ManifestError, match=r"cell\.csv, line 3: a cell is longer than the CSV limit"):
        list(batch.read_manifest(tmp_path / "cell.csv"))
    (tmp_path / "twice.csv").write_text("image,image,boxes\na.png,b.png,[]\n")
    with pytest.raises(batch.ManifestError, match=r"twice\.csv, line 1, field 'image': column named twice"):
        list(batch.read_manifest(tmp_path / "twice.csv"))
    # a byte order mark (Excel's "CSV UTF-8", Notepad) is read, not taken as part of the first name
    (tmp_path / "bom.csv").write_bytes('\ufeffimage,boxes\na.png,"[[1,2,3,4]]"\n'.encode())
    (tmp_path / "bom.jsonl").write_bytes('\ufeff{"image": "a.png", "boxes": [[1, 2, 3, 4]]}\n'.encode())
    (tmp_path / "bom.json").write_bytes('\ufeff[{"image_id": 1, "bbox": [1, 2, 3, 4], "score": 1}]'.encode())
    save_image(tmp_path / "1.png", demo_image()[0])
    for name in ("bom.csv", "bom.jsonl", "bom.json"):
        (entry,) = [e for e in batch.read_manifest(tmp_path / name, image_root=tmp_path) if e.people]
        np.testing.assert_array_equal(entry.boxes, [[1, 2, 3, 4]])


def test_coco_ids_that_cannot_match(tmp_path):
    save_image(tmp_path / "1.jpg", demo_image()[0])
    save_image(tmp_path / "\u00b2.jpg", demo_image()[0])  # '²'.isdigit() is True, int('²') fails

    def dets(ident):
        (tmp_path / "d.json").write_text(json.dumps([{"image_id": ident, "category_id": 1, "bbox": [1, 2, 3, 4],
                                                      "score": 0.9}]))
        return tmp_path / "d.json"

    for ident, shown in (([1], r"\[1\]"), (True, "True")):
        with pytest.raises(batch.ManifestError, match=rf"detection 0, field 'image_id': must be an integer or a "
                           rf"string, got {shown}"):
            list(batch.read_manifest(dets(ident)))
    # a file whose stem is not a number is an image of the job with a string id: people only if a detection names it
    got = {e.key: e.people for e in batch.read_manifest(dets(1))}
    assert got == {"1.jpg": 1, "\u00b2.jpg": 0}
    assert {e.key: e.people for e in batch.read_manifest(dets("\u00b2"))} == {"1.jpg": 0, "\u00b2.jpg": 1}
    doc = {"images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"},
                      {"id": 1, "file_name": "\u00b2.jpg"}], "annotations": []}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    with pytest.raises(batch.ManifestError, match=r"c\.json, images\[2\], field 'id': 1 is listed again \(first at "
                       r"images\[0\]\)"):
        list(batch.read_manifest(tmp_path / "c.json"))
    doc["images"][2]["id"] = True
    (tmp_path / "c.json").write_text(json.dumps(doc))
    with pytest.raises(batch.ManifestError, match=r"images\[2\], field 'id': must be an integer or a string"):
        list(batch.read_manifest(tmp_path / "c.json"))
    (tmp_path / "deep.json").write_text("[" * 100_000)
    with pytest.raises(batch.ManifestError, match=r"deep\.json: not valid JSON here: nested too deeply"):
        list(batch.read_manifest(tmp_path / "deep.json"))
    (tmp_path / "big.json").write_text('[{"image_id": 1, "bbox": [1, 2, 3, %s], "score": 1}]' % ("9" * 400))
    with pytest.raises(batch.ManifestError, match=r"detection 0, field 'bbox': holds an integer too large"):
        list(batch.read_manifest(tmp_path / "big.json"))
