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


def _received(gathered, pieces, top: int):
    """The other ranks' rows this rank reads, in the order of its pieces, as one compact
    tensor; None when it reads none. Copied out of the allgather (``tf.gather`` copies; a
    slice may be a view), so that what the backward pass keeps is these rows, not every
    rank's boundary rows: with slabs thinner than a layer's reach (ASPP's rate-18
    convolution at 4 ranks) the allgather holds ``ranks`` x the slab."""
    import tensorflow as tf

    parts = []
    for piece in pieces:
        if piece.source in ("top", "bottom"):
            first = piece.start + (top if piece.source == "bottom" else 0)
            rows = list(range(first, first + piece.rows))
            parts.append(tf.gather(gathered[piece.rank], rows, axis=1))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else tf.concat(parts, axis=1)


def _assemble(local, received, pieces, fill: float):
    """The rows ``pieces`` plan: this rank's own, the ``received`` ones (in piece order)
    and fill rows outside the map, concatenated."""
    import tensorflow as tf

    parts = []
    offset = 0
    for piece in pieces:
        if piece.source == "local":
            parts.append(local[:, piece.start : piece.stop])
        elif piece.source in ("top", "bottom"):
            parts.append(received[:, offset : offset + piece.rows])
            offset += piece.rows
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
    return halo_apply(local, exchange, comm, lambda rows: rows, name=name, fill=fill)


def halo_apply(local, exchange: Exchange, comm, layer, *, weights=(), name: str, fill: float = 0.0):
    """``layer(rows, *weights)`` on the rows ``exchange`` plans for this rank (see
    :func:`fetch_rows`); differentiable in ``local`` and ``weights``.

    The extended rows are not kept for the backward pass, which assembles them again from
    this rank's slab and the rows it received from its neighbours (a compact copy of just
    those: :func:`_received`). Kept (by the tape, for the layer's gradient) they would be
    a second copy of the slab beside the one the layer before keeps, for every
    convolution. ``layer`` must read no variables: pass them as ``weights`` (tensors),
    whose gradients it returns.
    """
    import tensorflow as tf

    pieces = exchange.pieces[comm.rank]
    top, bottom = exchange.top, exchange.bottom
    if top + bottom == 0:  # nothing to exchange: plain ops, plain autodiff
        return layer(_assemble(local, None, pieces, fill), *weights)
    rows = int(local.shape[1])

    @tf.custom_gradient
    def run(x, *w):
        # Ops on stopped tensors are not recorded by the caller's tape, so it keeps
        # nothing of the forward pass but ``x`` and ``w`` (held by the closure below).
        x, w = tf.stop_gradient(x), [tf.stop_gradient(t) for t in w]
        send = tf.concat([x[:, :top], x[:, rows - bottom :]], axis=1)
        gathered = comm.gather_values(send, name)
        received = _received(gathered, pieces, top)
        y = layer(_assemble(x, received, pieces, fill), *w)
        if received is None:
            # This rank reads none of the gathered rows, but the collective must still run
            # here: a compiled step never runs a collective whose result no op reads as
            # data (a control dependency is not enough), and the other ranks would wait
            # for it forever.
            y = y + tf.cast(tf.reduce_sum(gathered), y.dtype) * 0

        def grad(dy):
            # Assembled from copies that wait for the incoming gradient: otherwise the
            # graph optimiser sees the forward pass's own assembly and convolution again
            # and merges them, keeping the forward's extended rows alive until here.
            with tf.control_dependencies([dy]):
                x_again = tf.identity(x)
                received_again = None if received is None else tf.identity(received)
            extended = _assemble(x_again, received_again, pieces, fill)
            with tf.GradientTape() as tape:
                tape.watch([extended, *w])
                y_again = layer(extended, *w)
            d_ext, *d_w = tape.gradient(y_again, [extended, *w], output_gradients=dy)
            return (_local_gradient(d_ext, x, pieces, exchange, comm, name), *d_w)

        return y, grad

    return run(local, *weights)


def _local_gradient(d_ext, x, pieces, exchange: Exchange, comm, name: str):
    """The gradient of this rank's slab from that of its extended rows: its own rows'
    share plus, for its boundary rows, the sum over the ranks that read them."""
    import tensorflow as tf

    top, bottom = exchange.top, exchange.bottom
    rows = int(x.shape[1])
    shared = top + bottom
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
    zeros = tf.zeros((tf.shape(x)[0], shared, *x.shape[2:]), x.dtype)
    if all(d is None for d in d_send):
        # A rank that read no other rank's rows sends only zeros. Were they a constant,
        # TensorFlow would fold the collective at compile time, running it in this rank's
        # optimizer before the step, where it waits for the other ranks forever.
        zeros += tf.reduce_sum(d_ext) * 0
    stacked = tf.stack([zeros if d is None else d for d in d_send])
    mine = comm.sum_values(stacked, f"{name}.grad")[comm.rank]
    if top:
        d_local += _pad_rows(mine[:, :top], 0, rows - top)
    if bottom:
        d_local += _pad_rows(mine[:, top:], rows - bottom, 0)
    return d_local
