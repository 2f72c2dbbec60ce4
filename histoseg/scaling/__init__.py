"""What adding workers buys: weak-scaling efficiency projected by a cost model.

``model`` is the ring-allreduce model and ``stragglers`` its slowest-of-N term; both take
numbers. ``measured`` reads those numbers off the rows ``bench.scaling`` writes, and
``python -m histoseg.scaling`` (``__main__``) prints a projection from either.
"""
