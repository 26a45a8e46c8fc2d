"""Readers: Kaggle evalseg (CT.zip and CT/), MSD / nnU-Net v2, 2D folders; one test per error they report."""
from __future__ import annotations

import gzip
import hashlib
import logging
import shutil
import struct
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest

from medseg.data.evalseg_pickle import write_label_pickle
from medseg.data.sources import (
    Case,
    Folders2DSource,
    KaggleEvalsegSource,
    MSDSource,
    detect_format,
    open_source,
    open_source_from_config,
)
from medseg.errors import (
    BadLabelError,
    CorruptFileError,
    DataError,
    MissingPairError,
    ShapeMismatchError,
    UnknownLabelError,
)
from tests.fixtures import (
    SPACING,
    evalseg_dir,
    expected,
    hu,
    make_kaggle_task,
    make_msd,
    nifti_bytes,
    patch_zip_member,
    tiny_case,
    write_image,
    write_nifti,
)

IDS = ("021", "21", "101")  # "021" and "21" are different cases


@pytest.fixture
def cases():
    return {cid: tiny_case(seed) for seed, cid in enumerate(IDS)}


def assert_case(case: Case, raw: np.ndarray, label: np.ndarray, case_id: str) -> None:
    assert case.case_id == case_id
    assert case.image.dtype == np.float32 and case.label.dtype == np.uint8
    assert np.array_equal(case.image, hu(raw))  # NIfTI scaling applied, (i, j, k) order kept
    assert np.array_equal(case.label, label)
    assert case.spacing == pytest.approx(SPACING)
    assert np.allclose(case.affine, np.diag([*SPACING, 1.0]))


# ------------------------------------------------------------------------------------------------ Kaggle


@pytest.mark.parametrize("member_suffix, gt_suffix", [(".nii", ".pkl"), (".nii.gz", ".pkl.gz")])
def test_kaggle_zip_layout_loads_every_case(tmp_path, cases, member_suffix, gt_suffix):
    task = make_kaggle_task(tmp_path, cases, member_suffix=member_suffix, gt_suffix=gt_suffix)
    with zipfile.ZipFile(task / "CT.zip", "a", compression=zipfile.ZIP_BZIP2) as zf:
        zf.writestr("README.txt", b"not a volume")
        zf.writestr("__MACOSX/._021.nii", b"resource fork")
    src = KaggleEvalsegSource(task)
    assert src.root == task and src.labels == {0: "background", 1: "tumor"} and src.modality == "CT"
    assert src.case_ids() == sorted(IDS)
    for cid in IDS:
        assert_case(src.load(cid), *cases[cid], cid)
        assert src.file_of(cid) == cid + member_suffix
    assert [c.case_id for c in src] == sorted(IDS)


def test_kaggle_keepkaggle_member_is_encrypted_and_ignored(tmp_path, cases):
    task = make_kaggle_task(tmp_path, cases)
    with zipfile.ZipFile(task / "CT.zip") as zf:
        assert zf.getinfo(".keepkaggle").flag_bits & 0x1  # reading it would need a password
        assert all(i.compress_type == zipfile.ZIP_BZIP2 for i in zf.infolist() if i.filename.endswith(".nii"))
    assert ".keepkaggle" not in KaggleEvalsegSource(task).case_ids()


def test_kaggle_ct_folder_layout(tmp_path, cases):
    task = make_kaggle_task(tmp_path, cases, ct="folder", member_suffix=".nii.gz")
    src = KaggleEvalsegSource(task)
    assert src.case_ids() == sorted(IDS)
    assert_case(src.load("021"), *cases["021"], "021")
    assert src.file_of("21") == "21.nii.gz"


def test_kaggle_task_selection_from_a_dataset_root(tmp_path, cases):
    make_kaggle_task(tmp_path, cases, folder="Task001_A")
    make_kaggle_task(tmp_path, cases, folder="Task003_B", name="Task04_B")  # metadata names itself differently
    with pytest.raises(DataError, match="several tasks.*Task001_A, Task003_B"):
        KaggleEvalsegSource(tmp_path)
    assert KaggleEvalsegSource(tmp_path, task="Task001_A").root.name == "Task001_A"
    assert KaggleEvalsegSource(tmp_path, task="Task04_B").root.name == "Task003_B"
    assert KaggleEvalsegSource(tmp_path / "Task003_B").name == "Task04_B"
    with pytest.raises(DataError, match="no single task named 'Task999'.*Task001_A, Task003_B"):
        KaggleEvalsegSource(tmp_path, task="Task999")


def test_kaggle_ground_truth_without_ct(tmp_path, cases):
    task = make_kaggle_task(tmp_path, cases, gt_only={"007": np.zeros((10, 12, 4), np.uint8)})
    with pytest.raises(MissingPairError, match=r"GroundTruth without CT.*007.*GroundTruth/007\.pkl"):
        KaggleEvalsegSource(task).case_ids()


