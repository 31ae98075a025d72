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
    import calibatt.kernels.attention.triton_fwd as TA
    import calibatt.kernels.block_energy.triton_fwd as TS
    import calibatt.kernels.triton_common as TC
    # The shared pieces first: both kernel modules call its @triton.jit helpers.
    if not (isinstance(TC.load_tile, interp.InterpretedFunction)
            and isinstance(TA._sparse_video_fwd, interp.InterpretedFunction)
            and isinstance(TS._block_mass, interp.InterpretedFunction)
            and TS.load_tile is TC.load_tile and TA.load_tile is TC.load_tile):
        TC = importlib.reload(TC)
        TA = importlib.reload(TA)
        TS = importlib.reload(TS)
    return TA, TS
