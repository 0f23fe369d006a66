"""``python -m distillbench.leaderboard``: suite checks, fairness, resuming a killed suite run, and (slow) a
whole toy2d suite with its table, CSV and figure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from distillbench.config import CONFIG_DIR
from distillbench.errors import ConfigError
from distillbench.leaderboard import (
    check_fair,
    check_readme,
    check_suite,
    collect,
    fairness_record,
    floor_overrides,
    noise_sets,
    settle_cell,
    teacher_overrides,
    train_overrides,
    within_family,
)
from distillbench.methods.accounting import unit_of_config
from distillbench.validation import validate_train_config
from tests.helpers import command_environment, family_table, run_cli, run_here
from tests.helpers import compose as compose_config

#: one method, two seeds, one teacher sampler, a budget of four SIM steps: seconds per cell
SMALL = ["suite=toy2d", *(f"~suite.methods.{name}" for name in ("di", "dmd2", "cd", "ect")),
         "suite.budget_tfe=15000", "suite.teacher_samplers={heun:[2]}"]  # fmt: skip


def suite(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        return compose(config_name="leaderboard", overrides=list(overrides)).suite


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["suite.methods.sim=['method=sim','eval.n=10']"], r"sets \['eval.n=10'\].*fairness"),
        (["suite.methods.sim=['method=sim','teacher=mnist']"], r"sets \['teacher=mnist'\]"),
        (["suite.seeds=[0,0]"], r"suite.seeds=\[0, 0\] must be distinct"),
        (["suite.budget_tfe=0"], r"suite.budget_tfe=0 must be > 0"),
        (["suite.teacher_samplers={heun:[0]}"], r"suite.teacher_samplers.heun=\[0\]"),
    ],
)
def test_bad_suites_fail_before_any_cell_runs(overrides, match):
    with pytest.raises(ConfigError, match=match):
        check_suite(suite("suite=toy2d", *overrides))


SHIPPED = sorted(path.stem for path in (Path(CONFIG_DIR) / "suite").glob("*.yaml"))


def test_every_shipped_suite_passes_its_checks():
    for name in SHIPPED:
        check_suite(suite(f"suite={name}"))


def test_the_gmm_suites_run_every_method_on_three_seeds_and_three_noise_sets_in_student_forwards():
    for name in ("gmm_digits", "gmm_mnist"):
        shipped = suite(f"suite={name}")
        nine = {"sim", "sid", "di", "dmd2", "sida", "cd", "ect", "progressive", "direct"}
        assert set(shipped.methods) == nine
        assert len(shipped.seeds) >= 3 and len(noise_sets(shipped)) >= 3 and shipped.teacher_samplers
        cfg = compose_config("train", train_overrides(shipped, "sim", 0, Path("/tmp")))
        assert unit_of_config(cfg.teacher).name == "SFE" and cfg.teacher._target_.endswith("gmm_teacher")


def test_the_lr_suite_runs_four_score_methods_at_five_rates_on_the_gmm_digits_cells():
    lr, digits = suite("suite=gmm_digits_lr"), suite("suite=gmm_digits")
    assert len(lr.methods) == 4 * 5 and lr.budget_tfe == digits.budget_tfe and lr.eval == digits.eval
    assert lr.seeds == digits.seeds and not lr.teacher_samplers
    assert lr.methods["sim@1e-4"] == [*digits.methods["sim"], "method.lr=1e-4"]
    cfg = compose_config("train", train_overrides(lr, "dmd2@1e-3", 0, Path("/tmp")))
    assert cfg.method.lr == 1e-3 and cfg.method._target_.endswith("DMD2")


def test_a_family_s_settings_are_read_against_its_own_best():
    settings = {"1e-4": 0.0, "1e-3": 0.005, "1e-5": 1.0}
    rows = family_table({"sim": settings, "sid": settings}, repeats=3)
    read = within_family(rows).set_index(["family", "setting"])
    assert sorted(set(read.index.get_level_values(0))) == ["sid", "sim"] and (read["repeats"] == 9).all()
    fid = read["fid_verdict"]
    assert fid[("sim", "1e-4")] == fid[("sid", "1e-4")] == "best"
    assert fid[("sim", "1e-3")] == "tied" and fid[("sim", "1e-5")] == "worse"
    slow = read.loc[("sim", "1e-5")]
    assert slow["fid_mean"] == pytest.approx(3.03) and slow["fid_ci"] > 0
    assert read.loc[("sim", "1e-4"), "log_density_gap_verdict"] == "best"  # by the distance from 0


def test_evaluation_noise_sets_must_start_with_the_training_one_and_avoid_the_trajectories():
    with pytest.raises(ConfigError, match=r"must start with suite.eval.noise_seed=0"):
        check_suite(suite("suite=gmm_digits", "suite.eval.noise_seeds=[1,2]"))
    with pytest.raises(ConfigError, match=r"trajectories start from noise_seed=100, one of the evaluation"):
        check_suite(suite("suite=gmm_digits", "suite.eval.noise_seeds=[0,100]"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_cell_of_every_shipped_suite_composes_into_a_valid_command(name, tmp_path):
    shipped = suite(f"suite={name}")
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        for method in shipped.methods:
            cfg = compose(config_name="train", overrides=train_overrides(shipped, method, 0, tmp_path))
            validate_train_config(cfg)
            assert cfg.budget_tfe == shipped.budget_tfe and cfg.eval.noise_seed == shipped.eval.noise_seed
        for sampler, steps in shipped.teacher_samplers.items():
            overrides = teacher_overrides(shipped, sampler, steps[0], tmp_path)
            cfg = compose(config_name="evaluate", overrides=overrides)
            assert cfg.sampler.steps == steps[0] and cfg.n == shipped.eval.n
            assert list(cfg.noise_seed) == noise_sets(shipped)
        cfg = compose(config_name="evaluate", overrides=floor_overrides(shipped, tmp_path))
        assert cfg.run == "floor" and list(cfg.noise_seed) == noise_sets(shipped)


def test_a_cell_is_started_resumed_or_skipped_by_what_its_folder_holds(tmp_path):
    folder, overrides = tmp_path / "cell", ["seed=0"]
    assert settle_cell(folder, overrides) == "start"
    (folder / "stray.txt").write_text("left by a killed start")
    assert settle_cell(folder, overrides) == "start" and not (folder / "stray.txt").exists()
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert settle_cell(folder, overrides) == "resume"
    (folder / "summary.json").write_text("{}")
    assert settle_cell(folder, overrides) == "done"


def test_a_kept_cell_run_with_other_settings_is_refused(tmp_path):
    folder = tmp_path / "cell"
    assert settle_cell(folder, ["seed=0", "budget_tfe=100"]) == "start"
    with pytest.raises(ConfigError, match=r"budget_tfe=100, budget_tfe=200.*delete that cell"):
        settle_cell(folder, ["seed=0", "budget_tfe=200"])


def test_a_readme_without_the_suite_s_block_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no block\n")
    with pytest.raises(ConfigError, match=r"add the lines <!-- leaderboard:toy2d --> and"):
        check_readme(readme, "toy2d")
    assert readme.read_text() == "# no block\n"


def fake_cells(out: Path, protocol: dict) -> None:
    """Finished cells of the SMALL suite, written by hand: configs and summaries with ``protocol``."""
    shared = {"teacher": {"_target_": "toy"}, "metrics": {"_target_": "suite", "n": 64}}
    for seed in (0, 1):
        folder = out / "cells" / "sim" / f"seed{seed}"
        folder.mkdir(parents=True)
        config = shared | {"eval": {"n": 64, "noise_seed": 0}, "budget_tfe": 15000}
        (folder / "config.yaml").write_text(OmegaConf.to_yaml(config))
        student = {"nfe": 1, "fid_data@64": 0.5 + seed, "samples_per_second": 9.0}
        summary = {"student": student, "tfe": 14000.0, "train_seconds": 3.0, "protocol": protocol}
        (folder / "summary.json").write_text(json.dumps(summary))
    folder = out / "teacher" / "heun-2"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(shared | {"n": 64, "noise_seed": 0}))
    row = {"nfe": 3, "fid": 0.2, "is": None, "precision": 0.9, "recall": 0.9, "samples_per_second": 99.0,
           "noise_seed": 0, "n": 64}  # fmt: skip
    (folder / "summary.json").write_text(json.dumps({"rows": [row | {"protocol": protocol}]}))
    folder = out / "floor" / "cell"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(shared | {"n": 64, "noise_seed": [0]}))
    floor = row | {"nfe": 0, "fid": 0.01}
    (folder / "summary.json").write_text(json.dumps({"rows": [floor | {"protocol": protocol}]}))


def test_cells_measured_under_another_protocol_or_none_are_refused(tmp_path):
    protocol = {"extractor": "data", "weights": None, "preprocessing": "flatten", "n": 64}
    fake_cells(tmp_path, protocol)
    table = collect(suite(*SMALL), tmp_path)
    assert list(table["method"]) == ["sim", "sim", "teacher heun", "floor"]
    assert set(table["protocol"]) == {json.dumps(protocol, sort_keys=True, separators=(",", ":"))}

    cell = tmp_path / "cells" / "sim" / "seed1" / "summary.json"
    spent = json.loads(cell.read_text())
    for tfe, match in [(15001.0, "spent 15001 of its budget of 15000"), (11000.0, "spent 11000 of its")]:
        cell.write_text(json.dumps(spent | {"tfe": tfe}))
        with pytest.raises(ConfigError, match=match):  # over the budget; under it by more than the tolerance
            collect(suite(*SMALL), tmp_path)
    cell.write_text(json.dumps(spent))

    teacher = tmp_path / "teacher" / "heun-2" / "summary.json"
    (row,) = json.loads(teacher.read_text())["rows"]
    teacher.write_text(json.dumps({"rows": [row | {"protocol": protocol | {"preprocessing": "uint8"}}]}))
    with pytest.raises(ConfigError, match=r"teacher heun-2 differs from sim seed 0 in \['protocol'\]"):
        collect(suite(*SMALL), tmp_path)
    teacher.write_text(json.dumps({"rows": [{k: v for k, v in row.items() if k != "protocol"}]}))
    with pytest.raises(ConfigError, match=r"holds no protocol record .* delete .*heun-2 to measure"):
        collect(suite(*SMALL), tmp_path)


def start_suite(out_dir: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "distillbench.leaderboard", *SMALL, f"out_dir={out_dir}",
               f"hydra.run.dir={out_dir / 'run'}", "threads=1", *extra]  # fmt: skip
    env = os.environ | command_environment(out_dir.parent)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=out_dir.parent, start_new_session=True)  # fmt: skip


def test_a_killed_suite_run_restarts_without_rerunning_finished_cells(tmp_path):
    out = tmp_path / "board"
    first_done = out / "cells" / "sim" / "seed0" / "summary.json"
    proc = start_suite(out)
    deadline = time.time() + 300
    while not first_done.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the suite and the cell it is running
    proc.wait()
    assert first_done.is_file() and not (out / "leaderboard.csv").exists()
    finished_at = first_done.stat().st_mtime_ns

    page = tmp_path / "docs" / "leaderboard.md"
    page.parent.mkdir()
    page.write_text("# Mine\n<!-- leaderboard:toy2d -->\nold\n<!-- /leaderboard:toy2d -->\nkept\n")
    output, _ = start_suite(out, f"page={page}").communicate(timeout=300)
    assert "sim seed 0: skipped (finished)" in output, output
    assert "sim seed 1: ran" in output or "sim seed 1: resumed" in output, output
    assert first_done.stat().st_mtime_ns == finished_at, "a finished cell was run again"
    table = pd.read_csv(out / "leaderboard.csv")
    assert list(table["method"]) == ["sim", "sim", "teacher heun", "floor"] and table["fid"].notna().all()
    assert table["protocol"].nunique() == 1 and json.loads(table["protocol"][0])["extractor"] == "data"
    assert f"- protocol: `{table['protocol'][0]}`" in (out / "leaderboard.md").read_text()
    assert (table["tfe"][:2] <= 15000).all() and (table["tfe"][:2] > 15000 - 256 * 13).all()
    text = page.read_text()
    assert text.startswith("# Mine\n<!-- leaderboard:toy2d -->\n- command:") and text.endswith("kept\n")
    assert "| sim | 1 |" in text and "old" not in text and (tmp_path / "docs/leaderboard_toy2d.png").is_file()

    # fairness: a cell measured on other evaluation noise is refused
    config = out / "cells" / "sim" / "seed1" / "config.yaml"
    cfg = OmegaConf.load(config)
    cfg.eval.noise_seed = 5
    config.write_text(OmegaConf.to_yaml(cfg))
    with pytest.raises(ConfigError, match=r"sim seed 1 differs from sim seed 0 in \['noise_seed'\]"):
        collect(suite(*SMALL), out)


@pytest.mark.slow
def test_a_toy_suite_writes_its_table_csv_and_figure_with_one_budget_and_noise(tmp_path):
    out = tmp_path / "board"
    run_cli("distillbench.leaderboard", "suite=toy2d", f"out_dir={out}", f"hydra.run.dir={tmp_path / 'run'}",
            cwd=tmp_path)  # fmt: skip
    table = pd.read_csv(out / "leaderboard.csv")
    students = table[table["tfe"] > 0]
    assert sorted(set(zip(students["method"], students["seed"], strict=True))) == [
        (method, seed) for method in ("cd", "di", "dmd2", "ect", "sim") for seed in (0, 1)
    ]  # fmt: skip
    assert (students["tfe"] <= 40000).all() and table["fid"].notna().all()
    configs = [OmegaConf.load(p) for p in sorted((out / "cells").glob("*/seed*/config.yaml"))]
    assert len(configs) == 5 * 2
    assert {c.budget_tfe for c in configs} == {40000} and {c.eval.noise_seed for c in configs} == {0}
    assert {c.eval.n for c in configs} == {2000}
    markdown = (out / "leaderboard.md").read_text()
    assert "| sim | 1 |" in markdown and "| teacher heun | 9 |" in markdown
    assert "budget per method: 4e+04 teacher-forward equivalents" in markdown
    assert (out / "leaderboard.png").stat().st_size > 10_000


#: the gmm_digits suite shrunk to seconds per cell: SIM alone, 2 seeds × 2 noise sets, 2 generator steps
TINY_GMM = ["suite=gmm_digits", *(f"~suite.methods.{name}" for name in ("sid", "di", "progressive", "direct",
                                                                       "dmd2", "sida", "cd", "ect")),
            "suite.budget_tfe=330", "suite.seeds=[0,1]",
            "suite.eval.noise_seeds=[0,1]", "suite.eval.n=128", "suite.eval.batch_size=128",
            "suite.eval.curve_points=1", "~suite.teacher_samplers.dpmpp2m", "suite.teacher_samplers.heun=[2]",
            'suite.train=["data=gmm_digits","teacher=gmm_digits","metrics=gmm_digits",'
            '"method.batch_size=16"]']  # fmt: skip


def test_a_tiny_gmm_suite_reports_intervals_verdicts_the_floor_both_units_and_its_curves(tmp_path):
    out = tmp_path / "board"
    run_here("distillbench.leaderboard", *TINY_GMM, f"out_dir={out}", f"hydra.run.dir={tmp_path / 'run'}",
            "threads=1", cwd=tmp_path)  # fmt: skip
    table = pd.read_csv(out / "leaderboard.csv")
    students = table[table["method"] == "sim"]
    pairs = sorted(zip(students["seed"], students["noise_seed"], strict=True))
    assert pairs == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert list(table.loc[table["method"] != "sim", "noise_seed"]) == [0, 1, 0, 1]  # teacher heun, floor
    assert set(table["method"]) == {"sim", "teacher heun", "floor"} and (students["unit"] == "SFE").all()
    assert (students["tfe"] <= 330).all() and (students["tfe"] >= 330 * 0.95).all()  # 2 steps of 16 · 10.02
    assert table[["fid", "log_density_gap", "coverage_tv"]].notna().all().all()
    markdown = (out / "leaderboard.md").read_text()
    assert "330 student-forward equivalents (SFE" in markdown and "TFE" in markdown
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines}
    assert rows["sim"].count("±") >= 3 and "2 × 2" in rows["sim"] and " best " in rows["sim"]
    assert "2 noise sets" in rows["floor"] and "2 noise sets" in rows["teacher heun"]
    assert "Welch" in markdown and "floor" in markdown
    assert (out / "leaderboard.png").stat().st_size > 10_000
    run_here("distillbench.convergence", *TINY_GMM, f"out_dir={out}", f"report_dir={tmp_path / 'report'}",
             f"hydra.run.dir={tmp_path / 'run2'}", cwd=tmp_path)  # fmt: skip
    curves = pd.read_csv(tmp_path / "report" / "curves.csv")
    assert set(zip(curves["method"], curves["seed"], strict=True)) == {("sim", 0), ("sim", 1)}
    assert curves[["fid", "log_density_gap", "recall", "coverage_tv"]].notna().all().all()
    points = pd.read_csv(tmp_path / "report" / "convergence.csv")
    assert (points["seeds"] == 2).all() and (points["fid_verdict"] == "best").sum() == 1
    report = (tmp_path / "report" / "convergence.md").read_text()
    assert "best / teacher heun-3" in report and "## log-density gap" in report
    assert (tmp_path / "report" / "convergence.png").stat().st_size > 10_000


def test_cells_made_in_another_checkout_compare_by_their_shipped_assets():
    """A cell's shipped teacher and classifier sit in its own checkout's assets folder; the fairness record
    names them from the assets, so cells from a moved checkout join the table."""

    def cell(root: str) -> dict:
        cfg = OmegaConf.create({
            "paths": {"assets_dir": f"{root}/assets"}, "eval": {"n": 10},
            "teacher": {"_target_": "t", "path": f"{root}/assets/teachers/gmm_digits"},
            "metrics": {"extractor": {"path": f"{root}/assets/classifiers/digits"}, "n": 10},
        })  # fmt: skip
        return fairness_record(cfg, {}, training=True)

    here, there = cell("/work/a/src/distillbench"), cell("/elsewhere/site-packages/distillbench")
    assert here == there and here["teacher"]["path"] == "<assets>/teachers/gmm_digits"
    check_fair({"here": here, "there": there}, {}, {}, tolerance=0.05)
    moved = cell("/x") | {"teacher": {"_target_": "t", "path": "/x/my_teacher"}}
    with pytest.raises(ConfigError, match="differs from"):
        check_fair({"here": here, "moved": moved}, {}, {}, tolerance=0.05)
