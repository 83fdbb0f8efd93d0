"""Label maps, protocols and the unknown-id warning (METHODS.md §7)."""

import warnings

import numpy as np
import pytest

from uda_ray.data.labels import (
    CITYSCAPES_ID_TO_TRAIN,
    CITYSCAPES_LABEL_IDS,
    CLASSES,
    IGNORE_INDEX,
    PROTOCOLS,
    SYNTHIA_ID_TO_TRAIN,
    encode_labels,
    eval_class_ids,
    make_known,
    make_lut,
)

# Written out from METHODS.md §7, entry by entry: label id -> class name.
CITYSCAPES_EXPECTED = {7: "road", 8: "sidewalk", 11: "building", 12: "wall", 13: "fence", 17: "pole",
                       19: "traffic light", 20: "traffic sign", 21: "vegetation", 22: "terrain", 23: "sky",
                       24: "person", 25: "rider", 26: "car", 27: "truck", 28: "bus", 31: "train", 32: "motorcycle",
                       33: "bicycle"}
SYNTHIA_EXPECTED = {3: "road", 4: "sidewalk", 2: "building", 21: "wall", 5: "fence", 7: "pole", 15: "traffic light",
                    9: "traffic sign", 6: "vegetation", 1: "sky", 10: "person", 17: "rider", 8: "car", 19: "bus",
                    12: "motorcycle", 11: "bicycle"}


def test_classes_in_train_id_order():
    assert len(CLASSES) == 19
    assert CLASSES[0] == "road" and CLASSES[10] == "sky" and CLASSES[13] == "car" and CLASSES[18] == "bicycle"
    assert IGNORE_INDEX == 255


@pytest.mark.parametrize(("mapping", "expected"), [(CITYSCAPES_ID_TO_TRAIN, CITYSCAPES_EXPECTED),
                                                    (SYNTHIA_ID_TO_TRAIN, SYNTHIA_EXPECTED)])
def test_every_map_entry_and_unmapped_ids(mapping, expected):
    assert {k: CLASSES[v] for k, v in mapping.items()} == expected
    lut = make_lut(mapping)
    assert lut.dtype == np.uint8 and lut.shape == (65536,)
    for label_id in range(65536):
        want = CLASSES.index(expected[label_id]) if label_id in expected else IGNORE_INDEX
        if lut[label_id] != want:
            raise AssertionError(f"id {label_id}: got {lut[label_id]}, expected {want}")


def test_synthia_lacks_terrain_truck_train():
    assert sorted(set(range(19)) - set(SYNTHIA_ID_TO_TRAIN.values())) == [9, 14, 16]


def test_protocols():
    assert eval_class_ids(19) == tuple(range(19))
    assert eval_class_ids(16) == (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
    assert eval_class_ids(13) == (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
    assert set(PROTOCOLS[16]) == set(SYNTHIA_ID_TO_TRAIN.values())
    with pytest.raises(ValueError, match="14"):
        eval_class_ids(14)


def test_encode_maps_16_bit_ids_and_warns_once_naming_path_and_ids():
    lut, known = make_lut(SYNTHIA_ID_TO_TRAIN), make_known(range(23))
    ids = np.array([[3, 4, 300], [0, 22, 1]], dtype=np.uint16)
    with pytest.warns(UserWarning, match=r"first\.png.*\[300\]"):
        out = encode_labels(ids, lut, "first.png", known=known, warn_key="test-once")
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 1, 255], [255, 255, 10]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second file of the same dataset must not warn again
        encode_labels(np.array([[999]], np.uint16), lut, "second.png", known=known, warn_key="test-once")


def test_void_ids_are_ignored_silently():
    lut, known = make_lut(CITYSCAPES_ID_TO_TRAIN), make_known(CITYSCAPES_LABEL_IDS)
    ids = np.array([[0, 1, 6, 7], [9, 10, 255, 26]], dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = encode_labels(ids, lut, "cs.png", known=known, warn_key="test-void")
    assert out.tolist() == [[255, 255, 255, 0], [255, 255, 255, 13]]


def test_bad_map_entry_and_bad_ids_raise():
    with pytest.raises(ValueError, match="70000"):
        make_lut({70000: 1})
    with pytest.raises(ValueError, match="x.png"):
        encode_labels(np.zeros((2, 2, 3), np.uint8), make_lut({}), "x.png")
