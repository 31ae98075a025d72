"""Calibration: block-energy statistics -> per-step skip lists and repetition plans (plain PyTorch, host-agnostic)."""

from .calibrator import Calibrator, calibrate, prompt_key
from .settings import EPS_PRESETS, CalibrationSettings, eps_spec
from .stats import CalibrationStats, StatsError

__all__ = ["Calibrator", "calibrate", "prompt_key", "EPS_PRESETS", "CalibrationSettings", "eps_spec", "CalibrationStats",
           "StatsError"]
