"""Property: every file derived from a valid bundle either loads and works, or is refused with one BundleError that
names the file, the field and a fix (tests/bundle_fuzz.py has the mutators; `make fuzz` runs >= 10,000 cases)."""

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import bundle_fuzz as fz

pytestmark = pytest.mark.usefixtures("one_thread")

# The crafted amplification files take seconds each to build; test_bundle_hardening.py covers them directly.
_MUTATORS = sorted(m for m in fz.MUTATORS if m != "amplification")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return fz.base_files(tmp_path_factory.mktemp("bases"))


def test_every_base_bundle_is_valid_and_works(bases, tmp_path):
    assert sorted(bases) == sorted(fz.BASE_NAMES)
    for name, data in bases.items():
        assert fz.run_case(data, tmp_path) == ("accepted", ""), name


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(base=st.sampled_from(fz.BASE_NAMES), mutator=st.sampled_from(_MUTATORS),
       rnd=st.randoms(use_true_random=False))
def test_mutated_bundles_load_or_are_refused_clearly(bases, tmp_path, base, mutator, rnd):
    data = fz.MUTATORS[mutator](bases[base], rnd)
    if mutator in fz.RESTAMPED and rnd.random() < 0.6:
        data = fz.restamp(data, rnd)
    outcome, detail = fz.run_case(data, tmp_path)
    assert outcome in ("rejected", "accepted"), f"{outcome}: {detail}"
