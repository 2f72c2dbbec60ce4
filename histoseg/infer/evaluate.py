"""`python -m histoseg.infer.evaluate`: CAMELYON16's slide AUC and lesion FROC of a run.

Reads the JSON summaries ``histoseg.infer`` wrote (slide score, lesion candidates) and the
slides' ASAP XML (a slide without one is normal), and prints the two metrics.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from histoseg.cli import ArgumentParser, printable, run_main
from histoseg.errors import ConfigError

EPILOG = """\
Examples:
  python -m histoseg.infer.evaluate --summaries out/ --annotations data/synthetic
  python -m histoseg.infer.evaluate --summaries out/ --annotations data/synthetic --json m.json
"""


def load_summaries(folder: Path) -> list[dict]:
    """Every ``histoseg.infer/1`` summary in ``folder`` (other JSON files are skipped)."""
    from histoseg.infer.run import SUMMARY_SCHEMA

    if not folder.is_dir():
        raise ConfigError(f"--summaries {printable(folder)}: not a folder")
    found = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("schema") == SUMMARY_SCHEMA:
            found.append(data)
    if not found:
        raise ConfigError(f"--summaries {printable(folder)}: no {SUMMARY_SCHEMA} summaries there")
    return found


def slide_lesions(summary: dict, annotations_dir: Path):
    """(is tumour slide, SlideLesions) of one summary against its slide's annotations."""
    from histoseg.infer import camelyon_metrics as cm
    from histoseg.wsi.annotations import Annotations

    stem = Path(summary["slide"]).stem
    annotations = Annotations.from_xml(annotations_dir / f"{stem}.xml")
    if not annotations.has_tumor:
        return False, cm.score_detections(summary["detections"], None)
    width, height = summary["dimensions_px"]
    cell = cm.EVALUATION_CELL_PX0
    tumour = annotations.rasterize((0, 0, width, height), cell) == 1
    cell_um = cell * float(summary["mpp"])
    labels = cm.evaluation_mask(tumour, cell_um)
    itc = cm.itc_labels(labels, cell_um)
    return True, cm.score_detections(summary["detections"], labels, cell, itc)


def evaluate(summaries: list[dict], annotations_dir: Path) -> dict:
    """Slide AUC, FROC score and its six sensitivities, with the counts behind them."""
    from histoseg.infer import camelyon_metrics as cm

    labels, scores, lesions = [], [], []
    for summary in summaries:
        is_tumour, scored = slide_lesions(summary, annotations_dir)
        labels.append(is_tumour)
        scores.append(float(summary["slide_score"]))
        lesions.append(scored)
    froc, sensitivities = cm.froc_score(lesions)
    return {
        "slides": len(summaries),
        "tumour_slides": int(sum(labels)),
        "lesions": sum(s.lesions for s in lesions),
        "false_positives": sum(len(s.false_positive_probs) for s in lesions),
        "slide_auc": cm.slide_auc(labels, scores),
        "froc": froc,
        "sensitivity_at_fp_rates": dict(zip(map(str, cm.FP_RATES), sensitivities, strict=True)),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m histoseg.infer.evaluate",
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--summaries", required=True, type=Path, help="histoseg.infer --out folder")
    p.add_argument("--annotations", required=True, type=Path, help="folder of ASAP XML files")
    p.add_argument("--json", type=Path, help="also write the metrics here")
    p.add_argument("--force", action="store_true", help="overwrite --json")
    args = p.parse_args(argv)
    if not args.annotations.is_dir():
        raise ConfigError(f"--annotations {printable(args.annotations)}: not a folder")
    if args.json is not None:
        from histoseg.cli import check_output

        check_output(args.json, force=args.force, option="--json")
    result = evaluate(load_summaries(args.summaries), args.annotations)
    print(
        f"{result['slides']} slides ({result['tumour_slides']} with tumour, "
        f"{result['lesions']} lesions beyond ITC): slide AUC {result['slide_auc']:.3f}, "
        f"FROC {result['froc']:.3f} (sensitivity at 1/4..8 FP per slide: "
        + ", ".join(f"{v:.2f}" for v in result["sensitivity_at_fp_rates"].values())
        + ")"
    )
    if args.json is not None:
        from histoseg.results import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
