"""The halo exchange: a rank's slab extended by the rows its neighbours own.

:func:`fetch_rows` returns the global rows a rank asked for (its
:class:`~histoseg.spatial.slabs.Exchange` piece list): its own rows, rows shared by the
other ranks (one allgather of every rank's first ``top`` and last ``bottom`` rows), and
fill rows outside the map. Horovod has no point-to-point transfer; an allgather of the
boundary rows is the simplest exchange, and its volume (``workers`` x the boundary rows)
is small next to a slab.

The gradient is written out (``tf.custom_gradient``): the gradient of each shared row is
summed over the ranks that read it (one allreduce of the stacked boundary gradients) and
added to its owner's rows. Every rank runs that allreduce, also a rank that happens to
read no neighbour's rows, so no rank waits for another that skipped it.
"""

from __future__ import annotations

from histoseg.spatial.slabs import Exchange


def _pad_rows(tensor, before: int, after: int):
    import tensorflow as tf

    if before == 0 and after == 0:
        return tensor
    return tf.pad(tensor, [[0, 0], [before, after], [0, 0], [0, 0]])


def _assemble(local, gathered, pieces, top: int, fill: float):
    import tensorflow as tf

    parts = []
    for piece in pieces:
        if piece.source == "local":
            parts.append(local[:, piece.start : piece.stop])
        elif piece.source == "top":
            parts.append(gathered[piece.rank][:, piece.start : piece.stop])
        elif piece.source == "bottom":
            parts.append(gathered[piece.rank][:, top + piece.start : top + piece.stop])
        else:
            shape = tf.concat([tf.shape(local)[:1], [piece.rows], tf.shape(local)[2:]], 0)
            parts.append(tf.fill(shape, tf.constant(fill, local.dtype)))
    return parts[0] if len(parts) == 1 else tf.concat(parts, axis=1)


def fetch_rows(local, exchange: Exchange, comm, *, name: str, fill: float = 0.0):
    """The rows ``exchange`` plans for this rank, from the local slab ``local`` (NHWC).

    Args:
        local: This rank's slab of the map.
        exchange: The plan from :func:`histoseg.spatial.slabs.exchange_plan`.
        comm: :class:`~histoseg.spatial.comm.HorovodComm` or ``SingleProcess``.
        name: Unique collective name (the same on every rank).
        fill: Value of rows outside the map (0 for convolutions, -inf for max pooling).
    """
    import tensorflow as tf

    pieces = exchange.pieces[comm.rank]
    top, bottom = exchange.top, exchange.bottom
    if top + bottom == 0:  # nothing to exchange: plain ops, plain autodiff
        return _assemble(local, None, pieces, top, fill)
    rows = int(local.shape[1])
    shared = top + bottom

    @tf.custom_gradient
    def run(x):
        send = tf.concat([x[:, :top], x[:, rows - bottom :]], axis=1)
        gathered = comm.gather_values(send, name)

        def grad(d_ext):
            d_local = tf.zeros_like(x)
            d_send = [None] * comm.size
            offset = 0
            for piece in pieces:
                d = d_ext[:, offset : offset + piece.rows]
                offset += piece.rows
                if piece.source == "local":
                    d_local += _pad_rows(d, piece.start, rows - piece.stop)
                    continue
                if piece.source == "fill":
                    continue
                start = piece.start + (top if piece.source == "bottom" else 0)
                padded = _pad_rows(d, start, shared - start - piece.rows)
                previous = d_send[piece.rank]
                d_send[piece.rank] = padded if previous is None else previous + padded
            zeros = tf.zeros_like(send)
            stacked = tf.stack([zeros if d is None else d for d in d_send])
            mine = comm.sum_values(stacked, f"{name}.grad")[comm.rank]
            if top:
                d_local += _pad_rows(mine[:, :top], 0, rows - top)
            if bottom:
                d_local += _pad_rows(mine[:, top:], rows - bottom, 0)
            return d_local

        return _assemble(x, gathered, pieces, top, fill), grad

    return run(local)
