"""The Triton kernel modules as interpreted functions (CPU), for the interpreter tests. TRITON_INTERPRET=1 must be
set before triton decorates anything (tests/conftest.py does so on machines without CUDA)."""

import importlib

import numpy as np


def interpreted_kernels():
    """(triton_attention, triton_stats), reloaded if an earlier import compiled them for a GPU instead."""
    import triton.runtime.interpreter as interp

    if not getattr(interp, "_calibatt_index_patch", False):
        # Triton 3.6's interpreter turns a scalar loaded from memory into a 1-element numpy array, which numpy 2
        # refuses to int() (breaking `range(0, loaded_count)`): patch that one conversion, once per session.
        orig = interp._patch_lang_tensor

        def patch(tensor, scope):
            orig(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

        interp._patch_lang_tensor = patch
        interp._calibatt_index_patch = True
    import calibatt.kernels.triton_attention as TA
    import calibatt.kernels.triton_stats as TS
    # Attention first: the statistics kernels call its @triton.jit helpers.
    if not (isinstance(TA._load_tile, interp.InterpretedFunction)
            and isinstance(TS._block_mass, interp.InterpretedFunction)
            and TS._load_tile is TA._load_tile):
        TA = importlib.reload(TA)
        TS = importlib.reload(TS)
    return TA, TS