def test_kaggle_ct_without_ground_truth(tmp_path, cases, caplog):
    task = make_kaggle_task(tmp_path, cases, ct_only={"008": tiny_case(8)[0]})
    with pytest.raises(MissingPairError, match=r"CT without GroundTruth.*008.*CT\.zip:008\.nii"):
        KaggleEvalsegSource(task).case_ids()
    with caplog.at_level(logging.WARNING):
        assert KaggleEvalsegSource(task, allow_missing=True).case_ids() == sorted(IDS)
    assert "008" in caplog.text and "CT.zip:008.nii" in caplog.text


def test_kaggle_shape_mismatch_names_both_files_and_the_case(tmp_path, cases):
    cases["21"] = (tiny_case(5, shape=(10, 12, 5))[0], cases["21"][1])
    task = make_kaggle_task(tmp_path, cases)
    src = KaggleEvalsegSource(task)
    with pytest.raises(ShapeMismatchError, match=r"CT\.zip:21\.nii vs .*GroundTruth/21\.pkl \(case 21\): "
                                                 r"CT shape \(10, 12, 5\)"):
        src.load("21")
    src.load("021")  # the other cases still load


def test_kaggle_bad_crc_member(tmp_path, cases):
    task = make_kaggle_task(tmp_path, cases)
    patch_zip_member(task / "CT.zip", "101.nii", crc=0xDEADBEEF)
    src = KaggleEvalsegSource(task)
    assert src.case_ids() == sorted(IDS)  # listing reads the central directory only
    with pytest.raises(CorruptFileError, match=r"CT\.zip:101\.nii \(case 101\): "
                                               r"corrupt zip member \(BadZipFile: Bad CRC-32") as err:
        src.load("101")
    assert "\n" not in str(err.value)


def test_kaggle_truncated_nifti_member(tmp_path, cases):
    task = make_kaggle_task(tmp_path, cases)
    with zipfile.ZipFile(task / "CT.zip", "a", compression=zipfile.ZIP_BZIP2) as zf:
        zf.writestr("555.nii", nifti_bytes(tiny_case(1)[0])[:-100])
    write_label_pickle(task / "GroundTruth" / "555.pkl", tiny_case(1)[1], SPACING)
    with pytest.raises(CorruptFileError, match=r"CT\.zip:555\.nii \(case 555\): unreadable NIfTI") as err:
        KaggleEvalsegSource(task).load("555")
    assert "\n" not in str(err.value)


def test_kaggle_truncated_nifti_gz_file(tmp_path, cases):
    task = make_kaggle_task(tmp_path, cases, ct="folder", member_suffix=".nii.gz")
    path = task / "CT" / "021.nii.gz"
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(CorruptFileError, match=r"CT/021\.nii\.gz \(case 021\): unreadable NIfTI"):
        KaggleEvalsegSource(task).load("021")


def test_kaggle_label_values_outside_metadata(tmp_path, cases):
    raw, label = cases["101"]
    label = label.copy()
    label[0, 0, 0] = 3
    cases["101"] = (raw, label)
    task = make_kaggle_task(tmp_path, cases)
    with pytest.raises(UnknownLabelError, match=r"GroundTruth/101\.pkl \(case 101\): "
                                                r"label values \[3\] not in the dataset labels \[0, 1\]"):
        KaggleEvalsegSource(task).load("101")


def test_kaggle_duplicate_and_nested_members(tmp_path, cases):
    task = make_kaggle_task(tmp_path, cases)
    with zipfile.ZipFile(task / "CT.zip", "a") as zf:
        zf.writestr("021.nii.gz", gzip.compress(nifti_bytes(cases["021"][0])))
    with pytest.raises(DataError, match=r"case 021: two CT files, CT\.zip:021\.nii and CT\.zip:021\.nii\.gz"):
        KaggleEvalsegSource(task).case_ids()

    other = make_kaggle_task(tmp_path / "b", cases)
    with zipfile.ZipFile(other / "CT.zip", "a") as zf:
        zf.writestr("sub/777.nii", b"")
    with pytest.raises(DataError, match=r"member 'sub/777\.nii' is not at the zip root"):
        KaggleEvalsegSource(other).case_ids()


def test_kaggle_fingerprint_is_stable_and_tracks_changes(tmp_path, cases):
    task = make_kaggle_task(tmp_path, cases)
    first = KaggleEvalsegSource(task).fingerprint()
    assert first == KaggleEvalsegSource(task).fingerprint()
    patch_zip_member(task / "CT.zip", "021.nii", crc=0x12345678)  # same size, new CRC
    second = KaggleEvalsegSource(task).fingerprint()
    assert second != first
    write_label_pickle(task / "GroundTruth" / "21.pkl", np.ones((10, 12, 4), np.uint8), SPACING)
    assert KaggleEvalsegSource(task).fingerprint() != second


