"""Spatial parallelism: one patch cut into horizontal slabs, one per rank (issue 16).

Every layer that looks at neighbours gets the rows it needs from the neighbouring ranks (a
halo exchange); everything global (batch-norm moments in training, ASPP's image pooling,
the loss) is reduced across the ranks; gradients are summed as in data parallelism. The
result is the same function as the single-rank model (``bench.spatial --check``).

Public API: :class:`SpatialExecutor`, :func:`spatial_gradients`,
:func:`make_spatial_train_step`, :func:`gather_rows`, :class:`HorovodComm`,
:class:`SingleProcess`, :func:`slab_rows`.
"""

from histoseg.spatial.comm import HorovodComm, SingleProcess, under_horovod
from histoseg.spatial.executor import Slab, SpatialExecutor
from histoseg.spatial.slabs import slab_rows
from histoseg.spatial.step import gather_rows, make_spatial_train_step, spatial_gradients

__all__ = [
    "HorovodComm",
    "SingleProcess",
    "Slab",
    "SpatialExecutor",
    "gather_rows",
    "make_spatial_train_step",
    "slab_rows",
    "spatial_gradients",
    "under_horovod",
]
