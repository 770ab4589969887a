"""The autoscaling simulation, briefly (every duration a fifth of the benchmark's): the scaler's
own code drives the fleet through KEDA's and the HPA's loop from zero and back to zero."""
from __future__ import annotations

import pytest

from loadtests import sim_autoscale


@pytest.mark.slow
def test_the_ttft_scaler_beats_the_queue_depth_recipe_and_scales_to_zero():
    r = sim_autoscale.main_run(seed=3, k=0.2, oracle_s=30.0, startups=(25.0,))
    ours, peer, floor = r["ttft_scaler"], r["queue_depth"], r["foresight_through_loop"]
    assert ours["windows"] >= 50 and ours["windows"] == peer["windows"]
    assert ours["attainment"] > peer["attainment"]
    assert ours["replica_minutes_vs_oracle"] < peer["replica_minutes_vs_oracle"]
    assert ours["reversals"] <= peer["reversals"]
    assert ours["attainment"] >= 0.85 and ours["replica_minutes_vs_oracle"] <= 2.2
    assert ours["peak_replicas"] >= 12 and ours["final_replicas"] == 0 and ours["refused"] == 0
    assert floor["attainment"] >= 0.95  # knowing the future meets the SLO through the same loop
    assert set(r["meets_bars"]) == {"startup_25s"}