def test_kaggle_unpaired_files_stay_reachable_for_scoring_and_inference(tmp_path, cases):
    gt_only, (ct_raw, _) = np.eye(10, 12, dtype=np.uint8)[..., None].repeat(4, axis=2), tiny_case(8)
    task = make_kaggle_task(tmp_path, cases, gt_only={"007": gt_only}, ct_only={"008": ct_raw})
    src = KaggleEvalsegSource(task, allow_missing=True)
    assert src.case_ids() == sorted(IDS)
    assert src.ground_truth_ids() == sorted([*IDS, "007"]) and src.image_ids() == sorted([*IDS, "008"])
    assert np.array_equal(src.load_label("007"), gt_only)
    image, nii = src.load_image("008")
    assert np.array_equal(image, hu(ct_raw)) and image.dtype == np.float32
    assert nii.shape == ct_raw.shape and np.allclose(nii.affine, np.diag([*SPACING, 1.0]))
    assert nii.header.get_zooms() == pytest.approx(SPACING)
    with pytest.raises(DataError, match="no GroundTruth for case '008'"):
        src.load_label("008")
    with pytest.raises(DataError, match="no CT for case '007'"):
        src.load_image("007")
    with pytest.raises(DataError, match="case '007' is not in this task"):
        src.load("007")


def test_kaggle_predictions(tmp_path, cases):
    pred = {cid: np.roll(label, 1, axis=0) for cid, (_, label) in cases.items()}
    task = make_kaggle_task(tmp_path, cases, predictions={"Dice": pred, "CE": pred})
    src = KaggleEvalsegSource(task)
    assert src.predictions_methods() == ["CE", "Dice"]
    lv = src.load_prediction("Dice", "021")
    assert np.array_equal(lv.volume, pred["021"]) and lv.voxelsize == pytest.approx(SPACING)
    with pytest.raises(DataError, match="no method 'Focal'"):
        src.load_prediction("Focal", "021")
    with pytest.raises(DataError, match=r"invalid case id '\.\./\.\./GroundTruth/021'"):
        src.load_prediction("Dice", "../../GroundTruth/021")
    with pytest.raises(DataError, match="no prediction for case '999'"):
        src.load_prediction("Dice", "999")


def test_real_example_task_loads_both_ct_cases(caplog):
    root = evalseg_dir() / "TaskA_Example"
    truth = expected()["ground_truth"]
    with pytest.raises(MissingPairError, match=r"GroundTruth without CT in CT/ for case\(s\) 101, 108"):
        KaggleEvalsegSource(root).case_ids()
    with caplog.at_level(logging.WARNING):
        src = KaggleEvalsegSource(root, allow_missing=True)
        assert src.case_ids() == ["370", "394"]
    assert "101" in caplog.text and "108" in caplog.text
    for case in src:
        want = truth[f"TaskA_Example/GroundTruth/{case.case_id}.pkl.gz"]
        assert case.image.shape == tuple(want["shape"]) == (512, 512, 1) and case.image.dtype == np.float32
        assert hashlib.sha256(case.label.tobytes()).hexdigest() == want["sha256"]
        assert case.spacing == pytest.approx(want["voxelsize"], abs=1e-5)
        assert case.image.min() < -500 < case.image.max()  # scaled to HU by the header slope


def test_real_ground_truth_only_tasks_are_reported():
    root = evalseg_dir()
    with pytest.raises(DataError, match="several tasks.*: Task001_LiverTumor, Task002_Pancreas, "
                                        "Task003_Multiorgan, TaskA_Example"):
        KaggleEvalsegSource(root)
    src = KaggleEvalsegSource(root, task="Task001_LiverTumor")
    assert len(src.ground_truth_ids()) == 87 and src.predictions_methods() == ["CE", "Dice"]
    with pytest.raises(MissingPairError, match=r"GroundTruth without CT \(no CT\.zip or CT/ folder\) "
                                               r"for case\(s\) 101, .*GroundTruth/101\.pkl\.gz"):
        src.case_ids()
    assert KaggleEvalsegSource(root, task="Task04_Multiorgan").root.name == "Task003_Multiorgan"
    assert KaggleEvalsegSource(root, task="Task002_Pancreas").ground_truth_ids()[0] == "021"


# ------------------------------------------------------------------------------------------------ MSD / nnU-Net


