"""A memory sweep's rows as tables (fixed-width for the terminal, Markdown for docs/), and
the ``--device-memory`` answer: the largest patch (or inference tile) that fits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from histoseg.config import StepConfig
from histoseg.memory.devices import format_bytes
from histoseg.results import config_key


def _num(n: Any, scale: float, digits: int = 2) -> str:
    return "-" if n is None else f"{n / scale:.{digits}f}"


def _pct(measured: Any, predicted: Any) -> str:
    if not measured or predicted is None:
        return "-"
    return f"{100 * (predicted - measured) / measured:+.1f}%"


def config_label(config: dict[str, Any]) -> str:
    """A config's model and step in a few characters: ``mobilenetv2@0.35 os8 sgd`` (no
    optimizer for a forward pass: ``xception65 os16``; a patch cut across 4 ranks:
    ``xception65 os16 adam /4``; group or frozen batch norm: ``resnet50+group os16 adam``)."""
    options = config.get("backbone_options") or {}
    alpha, norm = options.get("alpha"), options.get("norm")
    backbone = config["backbone"] + (f"@{alpha:g}" if alpha else "") + (f"+{norm}" if norm else "")
    optimizer = config.get("optimizer", "adam")
    slabs = config.get("spatial_workers", 1)
    return (
        f"{backbone} os{config['output_stride']}"
        + (f" {optimizer}" if optimizer else "")
        + (f" /{slabs}" if slabs > 1 else "")
    )


def mode_of(config: dict[str, Any]) -> str:
    """ "train" (a train step; rows made before modes existed have no key) or "infer"."""
    return str(config.get("mode") or "train")


def spread(row: dict[str, Any], figure: str) -> float | None:
    """(max - min) / median of ``figure`` over the processes of a repeated row, or None."""
    runs = [r[figure] for r in (row.get("extra") or {}).get("repeats") or [] if r.get(figure)]
    if len(runs) < 2:
        return None
    runs.sort()
    return (runs[-1] - runs[0]) / runs[(len(runs) - 1) // 2]


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table of a sweep's rows: memory measured vs predicted, speed, status.

    Memory columns are in GB when any peak reaches 1 GB, else in MB. "err" is
    (predicted - measured) / measured; "mode" train (a train step) or infer (a forward
    pass, whose "act" is its peak less what was held before it); "by" the route of the
    prediction (a: analytic,
    c: calibrated); "spread" the activation and peak spread over a repeated row's
    processes. Status "predicted" marks a row that was predicted but not measured (it
    would not fit, or --predict-only); the reason is listed below.
    """
    peaks = [
        (r.get(section) or {}).get("peak_bytes") or 0
        for r in rows
        for section in ("measured", "predicted")
    ]
    unit, scale = ("GB", 1e9) if max(peaks, default=0) >= 1e9 else ("MB", 1e6)
    head = (
        f"{'patch':>5} {'batch':>5} {'mode':<5} {'model':<25} {'precision':<14} {'remat':<6} "
        f"{'dev':<3} "
        f"{'status':<9} {'act ' + unit:>7} {'pred':>7} {'err':>6} {'peak ' + unit:>7} "
        f"{'pred':>7} {'err':>6} {'by':>2} {'spread':>9} {'rss ' + unit:>7} {'step s':>7} "
        f"{'MP/s':>6}"
    )
    lines = [head, "-" * len(head)]
    notes = []
    for r in rows:
        c, m, p = r["config"], r.get("measured", {}), r.get("predicted") or {}
        status = "predicted" if r["status"] == "skipped" and p else r["status"]
        act_spread, peak_spread = spread(r, "activation_bytes"), spread(r, "peak_bytes")
        spreads = (
            "-" if act_spread is None else f"{100 * act_spread:.1f}/{100 * (peak_spread or 0):.1f}%"
        )
        lines.append(
            f"{c['patch_size']:>5} {c['batch_size']:>5} {mode_of(c):<5} {config_label(c):<25} "
            f"{c['precision']:<14} {c['remat']:<6} {c['device']:<3} {status:<9} "
            f"{_num(m.get('activation_bytes'), scale):>7} "
            f"{_num(p.get('activation_bytes'), scale):>7} "
            f"{_pct(m.get('activation_bytes'), p.get('activation_bytes')):>6} "
            f"{_num(m.get('peak_bytes'), scale):>7} {_num(p.get('peak_bytes'), scale):>7} "
            f"{_pct(m.get('peak_bytes'), p.get('peak_bytes')):>6} "
            f"{str(p.get('method', 'analytic'))[0] if p else '-':>2} {spreads:>9} "
            f"{_num(m.get('rss_peak_bytes'), scale):>7} "
            f"{_num(m.get('step_s'), 1):>7} {_num(m.get('megapixels_per_s'), 1, 3):>6}"
        )
        if r["status"] != "ok":
            what = (
                f"{c['patch_size']} px batch {c['batch_size']} {mode_of(c)} {config_label(c)} "
                f"{c['precision']} remat {c['remat']} {c['device']}"
            )
            notes.append(f"  {what}: {r['status']}: {r['reason']}")
    return "\n".join(lines + (["", "not measured:", *notes] if notes else []))


