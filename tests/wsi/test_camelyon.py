"""--data camelyon16=DIR / camelyon17=DIR on fake trees of synthetic slides under real names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from histoseg.cli import run_main
from histoseg.errors import ConfigError
from histoseg.wsi.camelyon import parse_data_spec, read_dataset
from histoseg.wsi.synth import write_synthetic_slide

SIZE_PX = (1024, 1024)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(tumour slide, its XML, normal slide), copied under the challenges' names."""
    folder = tmp_path_factory.mktemp("sources")
    tif, xml = write_synthetic_slide(folder / "t.tif", SIZE_PX, 21, 256, progress=False)
    normal, _ = write_synthetic_slide(
        folder / "n.tif", SIZE_PX, 22, 256, tumor=False, progress=False
    )
    return tif, xml, normal


def _put(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def camelyon16_tree(root: Path, sources, *, testing: bool = True) -> Path:
    tif, xml, normal = sources
    train = root / "training"
    for i in (1, 2):
        _put(tif, train / "tumor" / f"tumor_00{i}.tif")
        _put(xml, train / "lesion_annotations" / f"tumor_00{i}.xml")
        _put(normal, train / "normal" / f"normal_00{i}.tif")
    if testing:
        _put(tif, root / "testing" / "images" / "test_001.tif")
        _put(xml, root / "testing" / "lesion_annotations" / "test_001.xml")
        _put(normal, root / "testing" / "images" / "test_002.tif")
        (root / "testing" / "reference.csv").write_text(
            "Test_001,Tumor,Macro,Primary\nTest_002,Normal\n"
        )
    return root


# two patients in each of three centres (20 patients a centre), both spellings of the folder
PATIENTS = ((0, "center_0"), (1, "center_0"), (20, "center_1"), (21, "center_1"))
PATIENTS += ((40, "centre_2"), (41, "centre_2"))


def camelyon17_tree(root: Path, sources) -> Path:
    tif, xml, normal = sources
    train = root / "training"
    labels = ["patient,stage"]
    for patient, centre in PATIENTS:
        for node, (source, label) in enumerate(
            ((tif, "macro"), (normal, "negative"), (normal, "itc"))
        ):
            name = f"patient_{patient:03d}_node_{node}"
            _put(source, train / centre / f"{name}.tif")
            labels.append(f"{name}.tif,{label}")
        _put(xml, train / "lesion_annotations" / f"patient_{patient:03d}_node_0.xml")
    (train / "stage_labels.csv").write_text("\n".join(labels) + "\n")
    return root


def test_camelyon16_training_trains_and_testing_validates(tmp_path, sources):
    dataset = read_dataset(f"camelyon16={camelyon16_tree(tmp_path, sources)}")
    assert [(t.name, x and x.name) for t, x in dataset.training] == [
        ("tumor_001.tif", "tumor_001.xml"),
        ("tumor_002.tif", "tumor_002.xml"),
        ("normal_001.tif", None),
        ("normal_002.tif", None),
    ]
    assert [(t.name, x and x.name) for t, x in dataset.validation] == [
        ("test_001.tif", "test_001.xml"),
        ("test_002.tif", None),
    ]


def test_camelyon17_keeps_slides_with_a_pixel_label(tmp_path, sources):
    dataset = read_dataset(f"camelyon17={camelyon17_tree(tmp_path, sources)}")
    names = sorted((t.name, x is not None) for t, x in dataset.training)
    assert names == sorted(
        (f"patient_{p:03d}_node_{node}.tif", node == 0) for p, _ in PATIENTS for node in (0, 1)
    )
    assert sorted(p.name for p in dataset.left_out) == [
        f"patient_{p:03d}_node_2.tif" for p, _ in PATIENTS
    ]
    assert dataset.validation == []


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: shutil.rmtree(r / "training" / "normal"), "normal slides folder .* does not"),
        (
            lambda r: (r / "training" / "lesion_annotations" / "tumor_002.xml").unlink(),
            "tumour slide .*tumor_002.tif has no annotation .*tumor_002.xml",
        ),
        (
            lambda r: (r / "training" / "tumor" / "tumor_002.tif").unlink(),
            "annotation .*tumor_002.xml has no slide tumor_002.tif",
        ),
        (
            lambda r: (r / "testing" / "reference.csv").write_text("Test_001,Tumor\n"),
            "test_002.tif has no row in .*reference.csv",
        ),
    ],
)
def test_camelyon16_damage_is_one_clear_error(tmp_path, sources, damage, message):
    root = camelyon16_tree(tmp_path, sources)
    damage(root)
    with pytest.raises(ConfigError, match=message):
        read_dataset(f"camelyon16={root}")


def test_camelyon17_orphan_annotation_and_bad_specs(tmp_path, sources):
    root = camelyon17_tree(tmp_path, sources)
    (root / "training" / "center_1" / "patient_020_node_0.tif").unlink()
    with pytest.raises(ConfigError, match=r"patient_020_node_0\.xml has no slide"):
        read_dataset(f"camelyon17={root}")
    for text in ("camelyon18=/x", "camelyon16", "camelyon16="):
        with pytest.raises(ConfigError, match="must be NAME=FOLDER with NAME one of"):
            parse_data_spec(text)
    with pytest.raises(ConfigError, match=r"camelyon16 folder .*nowhere does not exist"):
        read_dataset(f"camelyon16={tmp_path / 'nowhere'}")


TINY = [
    "--backbone", "mobilenetv2", "--alpha", "0.35", "--patch-size", "64",
    "--batch-size", "1", "--steps", "2", "--max-val-patches", "4", "--no-progress",
    "--checkpoint-every", "0",
]  # fmt: skip


def test_train_cli_runs_end_to_end_on_the_camelyon16_tree(tmp_path, sources):
    from histoseg.train.cli import main

    tree = camelyon16_tree(tmp_path / "d", sources)
    run = tmp_path / "run"
    assert run_main(main, [*TINY, "--data", f"camelyon16={tree}", "--run-dir", str(run)]) == 0
    (row,) = json.loads((run / "results.json").read_text())
    assert row["config"]["data"] == f"camelyon16={tree}"
    assert row["extra"]["bayes_ceiling"] is None  # known only for synthetic slides
    assert row["extra"]["val_slides"] == ["test_001.tif", "test_002.tif"]
    assert row["metrics"]["val_patches"] > 0


def test_camelyon17_splits_by_slide_across_centres(tmp_path, sources, capsys):
    from histoseg.train.engines import get_engine
    from histoseg.train.options import TrainOptions
    from histoseg.train.slides import train_and_val_slides

    tree = camelyon17_tree(tmp_path, sources)
    options = TrainOptions(data=f"camelyon17={tree}")
    train, val = train_and_val_slides(options, get_engine("none").init())
    assert "left out 6 positive slides without a lesion annotation" in capsys.readouterr().err
    assert len(train) + len(val) == 12
    # validation holds an annotated and a negative slide, not one whole centre
    assert {xml is None for _, xml in val} == {True, False}
    assert len({tif.parent.name for tif, _ in val}) > 1


def test_train_cli_names_a_missing_folder_in_one_line(tmp_path, capsys):
    from histoseg.train.cli import main

    argv = [*TINY, "--data", f"camelyon17={tmp_path}", "--run-dir", str(tmp_path / "r")]
    assert run_main(main, argv) == 2
    err = capsys.readouterr().err
    assert "no CAMELYON17 centre folders" in err and err.count("\n") == 1