def test_msd_v1_layout_skips_hidden_files(tmp_path):
    cases = {"liver_0": tiny_case(0), "liver_10": tiny_case(1)}
    root = make_msd(tmp_path / "Task03_Liver", cases)
    write_nifti(root / "imagesTr" / "._liver_0.nii.gz", tiny_case(0)[0])  # macOS fork, not a case
    src = MSDSource(root)
    assert src.case_ids() == ["liver_0", "liver_10"] and src.modality == "CT"
    assert src.labels == {0: "background", 1: "liver"}
    assert_case(src.load("liver_10"), *cases["liver_10"], "liver_10")
    assert src.file_of("liver_0") == "liver_0.nii.gz"
    assert src.fingerprint() == MSDSource(root).fingerprint()


def test_nnunet_v2_layout(tmp_path):
    cases = {"case_0001": tiny_case(0), "case_0002": tiny_case(1)}  # ids that end in 4 digits themselves
    root = make_msd(tmp_path / "Dataset001_Liver", cases, v2=True)
    src = MSDSource(root)
    assert src.case_ids() == ["case_0001", "case_0002"]
    assert src.labels == {0: "background", 1: "liver"} and src.modality == "CT"
    assert_case(src.load("case_0002"), *cases["case_0002"], "case_0002")
    assert src.file_of("case_0001") == "case_0001_0000.nii.gz"


def test_msd_errors_name_file_and_case(tmp_path):
    cases = {"a": tiny_case(0), "b": tiny_case(1)}
    root = make_msd(tmp_path / "m", cases)
    write_nifti(root / "imagesTr" / "c.nii.gz", tiny_case(2)[0])
    with pytest.raises(MissingPairError, match=r"images without label for case\(s\) c: imagesTr/c\.nii\.gz"):
        MSDSource(root).case_ids()
    assert MSDSource(root, allow_missing=True).case_ids() == ["a", "b"]
    assert MSDSource(root, allow_missing=True).ground_truth_ids() == ["a", "b"]
    assert np.array_equal(MSDSource(root).load_label("b"), cases["b"][1])

    write_nifti(root / "labelsTr" / "a.nii.gz", np.full((10, 12, 4), 2, np.uint8), scaled=False)
    with pytest.raises(UnknownLabelError, match=r"labelsTr/a\.nii\.gz \(case a\): label values \[2\]"):
        MSDSource(root, allow_missing=True).load("a")
    write_nifti(root / "labelsTr" / "b.nii.gz", np.zeros((10, 12, 3), np.uint8), scaled=False)
    with pytest.raises(ShapeMismatchError,
                       match=r"imagesTr/b\.nii\.gz vs .*labelsTr/b\.nii\.gz \(case b\): image shape"):
        MSDSource(root, allow_missing=True).load("b")


# ------------------------------------------------------------------------------------------------ 2D folders