def _net_of_waste(measured: Any, waste: Any) -> Any:
    return None if measured is None or waste is None else measured - waste


def _activation_range(row: dict[str, Any]) -> str:
    """The activation range of a row measured in several processes, as
    ``" (min–max, N runs)"`` in GB; ``""`` for a row of one process."""
    runs = [r["activation_bytes"] for r in (row.get("extra") or {}).get("repeats") or []]
    if len(runs) < 2:
        return ""
    return f" ({_num(min(runs), 1e9, 3)}–{_num(max(runs), 1e9, 3)}, {len(runs)} runs)"


def summary_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Measured vs predicted activation and peak bytes (GB) as a Markdown table.

    Rows measured with ``--allocator-trace`` also get "net err": the prediction of the
    bytes the tensors ask for (``requested_*``) against the measurement net of the
    allocator's chunk waste, i.e. the request model checked apart from the allocator model.
    Rows measured in several processes (``--repeats``) show the range of their activation
    figures beside the median process's.
    """
    lines = [
        "| patch px | batch | mode | model | precision | remat | status | activations GB "
        "measured | predicted | error | net err | step peak GB measured | predicted | "
        "error | net err | route | RSS peak GB | step s | MP/s |",
        "| ---: | ---: | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | "
        "---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        c, m, p = r["config"], r.get("measured", {}), r.get("predicted", {})
        trace = (r.get("extra") or {}).get("allocator_trace") or {}
        act_net = _net_of_waste(
            m.get("activation_bytes"), trace.get("activation_chunk_waste_bytes")
        )
        peak_net = _net_of_waste(m.get("peak_bytes"), trace.get("peak_chunk_waste_bytes"))
        status = "predicted" if r["status"] == "skipped" and p else r["status"]
        lines.append(
            f"| {c['patch_size']} | {c['batch_size']} | {mode_of(c)} | {config_label(c)} | "
            f"{c['precision']} | "
            f"{c['remat']} | {status} | {_num(m.get('activation_bytes'), 1e9, 3)}"
            f"{_activation_range(r)} | {_num(p.get('activation_bytes'), 1e9, 3)} | "
            f"{_pct(m.get('activation_bytes'), p.get('activation_bytes'))} | "
            f"{_pct(act_net, p.get('requested_activation_bytes'))} | "
            f"{_num(m.get('peak_bytes'), 1e9, 3)} | {_num(p.get('peak_bytes'), 1e9, 3)} | "
            f"{_pct(m.get('peak_bytes'), p.get('peak_bytes'))} | "
            f"{_pct(peak_net, p.get('requested_peak_bytes'))} | "
            f"{p.get('method', 'analytic') if p else '-'} | "
            f"{_num(m.get('rss_peak_bytes'), 1e9)} | {_num(m.get('step_s'), 1)} | "
            f"{_num(m.get('megapixels_per_s'), 1, 3)} |"
        )
    return "\n".join(lines)


def largest_patches(
    configs: Sequence[StepConfig], memory_bytes: int, rows: Sequence[dict[str, Any]] = ()
) -> list[tuple[StepConfig, int | None, int | None]]:
    """For each distinct config apart from patch size: the largest patch that fits (for a
    forward pass, mode infer, the largest inference tile). A patch cut across ranks is
    answered from the slab law fitted to the measured ``rows`` of its config at other rank
    counts and sizes (:func:`histoseg.memory.calibrate.slab_law_prediction`; the most loaded rank
    must fit); with too few such rows its answer is None and its peak None."""
    from histoseg.memory.estimate import estimate, estimate_inference, largest_patch

    seen: dict[str, tuple[StepConfig, int | None, int | None]] = {}
    for config in configs:
        key = config_key({**config.as_dict(), "patch_size": None, "threads": None, "device": None})
        if key in seen:
            continue
        if config.spatial_workers > 1:
            seen[key] = (config, *_largest_slab_patch(config, memory_bytes, rows))
            continue
        kwargs: dict[str, Any] = dict(
            batch_size=config.batch_size,
            backbone=config.backbone,
            output_stride=config.output_stride,
            precision=config.precision,
            device="gpu",  # a card's allocator counts every buffer
            backbone_options=config.backbone_options,
        )
        if config.mode == "train":
            kwargs.update(remat=config.remat, optimizer=config.optimizer)
        predict = estimate_inference if config.mode == "infer" else estimate
        if config.backend == "torch":
            predict = _torch_replay
        once = _PredictOnce(predict)
        best = largest_patch(memory_bytes, mode=config.mode, predict=once, **kwargs)
        seen[key] = (config, best, once(patch_size=best, **kwargs).peak_bytes if best else None)
    return list(seen.values())


def slab_points(
    config: StepConfig, rows: Sequence[dict[str, Any]]
) -> list[tuple[int, int, dict[str, Any]]]:
    """``(patch_size, spatial_workers, measured section)`` of the measured rows of
    ``config`` cut across 2 or more ranks, any patch size and rank count."""

    def key(c: dict[str, Any]) -> str:
        c = {**c, "patch_size": None, "spatial_workers": None, "threads": None}
        return config_key(c)

    want = key(config.as_dict())
    return [
        (r["config"]["patch_size"], r["config"]["spatial_workers"], r["measured"])
        for r in rows
        if r.get("kind") == "memory"
        and r.get("status") == "ok"
        and r["config"].get("spatial_workers", 1) > 1
        and key(r["config"]) == want
    ]


def _largest_slab_patch(
    config: StepConfig, memory_bytes: int, rows: Sequence[dict[str, Any]]
) -> tuple[int | None, int | None]:
    from types import SimpleNamespace

    from histoseg.errors import ConfigError
    from histoseg.memory.calibrate import peak_from_activations, slab_law_prediction
    from histoseg.memory.estimate import largest_patch

    points = slab_points(config, rows)
    n = config.spatial_workers
    from_activations = peak_from_activations(n, config.remat)

    def predict(patch_size: int, **_: Any) -> Any:
        law = slab_law_prediction(points, patch_size, n, peak_from_activations=from_activations)
        return SimpleNamespace(peak_bytes=law["peak_bytes"])

    try:
        predict(n * config.output_stride)
    except ConfigError:
        return None, None
    best = largest_patch(
        memory_bytes, step_px=n * config.output_stride, predict=predict, max_patch_size=65536
    )
    return best, None if best is None else predict(best).peak_bytes


class _PredictOnce:
    """``predict`` run once per patch size: the search's answer reuses its own prediction
    (a torch replay takes seconds)."""

    def __init__(self, predict: Any):
        self._predict = predict
        self._by_size: dict[int, Any] = {}

    def __call__(self, patch_size: int, **config: Any) -> Any:
        if patch_size not in self._by_size:
            self._by_size[patch_size] = self._predict(patch_size=patch_size, **config)
        return self._by_size[patch_size]


def _torch_replay(**config: Any):
    """The torch backend's prediction, replayed (:mod:`histoseg.memory.torch_replay`)."""
    from histoseg.memory.torch_replay import replay

    return replay(StepConfig(backend="torch", **config))


