"""Whole-slide inference: a trained checkpoint over slides, streamed to disk at bounded memory.

Public API: :func:`~histoseg.infer.run.infer_slide`, :class:`~histoseg.infer.run.InferSettings`,
:func:`~histoseg.infer.model.find_checkpoint`, :func:`~histoseg.infer.model.build_tile_model`;
CAMELYON16's slide- and lesion-level metrics live in :mod:`histoseg.infer.camelyon_metrics`.
The command line is ``python -m histoseg.infer`` (``histoseg infer``).
"""
