"""Calibrate Sparse Attention's input handling: settings from presets, prompt pairs from CONDITIONING."""

import pytest
import torch

from calibatt.calibration.settings import EPS_PRESETS
from calibatt.nodes.calibrate_inputs import MAX_NAME, bundle_file_name, make_settings, prompt_conditionings


def test_presets_and_custom_eps():
    s = make_settings("quality", 0.1, 0.2, 3.0, 0.6, 32, 5, 20, "euler")
    assert s.eps_params() == EPS_PRESETS["quality"]  # eps_* are ignored unless the preset is custom
    assert (s.rho, s.block_q, s.block_k, s.seed, s.steps, s.sampler) == (0.6, 32, 32, 5, 20, "euler")
    c = make_settings("custom", 0.7, 0.95, 8.0, 0.5, 128, 0, 30, "uni_pc")
    assert c.eps_params() == (0.7, 0.95, 8.0)
    assert c.preset == "custom"  # recorded as given (it was recorded as "balanced")
    assert c.eps(0, 30) == pytest.approx(0.95)
    with pytest.raises(ValueError, match="A <= C"):
        make_settings("custom", 0.99, 0.5, 8.0, 0.5, 128, 0, 30, "euler")
    assert s.selection == "row"  # the optional input left out: per-row selection, as before it existed
    assert make_settings("fast", 0, 0, 0, 0.5, 128, 0, 30, "euler", "global").selection == "global"
    with pytest.raises(ValueError, match="selection .*sideways"):
        make_settings("fast", 0, 0, 0, 0.5, 128, 0, 30, "euler", "sideways")


def test_each_positive_entry_is_one_prompt_with_a_zero_negative():
    g = torch.Generator().manual_seed(0)
    pos = [[torch.randn(1, 512, 64, generator=g), {}], [torch.randn(1, 512, 64, generator=g), {"x": 1}]]
    pairs = prompt_conditionings("", positive=pos)
    assert len(pairs) == 2
    for (p, n), entry in zip(pairs, pos):
        assert p == [entry]
        assert torch.equal(n[0][0], torch.zeros_like(entry[0])) and n[0][1] == entry[1]
    neg = [[torch.randn(1, 512, 64, generator=g), {}]]
    assert all(n is neg for _, n in prompt_conditionings("  \n", positive=pos, negative=neg))


def test_prompt_errors_say_what_to_connect():
    with pytest.raises(ValueError, match="connect the CLIP"):
        prompt_conditionings("a cat\na dog")
    with pytest.raises(ValueError, match="no calibration prompts"):
        prompt_conditionings("\n \n")


def test_output_names_are_checked_before_calibration():
    assert bundle_file_name("wan21_t2v_832x480x81") == "wan21_t2v_832x480x81.safetensors"
    assert bundle_file_name("  v1.2-final.safetensors ") == "v1.2-final.safetensors"
    assert bundle_file_name("x" * MAX_NAME) == "x" * MAX_NAME + ".safetensors"
    # ~225 characters passed and failed with ENAMETOOLONG at the save, after hours of calibration
    with pytest.raises(ValueError, match=f"225 characters long; use at most {MAX_NAME}"):
        bundle_file_name("n" * 225)
    for bad, needle in (("my bundle", "' '"), ("../up", "'/'"), ("a\\b", "'\\\\'"), ("tab\there", "'\\t'"),
                        ("caf\u00e9", "'\u00e9'")):
        with pytest.raises(ValueError, match="characters a bundle name cannot use") as e:
            bundle_file_name(bad)
        assert needle in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="e.g. 'my_bundle'"):
        bundle_file_name("my bundle")
    for bad, needle in (("", "empty"), ("   ", "empty"), (".hidden", "starts or ends"), ("CON", "reserved"),
                        ("nul.v2", "reserved")):
        with pytest.raises(ValueError, match=needle):
            bundle_file_name(bad)