def print_largest_patches(
    configs: Sequence[StepConfig], memory_bytes: int, rows: Sequence[dict[str, Any]] = ()
) -> None:
    """The ``--device-memory`` answer: train steps first, then inference tiles (a patch
    cut across ranks: per rank, from the slab law fitted to ``rows``)."""
    answers = largest_patches(configs, memory_bytes, rows)
    headers = {
        "train": "largest patch whose predicted step peak fits",
        "infer": "largest inference tile whose predicted forward-pass peak fits",
    }
    for mode, header in headers.items():
        rows = [a for a in answers if a[0].mode == mode]
        if rows:
            print(f"\n{header} {format_bytes(memory_bytes)}:")
        for config, best, peak in rows:
            what = "torch: " if config.backend == "torch" else ""
            what += f"{config.backbone} OS{config.output_stride} {config.precision} "
            what += (
                f"remat {config.remat} batch {config.batch_size} {config.optimizer}"
                if mode == "train"
                else f"batch {config.batch_size}"
            )
            if config.spatial_workers > 1:
                what += f", {config.spatial_workers} ranks (per rank; slab law of measured rows)"
            if best is None and peak is None and config.spatial_workers > 1:
                answer = "unknown: measure it at 2+ rank counts and sizes first (--calibrate)"
            else:
                answer = "none (not even the smallest)" if best is None else f"{best} px"
            print(f"  {what}: {answer} (predicted peak {format_bytes(peak)})")
