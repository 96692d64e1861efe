"""The competition's label scheme: class = mask * 6 + gender * 3 + age_group."""

from __future__ import annotations

import pytest

from dist_train.tasks.mask import labels as L


@pytest.mark.parametrize(
    ("age", "default_grp", "grp_30_58"),
    [(0, 0, 0), (18, 0, 0), (29, 0, 0), (30, 1, 1), (57, 1, 1), (58, 1, 2), (59, 1, 2), (60, 2, 2), (90, 2, 2)],
)
def test_age_group_edges(age: int, default_grp: int, grp_30_58: int) -> None:
    assert L.age_group(age) == default_grp
    assert L.age_group(age, (30, 60)) == default_grp
    assert L.age_group(age, (30, 58)) == grp_30_58


def test_label_table_matches_competition() -> None:
    # The competition's published table: wear 0-5, incorrect 6-11, not worn 12-17;
    # within each, male <30, 30-59, >=60 then female.
    expected = {
        (0, 0, 29): 0, (0, 0, 30): 1, (0, 0, 60): 2, (0, 1, 29): 3, (0, 1, 59): 4, (0, 1, 60): 5,
        (1, 0, 29): 6, (1, 0, 30): 7, (1, 0, 60): 8, (1, 1, 29): 9, (1, 1, 59): 10, (1, 1, 60): 11,
        (2, 0, 29): 12, (2, 0, 30): 13, (2, 0, 60): 14, (2, 1, 29): 15, (2, 1, 59): 16, (2, 1, 60): 17,
    }  # fmt: skip
    for (mask, gender, age), cls in expected.items():
        assert L.encode(mask, gender, L.age_group(age)) == cls
        assert L.label_from_meta({"mask": mask, "gender": gender, "age": age}) == cls


def test_encode_decode_round_trip_all_classes() -> None:
    seen = set()
    for cls in range(L.NUM_CLASSES):
        parts = L.decode(cls)
        assert L.encode(*parts) == cls
        seen.add(parts)
    assert seen == {(m, g, a) for m in range(3) for g in range(2) for a in range(3)}


@pytest.mark.parametrize("bad", [(3, 0, 0), (-1, 0, 0), (0, 2, 0), (0, 0, 3), (0, 0, -1)])
def test_encode_rejects_out_of_range(bad: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match="out of range"):
        L.encode(*bad)


@pytest.mark.parametrize("bad", [-1, 18, 100])
def test_decode_rejects_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError, match="0..17"):
        L.decode(bad)


def test_class_names() -> None:
    names = L.class_names()
    assert len(names) == 18 and len(set(names)) == 18
    assert names[0] == "wear/male/<30"
    assert names[4] == "wear/female/30-59"
    assert names[8] == "incorrect/male/>=60"
    assert names[17] == "not_wear/female/>=60"
    assert L.class_name(4) == "wear/female/30-59"
    assert L.class_name(4, (30, 58)) == "wear/female/30-57"
    assert L.class_names((30, 58))[5] == "wear/female/>=58"
    assert L.age_group_names((25, 50)) == ("<25", "25-49", ">=50")


def test_label_from_meta_with_other_bins() -> None:
    meta = {"person_id": "000001", "gender": 1, "race": "Asian", "age": 58, "mask": 1, "path": "x/mask1.jpg"}
    assert L.label_from_meta(meta) == 10  # incorrect / female / 30-59
    assert L.label_from_meta(meta, (30, 58)) == 11  # moved into the oldest group
    # Metadata read back from JSON or CSV may hold strings.
    assert L.label_from_meta({"mask": "2", "gender": "0", "age": "60"}) == 14


def test_mask_status() -> None:
    for stem in ("mask1", "mask2", "mask3", "mask4", "mask5"):
        assert L.mask_status(stem) == 0
    assert L.mask_status("incorrect_mask") == 1
    assert L.mask_status("normal") == 2
    assert L.mask_status("MASK1") == 0  # upper-case file names from the real set
    assert L.mask_status("mask6") is None
    assert L.mask_status("._mask1") is None
    assert L.mask_status("mask1-checkpoint") is None


@pytest.mark.parametrize(("value", "expected"), [("male", 0), ("Female", 1), (" FEMALE ", 1), ("m", 0), ("f", 1), ("0", 0), ("1", 1)])
def test_parse_gender(value: str, expected: int) -> None:
    assert L.parse_gender(value) == expected


@pytest.mark.parametrize("bad", ["", "man", "2", "unknown"])
def test_parse_gender_errors(bad: str) -> None:
    with pytest.raises(ValueError, match="gender"):
        L.parse_gender(bad)


def test_parse_age() -> None:
    assert L.parse_age("45") == 45
    assert L.parse_age(" 60 ") == 60
    assert L.parse_age(0) == 0
    for bad in ("abc", "45.5", "", "-1", "150"):
        with pytest.raises(ValueError, match="age"):
            L.parse_age(bad)


def test_parse_age_bins() -> None:
    assert L.parse_age_bins("30,60") == (30, 60)
    assert L.parse_age_bins(" 30 , 58 ") == (30, 58)
    assert L.parse_age_bins([30, 58]) == (30, 58)
    for bad in ("30", "30,60,90", "60,30", "30,30", "0,60", "a,b", "", (30,)):
        with pytest.raises(ValueError, match="age bins"):
            L.parse_age_bins(bad)
