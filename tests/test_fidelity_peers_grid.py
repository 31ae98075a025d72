"""bench/fidelity_peers.py's calibration grid: one dense pass fanned out to several calibrators, driven by
calibrate() like every host. Each bundle must equal the one its calibrator makes when it runs alone through the
tiny model's own calibration (tinywan/evaluate.run_calibration), so the benchmark's numbers are the product's."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
from fidelity_peers import calibrate_grid  # noqa: E402

from calibatt.calibration import CalibrationSettings  # noqa: E402
from calibatt.calibration.calibrator import Calibrator  # noqa: E402
from calibatt.tinywan import data, evaluate  # noqa: E402
from calibatt.tinywan.model import load_tinywan  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fanned_out_grid_equals_each_calibrator_alone():
    model = load_tinywan(name="tinywan")
    frames, steps, guidance, block = 4, 2, 2.0, 64
    grid = model.cfg.grid(frames=frames)
    caps, seeds = data.training_captions(2), [1000, 1001]
    cals, bundles = calibrate_grid(model, grid, caps, seeds, steps=steps, guidance=guidance, block=block,
                                   frames=frames, eps_grid=[0.8, 0.95], selections=["row", "global"], rho=0.5)
    assert sorted(bundles) == sorted(cals) == [("global", 0.8), ("global", 0.95), ("row", 0.8), ("row", 0.95)]
    assert all(c.state().prompt_keys == ["A0", "A1"] for c in cals.values())
    for key in (("row", 0.95), ("global", 0.8)):
        sel, e = key
        st = CalibrationSettings(preset="custom", A=e, C=e, k=0.0, block_q=block, block_k=block, steps=steps,
                                 rho=0.5, selection=sel)
        alone = evaluate.run_calibration(model, Calibrator(model.signature(), grid, st, background=False), caps,
                                         steps=steps, seeds=seeds, guidance=guidance, frames=frames)
        assert bundles[key].content_hash() == alone.content_hash(), key
    # the grid really spans densities: a lower eps keeps fewer blocks
    assert bundles[("row", 0.8)].entry_densities().mean() < bundles[("row", 0.95)].entry_densities().mean()
