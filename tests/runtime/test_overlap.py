"""Hiding communication: the overlapped expert exchange (parallelism.expert_overlap) and the zero-bubble
schedules (zb_h1, zbv: backward split into I and W) compute what the reference model computes (float64), and
their collectives are the plan's, halves, I and W included."""

from __future__ import annotations

import pytest

from lcc.spec import load_spec
from tests.conftest import SPECS
from tests.layouts import OVERLAP_LAYOUTS, ZB_LAYOUTS
from tests.runtime.equivalence import SMALL, assert_run_matches_reference


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", list(OVERLAP_LAYOUTS))
def test_overlapped_exchange_equals_reference(layout, tmp_path, reference, monkeypatch):
    spec = load_spec(SPECS / "tiny-moe.yaml", [*SMALL, *OVERLAP_LAYOUTS[layout]])
    assert_run_matches_reference(spec, tmp_path, reference, monkeypatch, steps=4)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", list(ZB_LAYOUTS))
def test_zero_bubble_schedule_equals_reference(layout, tmp_path, reference, monkeypatch):
    spec = load_spec(SPECS / "tiny-moe.yaml", [*SMALL, *ZB_LAYOUTS[layout]])
    assert_run_matches_reference(spec, tmp_path, reference, monkeypatch, steps=4)