def test_folders2d_suffixes_and_binarised_masks(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    mask = np.zeros((6, 7), np.uint8)
    mask[1:3, 2:5] = 255
    write_image(tmp_path / "images" / "case1.png", rgb)
    write_image(tmp_path / "masks" / "case1_mask.png", mask)
    write_image(tmp_path / "images" / "case2.bmp", rgb[..., 0])
    write_image(tmp_path / "masks" / "case2_mask.gif", mask)
    write_image(tmp_path / "images" / "case3.tif", rgb[..., 1])
    write_image(tmp_path / "masks" / "case3_mask.tiff", (mask > 0).astype(np.uint8))
    src = Folders2DSource(tmp_path, mask_suffix="_mask")
    assert src.case_ids() == ["case1", "case2", "case3"] and src.modality != "CT"
    case = src.load("case1")
    assert case.image.shape == case.label.shape == (6, 7, 1) and case.image.dtype == np.float32
    luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    assert np.allclose(case.image[..., 0], luma, atol=1e-3)
    assert case.spacing == (1.0, 1.0, 1.0) and case.label.dtype == np.uint8
    for cid in ("case1", "case2", "case3"):  # 0/255 and 0/1 masks give the same labels
        assert np.array_equal(src.load(cid).label[..., 0], (mask > 0).astype(np.uint8))
    assert np.array_equal(src.load("case2").image[..., 0], rgb[..., 0].astype(np.float32))
    assert src.file_of("case2") == "case2.bmp"


def test_folders2d_regex_suffixes_and_multi_label_masks(tmp_path):
    labels = {0: "background", 1: "polyp", 2: "instrument"}
    mask = np.zeros((5, 5), np.uint8)
    mask[0, 0], mask[4, 4] = 1, 2
    write_image(tmp_path / "img" / "p01_img.jpg", np.full((5, 5), 100, np.uint8))
    write_image(tmp_path / "img" / "p02.jpeg", np.full((5, 5), 50, np.uint8))
    write_image(tmp_path / "lbl" / "p01_seg.png", mask)
    write_image(tmp_path / "lbl" / "p02_segmentation.png", mask)
    src = Folders2DSource(tmp_path, image_dir="img", mask_dir="lbl", image_suffix="_img",
                          mask_suffix="_seg(mentation)?", labels=labels)
    assert src.case_ids() == ["p01", "p02"]
    assert np.array_equal(src.load("p02").label[..., 0], mask)  # values kept as labels
    with pytest.raises(UnknownLabelError, match=r"lbl/p01_seg\.png \(case p01\): "
                                                r"label values \[2\] not in the dataset labels \[0, 1\]"):
        Folders2DSource(tmp_path, image_dir="img", mask_dir="lbl", image_suffix="_img",
                        mask_suffix="_seg(mentation)?").load("p01")


def test_folders2d_unpaired_files(tmp_path, caplog):
    write_image(tmp_path / "images" / "a.png", np.zeros((4, 4), np.uint8))
    write_image(tmp_path / "images" / "b.png", np.zeros((4, 4), np.uint8))
    write_image(tmp_path / "masks" / "a_mask.png", np.zeros((4, 4), np.uint8))
    write_image(tmp_path / "masks" / "z_mask.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(MissingPairError, match=r"images without mask for case\(s\) b: images/b\.png; "
                                               r"masks without image for case\(s\) z: masks/z_mask\.png"):
        Folders2DSource(tmp_path, mask_suffix="_mask").case_ids()
    with caplog.at_level(logging.WARNING):
        assert Folders2DSource(tmp_path, mask_suffix="_mask", allow_missing=True).case_ids() == ["a"]
    assert "images/b.png" in caplog.text
    src = Folders2DSource(tmp_path, mask_suffix="_mask")
    assert src.ground_truth_ids() == ["a", "z"] and src.load_label("z").shape == (4, 4, 1)


def test_folders2d_refuses_colour_masks_and_size_mismatch(tmp_path):
    write_image(tmp_path / "images" / "a.png", np.zeros((4, 4), np.uint8))
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    write_image(tmp_path / "masks" / "a.png", colour)
    write_image(tmp_path / "images" / "b.png", np.zeros((4, 4), np.uint8))
    write_image(tmp_path / "masks" / "b.png", np.zeros((4, 5), np.uint8))
    src = Folders2DSource(tmp_path)
    with pytest.raises(BadLabelError, match=r"masks/a\.png \(case a\): colour mask .*save masks as greyscale"):
        src.load("a")
    with pytest.raises(ShapeMismatchError, match=r"images/b\.png vs .*masks/b\.png \(case b\)"):
        src.load("b")


def _jpeg_mask_dataset(root, n: int = 2) -> np.ndarray:
    """n cases of a 0/255 disc mask saved as JPEG (compression adds values in between); returns the disc."""
    yy, xx = np.mgrid[:32, :32]
    disc = ((yy - 14) ** 2 + (xx - 17) ** 2 < 81).astype(np.uint8) * 255
    for i in range(n):
        write_image(root / "images" / f"{i + 1}.jpg", np.full((32, 32, 3), 90 + i, np.uint8))
        write_image(root / "masks" / f"{i + 1}.jpg", disc)
    return disc


def test_folders2d_jpeg_masks_need_a_threshold_and_say_so(tmp_path):
    disc = _jpeg_mask_dataset(tmp_path)
    from PIL import Image

    grey = np.asarray(Image.open(tmp_path / "masks" / "1.jpg"))
    assert len(np.unique(grey)) > 2  # the JPEG really holds values between 0 and 255
    with pytest.raises(UnknownLabelError) as err:
        Folders2DSource(tmp_path).load("1")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'masks' / '1.jpg'} (case 1): label values [")
    assert "not in the dataset labels [0, 1]" in message and message.endswith("set dataset.mask_threshold: 128")
    assert "compressed binary mask" in message and "\n" not in message

    src = Folders2DSource(tmp_path, mask_threshold=128)
    label = src.load("1").label[..., 0]
    assert label.dtype == np.uint8 and set(np.unique(label)) == {0, 1}
    assert np.array_equal(label, (grey >= 128).astype(np.uint8))
    assert np.count_nonzero(label != (disc > 0)) <= 4  # the disc back, give or take a few edge pixels
    # the threshold changes the cached labels, so the cache folder; unset, the fingerprint is the one from before it
    from medseg.data.sources.common import file_stamp, fingerprint_of

    plain = Folders2DSource(tmp_path)
    stamps = [file_stamp(p, tmp_path) for pair in plain._index().values() for p in pair]
    labels = {"0": "background", "1": "foreground"}
    before = fingerprint_of(stamps, {"image_suffix": "", "mask_suffix": "", "labels": labels})
    assert plain.fingerprint() == before and src.fingerprint() != before


def test_folders2d_threshold_reads_grey_levels_of_any_mode(tmp_path):
    from PIL import Image

    mask = np.zeros((6, 6), np.uint16)
    mask[1:4, 2:5] = 40000
    for name in ("a", "b", "c"):
        write_image(tmp_path / "images" / f"{name}.png", np.zeros((6, 6), np.uint8))
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")  # 16-bit grey
    grey_palette = Image.fromarray((mask > 0).astype(np.uint8) * 3, mode="L").convert("P")
    grey_palette.putpalette([0, 0, 0] * 3 + [200, 200, 200] + [0, 0, 0] * 252)
    grey_palette.save(tmp_path / "masks" / "b.png")  # index 3 -> grey 200
    write_image(tmp_path / "masks" / "c.png", (mask > 0).astype(np.uint8))  # a label mask (0/1)
    with pytest.raises(BadLabelError, match=r"masks/a\.png \(case a\): mask values are not integers in 0\.\.255 "
                                            r"\(mode I;16, dtype uint16, range 0\.\.40000\): save label values "
                                            r"0\.\.255 or set dataset\.mask_threshold"):
        Folders2DSource(tmp_path).load("a")
    src = Folders2DSource(tmp_path, mask_threshold=128)
    for name in ("a", "b"):
        assert np.array_equal(src.load(name).label[..., 0], (mask > 0).astype(np.uint8)), name
    with pytest.raises(BadLabelError, match=r"masks/c\.png \(case c\): the mask holds label values 0 and 1, all below "
                                            r"dataset\.mask_threshold 128: .*unset dataset\.mask_threshold"):
        src.load("c")


def test_folders2d_threshold_still_refuses_colour_masks(tmp_path):
    write_image(tmp_path / "images" / "a.png", np.zeros((4, 4), np.uint8))
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    write_image(tmp_path / "masks" / "a.png", colour)
    with pytest.raises(BadLabelError, match=r"masks/a\.png \(case a\): colour mask \(mode RGB, channels differ\)"):
        Folders2DSource(tmp_path, mask_threshold=128).load("a")


# ------------------------------------------------------------------------------------------------ open_source


def test_open_source_detects_each_layout(tmp_path, cases):
    kaggle = make_kaggle_task(tmp_path / "kaggle", cases).parent
    msd = make_msd(tmp_path / "msd", {"a": tiny_case(0)})
    write_image(tmp_path / "f2d" / "images" / "x.png", np.zeros((3, 3), np.uint8))
    write_image(tmp_path / "f2d" / "masks" / "x.png", np.zeros((3, 3), np.uint8))
    assert [detect_format(p) for p in (kaggle, msd, tmp_path / "f2d")] == ["kaggle", "msd", "folders2d"]
    assert isinstance(open_source("auto", kaggle), KaggleEvalsegSource)
    assert isinstance(open_source("msd", msd), MSDSource)
    assert open_source("auto", tmp_path / "f2d").case_ids() == ["x"]
    with pytest.raises(DataError, match="unknown dataset layout"):
        detect_format(tmp_path)
    with pytest.raises(ValueError, match="unknown format 'nifti'; allowed: kaggle, msd, folders2d, auto"):
        open_source("nifti", kaggle)
    # the config refuses it with an explicit format; with "auto" the reader finds out
    with pytest.raises(DataError, match=r"msd: dataset\.mask_threshold binarises 2D mask images; this is a msd"):
        open_source("auto", msd, mask_threshold=128)


def test_open_source_from_config_passes_every_field(tmp_path, cases):
    make_kaggle_task(tmp_path / "k", cases, folder="Task001_A")
    make_kaggle_task(tmp_path / "k", cases, folder="Task002_B", ct_only={"008": tiny_case(8)[0]})
    cfg = SimpleNamespace(format="auto", path=str(tmp_path / "k"), task="Task002_B", allow_missing=True,
                          labels=None, image_dir="images", mask_dir="masks", image_suffix="", mask_suffix="")
    src = open_source_from_config(cfg)
    assert src.root.name == "Task002_B" and src.case_ids() == sorted(IDS)

    mask = np.zeros((3, 3), np.uint8)
    mask[0, 0] = 2
    write_image(tmp_path / "f" / "img" / "x_img.png", np.zeros((3, 3), np.uint8))
    write_image(tmp_path / "f" / "lbl" / "x_lbl.png", mask)
    cfg = SimpleNamespace(format="folders2d", path=str(tmp_path / "f"), task=None, allow_missing=False, labels=[2],
                          image_dir="img", mask_dir="lbl", image_suffix="_img", mask_suffix="_lbl")
    src = open_source_from_config(cfg)
    assert src.labels == {0: "background", 2: "label 2"}
    assert np.array_equal(src.load("x").label[..., 0], mask)


def test_warn_skipped_false_skips_the_same_cases_without_a_warning(tmp_path, cases, caplog):
    """The audit lists the unpaired cases itself: its lenient readers (warn_skipped=False) skip them without logging."""
    kaggle = make_kaggle_task(tmp_path / "k", cases, ct_only={"008": tiny_case(8)[0]})
    msd = make_msd(tmp_path / "m", {"a": tiny_case(0)})
    write_nifti(msd / "imagesTr" / "c.nii.gz", tiny_case(2)[0])
    for name in ("a", "b"):
        write_image(tmp_path / "f" / "images" / f"{name}.png", np.zeros((4, 4), np.uint8))
    write_image(tmp_path / "f" / "masks" / "a.png", np.zeros((4, 4), np.uint8))
    for fmt, path in (("kaggle", kaggle), ("msd", msd), ("folders2d", tmp_path / "f")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="medseg.data.sources"):
            quiet = open_source(fmt, path, allow_missing=True, warn_skipped=False).case_ids()
            assert caplog.records == [], fmt
            loud = open_source(fmt, path, allow_missing=True).case_ids()
        assert quiet == loud and len(caplog.records) == 1 and "skipping unpaired cases" in caplog.text
    cfg = SimpleNamespace(format="auto", path=str(msd), task=None, allow_missing=True, labels=None,
                          image_dir="images", mask_dir="masks", image_suffix="", mask_suffix="")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medseg.data.sources"):
        assert open_source_from_config(cfg, warn_skipped=False).case_ids() == ["a"] and caplog.records == []


def test_scaled_nifti_is_read_in_float32_with_nibabels_values(tmp_path):
    """CT stored as uint16 + intercept -1024 (common): the values nibabel gives, without a float64 copy."""
    import nibabel as nib

    from medseg.data.sources.common import load_nifti

    raw = np.random.default_rng(0).integers(0, 3000, (8, 7, 5)).astype(np.uint16)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, tmp_path / "ct.nii.gz")
    vol = load_nifti(tmp_path / "ct.nii.gz", source="ct")
    assert vol.array.dtype == np.float32
    assert np.array_equal(vol.array, np.asanyarray(nib.load(tmp_path / "ct.nii.gz").dataobj))  # nibabel: float64
    nib.save(nib.Nifti1Image(raw.astype(np.int16), np.eye(4)), tmp_path / "plain.nii.gz")
    assert load_nifti(tmp_path / "plain.nii.gz", source="plain").array.dtype == np.int16  # no scaling: the stored dtype


