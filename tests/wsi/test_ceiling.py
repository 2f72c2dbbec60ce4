"""The Bayes ceiling of the synthetic tasks per patch size."""

from __future__ import annotations

import math

import numpy as np
import pytest

from histoseg.cli import run_main
from histoseg.errors import ConfigError
from histoseg.wsi.ceiling import bayes_ceiling, ceiling_from_counts, main
from histoseg.wsi.synth import dataset_designs

SIZE_PX = (2048, 1536)


@pytest.fixture(scope="module")
def designs():
    return {
        task: list(dataset_designs(3, SIZE_PX, seed=0, task=task).values())
        for task in ("local", "context")
    }


def test_ceiling_is_one_at_every_patch_size_on_the_local_task(designs):
    for patch_px in (32, 64, 256):
        ceiling = bayes_ceiling(designs["local"], patch_px, min_tissue=0.5)
        assert ceiling.accuracy == 1.0 and ceiling.miou == 1.0, patch_px
        assert ceiling.tumour_fraction > 0


def test_ceiling_rises_with_patch_size_on_the_context_task(designs):
    cells = [bayes_ceiling(designs["context"], p, min_tissue=0.5) for p in (32, 64, 128, 256)]
    mious = [c.miou for c in cells]
    assert mious == sorted(mious), mious
    assert mious[0] < 0.8 and mious[-1] > 0.95, mious
    # small patches cannot see the margin from inside a lesion: the rule calls them normal
    assert not cells[0].undecided_as_tumour and cells[0].iou_tumour < 0.65
    assert [c.decidable_fraction for c in cells] == sorted(c.decidable_fraction for c in cells)


def test_ceiling_of_given_patches_only(designs):
    design = designs["context"][0]
    lesion = design.lesions[0]
    cx, cy = lesion.outline.mean(axis=0)
    centre = [(int(cx) - 16, int(cy) - 16)]  # a 32 px patch deep inside the lesion
    blind = bayes_ceiling(design, 32, [centre])
    assert blind.decidable_fraction == 0 and blind.tumour_fraction == 1.0
    # with a glass patch beside it, both look the same (no evidence) and get one answer
    both = bayes_ceiling(design, 32, [[*centre, (0, 0)]])
    assert both.pixels == 2 * 32 * 32 and both.accuracy == 0.5


def test_bayes_rule_on_hand_made_counts():
    # (pixels, tumour pixels, holds evidence): 100 decided; 100 undecided, 30 of them tumour
    ceiling = ceiling_from_counts(10, np.array([[100, 40, 1], [100, 30, 0]]))
    assert ceiling.accuracy == pytest.approx(170 / 200)
    assert not ceiling.undecided_as_tumour
    assert ceiling.iou_tumour == pytest.approx(40 / 70)
    assert ceiling.miou == pytest.approx((40 / 70 + 130 / 160) / 2)  # TN 130, FN 30
    no_tumour = ceiling_from_counts(10, np.array([[50, 0, 0]]))
    assert no_tumour.accuracy == 1.0 and math.isnan(no_tumour.iou_tumour)
    assert no_tumour.miou == 1.0
    with pytest.raises(ConfigError, match="at least one patch"):
        ceiling_from_counts(10, np.zeros((0, 3)))


def test_cli_prints_a_table_and_rejects_bad_sizes(capsys):
    argv = ["--task", "context", "--slides", "2", "--size", "1024x768", "--sizes", "64", "256"]
    assert run_main(main, argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["patch", "px"] and len(lines) == 3
    assert run_main(main, [*argv[:-3], "--sizes", "4096"]) == 2
    err = capsys.readouterr().err
    assert "4096" in err and err.count("\n") == 1
