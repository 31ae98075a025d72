"""The Triton kernel modules as interpreted functions (CPU), for the interpreter tests. TRITON_INTERPRET=1 must be
set before triton decorates anything (tests/conftest.py does so on machines without CUDA)."""

import importlib

import numpy as np


def _fp8_aware(orig):
    import torch
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    as_torch = {tl.float32: torch.float32, tl.float16: torch.float16, tl.bfloat16: torch.bfloat16,
                tl.float8e4nv: torch.float8_e4m3fn}
    stored = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16,
              torch.float8_e4m3fn: np.uint8}

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        s, d = src.dtype.scalar, dst_type.scalar
        if tl.float8e4nv not in (s, d) or s not in as_torch or d not in as_torch:
            return orig(self, src, dst_type, rounding_mode)
        st, dt = as_torch[s], as_torch[d]
        raw = np.ascontiguousarray(src.data)
        t = torch.from_numpy(raw.view(stored[st]) if st in (torch.bfloat16, torch.float8_e4m3fn) else raw)
        t = t.view(st) if st in (torch.bfloat16, torch.float8_e4m3fn) else t
        out = t.to(dt)
        out = out.view(torch.int16 if dt == torch.bfloat16 else torch.uint8) if dt in (
            torch.bfloat16, torch.float8_e4m3fn) else out
        return TensorHandle(out.numpy().view(stored[dt]), d)

    return create_fp_to_fp


def interpreted_kernels():
    """(attention.triton_fwd, block_energy.triton_fwd), reloaded if an earlier import compiled them for a GPU instead."""
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
    if not getattr(interp, "_calibatt_fp8_patch", False):
        # Its float -> e4m3 rounding drops the carry into the exponent (0.49 becomes 0.25: values just under a power
        # of two lose half their size), which the GPU does not do: e4m3 conversions go through torch's instead.
        interp.InterpreterBuilder.create_fp_to_fp = _fp8_aware(interp.InterpreterBuilder.create_fp_to_fp)
        interp._calibatt_fp8_patch = True
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