# ------------------------------------------------------------------------------------------------ header shapes


def assert_shapes_are_the_loaded_ones(src) -> list[tuple[int, int, int]]:
    shapes = [src.shape(cid) for cid in src.case_ids()]
    assert shapes == [src.load(cid).image.shape for cid in src.case_ids()]
    return shapes


def damage_member_tail(zip_path, member: str) -> None:
    """Flip 8 bytes 50 from the end of a member's compressed data (past its first bzip2 block when it has several)."""
    with zipfile.ZipFile(zip_path) as zf:
        info = zf.getinfo(member)
    data = bytearray(zip_path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    at = info.header_offset + 30 + name_len + extra_len + info.compress_size - 50
    data[at:at + 8] = bytes(b ^ 0xFF for b in data[at:at + 8])
    zip_path.write_bytes(bytes(data))


@pytest.mark.parametrize("ct, member_suffix", [("zip", ".nii"), ("zip", ".nii.gz"), ("folder", ".nii.gz")])
def test_kaggle_shape_is_read_from_the_header(tmp_path, ct, member_suffix):
    cases = {cid: tiny_case(seed, shape=(10, 12, 3 + seed)) for seed, cid in enumerate(IDS)}
    src = KaggleEvalsegSource(make_kaggle_task(tmp_path, cases, ct=ct, member_suffix=member_suffix))
    assert assert_shapes_are_the_loaded_ones(src) == [(10, 12, 3), (10, 12, 5), (10, 12, 4)]  # "021", "101", "21"


def test_zip_member_shape_decompresses_its_first_bzip2_block_only(tmp_path):
    """A member damaged past its first bzip2 block (900 kB): its shape is read, its load fails."""
    raw = np.random.default_rng(0).integers(0, 600, (64, 64, 200), dtype=np.int16)  # 1.6 MB: two blocks
    task = make_kaggle_task(tmp_path, {"big": (raw, np.zeros(raw.shape, np.uint8))})
    damage_member_tail(task / "CT.zip", "big.nii")
    src = KaggleEvalsegSource(task)
    assert src.shape("big") == (64, 64, 200)
    with pytest.raises(CorruptFileError, match=r"CT\.zip:big\.nii \(case big\): corrupt zip member"):
        src.load("big")


def test_msd_and_folders2d_shapes_are_read_from_the_header(tmp_path):
    cases = {"a": tiny_case(0, shape=(10, 12, 3)), "b": tiny_case(1, shape=(9, 12, 5))}
    assert assert_shapes_are_the_loaded_ones(MSDSource(make_msd(tmp_path / "msd", cases))) == [(10, 12, 3), (9, 12, 5)]
    assert assert_shapes_are_the_loaded_ones(MSDSource(make_msd(tmp_path / "v2", cases, v2=True)))[1] == (9, 12, 5)
    write_image(tmp_path / "2d" / "images" / "a.png", np.zeros((16, 24), np.uint8))
    write_image(tmp_path / "2d" / "images" / "b.jpg", np.zeros((20, 8, 3), np.uint8))
    for name in ("a", "b"):
        write_image(tmp_path / "2d" / "masks" / f"{name}.png", np.zeros((16, 24) if name == "a" else (20, 8), np.uint8))
    assert assert_shapes_are_the_loaded_ones(Folders2DSource(tmp_path / "2d")) == [(16, 24, 1), (20, 8, 1)]


def test_an_unreadable_header_is_a_corrupt_file_naming_file_and_case(tmp_path, cases):
    task = make_kaggle_task(tmp_path, cases, ct="folder", member_suffix=".nii.gz")
    (task / "CT" / "021.nii.gz").write_bytes(gzip.compress(b"not a nifti " * 60))
    with pytest.raises(CorruptFileError, match=r"CT/021\.nii\.gz \(case 021\): unreadable NIfTI header"):
        KaggleEvalsegSource(task).shape("021")
    zipped = make_kaggle_task(tmp_path / "z", {"7": tiny_case(0)})
    with zipfile.ZipFile(zipped / "CT.zip", "a", compression=zipfile.ZIP_BZIP2) as zf:
        zf.writestr("8.nii", b"short")
    write_label_pickle(zipped / "GroundTruth" / "8.pkl", tiny_case(0)[1], SPACING)
    with pytest.raises(CorruptFileError, match=r"CT\.zip:8\.nii \(case 8\): unreadable NIfTI header"):
        KaggleEvalsegSource(zipped).shape("8")
    write_image(tmp_path / "2d" / "masks" / "a.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "2d" / "images").mkdir()
    (tmp_path / "2d" / "images" / "a.png").write_bytes(b"not a png")
    with pytest.raises(CorruptFileError, match=r"images/a\.png: unreadable image"):
        Folders2DSource(tmp_path / "2d").shape("a")


def test_header_shape_follows_load_nifti_for_2d_and_trailing_singleton_volumes(tmp_path):
    from medseg.data.sources.common import load_nifti, nifti_shape

    for raw, shape in ((np.arange(120, dtype=np.int16).reshape(10, 12), (10, 12, 1)),
                       (np.arange(480, dtype=np.int16).reshape(10, 12, 4, 1), (10, 12, 4))):
        path = write_nifti(tmp_path / f"{raw.ndim}d.nii.gz", raw, scaled=False)
        vol = load_nifti(path, source="x")
        assert nifti_shape(path, source="x") == vol.shape == shape
        assert np.array_equal(vol.array, raw.reshape(shape))
    two = write_nifti(tmp_path / "two.nii", np.zeros((10, 12, 4, 2), np.int16), scaled=False)
    for read in (load_nifti, nifti_shape):
        with pytest.raises(DataError, match=r"^two: NIfTI of shape \(10, 12, 4, 2\) is not a single 3D volume$"):
            read(two, source="two")


def test_real_headers_give_the_loaded_shapes(tmp_path):
    """The real example task (CT/ folder of .nii.gz), the same CT as Kaggle stores it (uncompressed .nii members of a
    bzip2 CT.zip), and the real MSD spleen crop."""
    real = evalseg_dir() / "TaskA_Example"
    shapes = assert_shapes_are_the_loaded_ones(KaggleEvalsegSource(real, allow_missing=True, warn_skipped=False))
    assert shapes == [(512, 512, 1), (512, 512, 1)]
    task = tmp_path / real.name
    shutil.copytree(real, task, ignore=shutil.ignore_patterns("CT", "Predictions"))
    with zipfile.ZipFile(task / "CT.zip", "w", compression=zipfile.ZIP_BZIP2) as zf:
        for path in sorted((real / "CT").glob("*.nii.gz")):
            zf.writestr(path.name.removesuffix(".gz"), gzip.decompress(path.read_bytes()))
    assert assert_shapes_are_the_loaded_ones(KaggleEvalsegSource(task, allow_missing=True, warn_skipped=False)) \
        == shapes
    spleen = evalseg_dir().parent / "msd-spleen-crop"
    if not spleen.is_dir():
        pytest.skip(f"MSD spleen crop not found at {spleen} (check out ../shared beside the repo)")
    assert assert_shapes_are_the_loaded_ones(MSDSource(spleen)) == [(164, 166, 26)]
