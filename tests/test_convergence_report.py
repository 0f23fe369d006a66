"""``distillbench.convergence``: where a curve stops improving and whether it ends at its best, on curves
made by hand (the command on a real suite: tests/test_leaderboard.py)."""

from __future__ import annotations

import pandas as pd
import pytest
from omegaconf import OmegaConf

from distillbench.convergence import by_point, check_finished, settle
from distillbench.errors import ConfigError


def curves(method: str, per_seed: list[list[float]], gap: list[float] | None = None) -> pd.DataFrame:
    rows = []
    for seed, fids in enumerate(per_seed):
        for point, fid in enumerate(fids):
            log_gap = -gap[point] + 0.01 * seed if gap else 0.01 * seed
            rows.append({"method": method, "seed": seed, "point": point, "kimg": 2.0 * point,
                         "tfe": 100.0 * point, "fid": fid, "log_density_gap": log_gap})  # fmt: skip
    return pd.DataFrame(rows)


def test_a_curve_that_falls_then_rises_ends_worse_than_its_best():
    noise = [0.0, 0.05, -0.05]
    table = curves("up", [[9 + e, 5 + e, 2 + e, 2.05 + e, 4 + e] for e in noise])
    row = settle(by_point(table), "fid").iloc[0]
    assert row.best_kimg == 4.0 and row.reached_kimg == 4.0 and row.end_kimg == 8.0
    assert row.end_verdict == "worse" and row.best_mean == pytest.approx(2.0)
    assert not row.improving_at_end


def test_a_curve_that_reaches_a_plateau_ends_tied_and_stops_improving_where_the_plateau_starts():
    noise = [0.0, 0.3, -0.3]
    table = curves("flat", [[9 + e, 3 + e, 2.2 + e, 2.0 + e, 2.1 + e] for e in noise])
    row = settle(by_point(table), "fid").iloc[0]
    assert row.best_kimg == 6.0 and row.reached_kimg == 4.0 and row.end_verdict == "tied"


def test_a_curve_whose_best_evaluation_is_its_last_has_not_stopped_improving():
    table = curves("down", [[9 + e, 5 + e, 3 + e, 2 + e] for e in (0.0, 0.05, -0.05)])
    row = settle(by_point(table), "fid").iloc[0]
    assert row.improving_at_end and row.end_verdict == "best"


def test_the_log_density_gap_is_judged_by_its_distance_from_zero():
    noise = [0.0, 0.05, -0.05]
    table = curves("gap", [[1.0, 1.0, 1.0] for _ in noise], gap=[0.3, -0.01, -2.0])
    row = settle(by_point(table), "log_density_gap").iloc[0]
    assert row.best_kimg == 2.0 and row.end_verdict == "worse"


def test_reading_a_suite_whose_cells_are_not_finished_names_the_command_that_runs_them(tmp_path):
    suite = OmegaConf.create({"name": "s", "seeds": [0], "methods": {"sim": ["method=sim"]}})
    with pytest.raises(ConfigError, match="python -m distillbench.leaderboard suite=s"):
        check_finished(suite, tmp_path)
