"""The competition recipe's label options: age bins and relabelling at load time (the options' effect in
training: tests/test_trainer.py::test_recipe_option_trains)."""

from __future__ import annotations

import pytest

from dist_train.tasks.mask import labels as L


def test_relabel_and_age_bins_at_load_time(tmp_path):
    fixes_csv = tmp_path / "fix.csv"
    fixes_csv.write_text("id,gender,age,swap_mask\n000001,female,,\n000002,,61,\n000003,,,1\n")
    fixes = L.load_relabel(str(fixes_csv))
    base = {"person_id": "000001", "gender": 0, "age": 58, "mask": 1}
    assert L.target_from_meta(base, None) == L.encode(1, 0, 1)  # no fixes: as stored
    assert L.target_from_meta(base, None, fixes=fixes) == L.encode(1, 1, 1)  # gender fixed to female
    assert L.target_from_meta(base, None, bins=(30, 58), fixes=fixes) == L.encode(1, 1, 2)  # 58 is old with 30,58
    assert L.target_from_meta({**base, "person_id": "000002"}, None, fixes=fixes) == L.encode(1, 0, 2)
    assert L.target_from_meta({**base, "person_id": "000003"}, None, fixes=fixes) == L.encode(2, 0, 1)  # swapped
    assert L.target_from_meta({**base, "person_id": "000003", "mask": 0}, None, fixes=fixes) == L.encode(0, 0, 1)


def test_relabel_bad_file(tmp_path):
    from dist_train.errors import UserError

    bad = tmp_path / "bad.csv"
    bad.write_text("id,gender\n000001,robot\n")
    with pytest.raises(UserError, match="line 2"):
        L.load_relabel(str(bad))
    bad.write_text("id,gender\n\n000001,male\n\n000002,robot\n")  # blank lines count as lines
    with pytest.raises(UserError, match="line 5: gender 'robot'"):
        L.load_relabel(str(bad))
    with pytest.raises(UserError, match="cannot read"):
        L.load_relabel(str(tmp_path / "missing.csv"))


def test_relabel_file_goes_through_the_trust_layer(tmp_path):
    """A --relabel path (also one read back from a fold's config.yaml by `oof`) is read capped:
    a FIFO is refused without blocking, non-UTF-8 bytes and over-long fields are one line."""
    import os

    from dist_train.errors import UserError

    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="not a regular file"):
        L.load_relabel(str(fifo))  # would block forever in open() before
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"id,gender\n\xff\xfe,male\n")
    with pytest.raises(UserError, match="not a readable UTF-8 CSV"):
        L.load_relabel(str(binary))
    wide = tmp_path / "wide.csv"
    wide.write_text("id,gender\n" + "1" * 200_000 + ",male\n")
    with pytest.raises(UserError, match="not a readable UTF-8 CSV"):
        L.load_relabel(str(wide))
