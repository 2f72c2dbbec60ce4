"""Keep Keras's torch backend from holding a step's tensors until Python's garbage collector.

Keras 3.15's tree utilities on the torch backend (``keras.src.tree.torchtree_impl``:
``traverse`` and ``_dict_to_ordered_dict``, which every layer call goes through) flatten one
level of a structure with ``torch.utils._pytree.tree_flatten(structure, is_leaf=lambda x: x
is not structure)``. PyTorch's ``tree_flatten`` recurses through a nested function that
refers to itself, a reference cycle, and that cycle holds the ``is_leaf`` closure and through
it ``structure``: the layer's input and output tensors. Reference counting never frees them;
the cyclic garbage collector does, whenever it next runs. In a plain step that costs little
(the activations are kept for the backward pass anyway), but under remat it keeps every
recomputed activation alive past its block's backward pass: a torch-backend step with remat
peaked at about the memory of one without (xception65 256 px on the CPU: 1325 MiB with
``blocks``, 1318 MiB with none), and how much it held depended on when the collector ran.

:func:`apply` swaps in the two functions with ``is_leaf`` comparing identities instead, so
the closure holds an integer (the fix proposed upstream in keras-team/keras#23206, for
keras-team/keras#23110). It is applied where histoseg selects the torch backend and
is a no-op on a Keras whose functions no longer capture the structure.
"""

from __future__ import annotations

from collections import defaultdict


def _sorted_dicts(x):
    if type(x) is dict:
        return {k: x[k] for k in sorted(x)}
    if type(x) is defaultdict:
        return defaultdict(x.default_factory, {k: x[k] for k in sorted(x)})
    return None


def apply() -> bool:
    """Patch ``keras.src.tree.torchtree_impl`` (see the module docstring); True if patched."""
    from keras.src.tree import torchtree_impl as impl

    torch_tree = impl.torch_tree
    original = impl.traverse
    if getattr(original, "__histoseg_fixed__", False):
        return False
    source = _source(original)
    if source and "x is not structure" not in source:
        return False  # a Keras without the cycle (without its source: patched anyway)

    def children_of(structure):
        top = id(structure)  # an int in the closure, not the structure
        return torch_tree.tree_flatten(structure, is_leaf=lambda x: id(x) != top)

    def dict_to_ordered_dict(structure):
        ordered = _sorted_dicts(structure)
        if ordered is not None:
            return ordered
        children, spec = children_of(structure)
        if spec.num_nodes == 1 and spec.num_leaves == 1:
            return structure
        return torch_tree.tree_unflatten([dict_to_ordered_dict(c) for c in children], spec)

    def traverse(func, structure, top_down=True):
        def traverse_children(node):
            children, spec = children_of(node)
            if spec.num_nodes == 1 and spec.num_leaves == 1:
                return node
            return torch_tree.tree_unflatten(
                [traverse(func, c, top_down=top_down) for c in children], spec
            )

        structure = dict_to_ordered_dict(structure)
        if top_down:
            ret = func(structure)
            if ret is None:
                return traverse_children(structure)
        else:
            structure = traverse_children(structure)
            ret = func(structure)
            if ret is None:
                return structure
        if isinstance(ret, type) and ret.__name__ == "MAP_TO_NONE":
            return None
        return ret

    traverse.__histoseg_fixed__ = True
    impl.traverse = traverse
    impl._dict_to_ordered_dict = dict_to_ordered_dict
    return True


def _source(function) -> str:
    import inspect

    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return ""
