"""``python -m distillbench.evaluate``: rows for students and teacher samplers, reuse, sweeps, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from distillbench.errors import ConfigError
from distillbench.evaluate import (
    COLUMNS,
    as_cell,
    build,
    find_row,
    gather_sweep,
    noise_means,
    read_table,
    upsert_row,
)
from distillbench.runs import LATER_COUNTERS, load_run
from tests.helpers import compose, run_folder, run_here


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The working folder of every command here (it holds the metric cache the commands share)."""
    return tmp_path_factory.mktemp("evaluate")


@pytest.fixture(scope="module")
def student_run(workspace) -> Path:
    """A tiny toy2d SIM training run (two generator steps)."""
    proc = run_here(
        "distillbench.train", "data=toy2d", "method.batch_size=16", "method.duration_kimg=0.032",
        "eval.n=64", "eval.every_kimg=1", "eval.teacher=false", "logger=csv",
        f"hydra.run.dir={workspace / 'train'}", cwd=workspace,
    )  # fmt: skip
    return run_folder(proc)


def evaluate(workspace: Path, results: Path, *overrides: str, check: bool = True):
    return run_here("distillbench.evaluate", f"results={results}", *overrides, cwd=workspace, check=check)


def test_student_run_adds_a_row_that_matches_training_evaluation(workspace, student_run, tmp_path):
    results = tmp_path / "results.csv"
    proc = evaluate(workspace, results, f"run={student_run}", "n=64", f"hydra.run.dir={tmp_path / 'run'}")
    table = pd.read_csv(results)
    assert tuple(table.columns) == COLUMNS and len(table) == 1
    row = table.iloc[0]
    assert row["model"] == "train" and row["method"] == "SIM" and row["data"] == "toy2d"
    assert row["extractor"] == "data" and row["n"] == 64 and row["nfe"] == 1 and row["samples_per_second"] > 0
    trained = json.loads((student_run / "summary.json").read_text())
    assert row["fid"] == pytest.approx(trained["student"]["fid_data@64"]), "same fixed noise as training's"
    assert json.loads(row["protocol"]) == trained["protocol"], "and measured the same way"
    folder = run_folder(proc)
    for name in ["config.yaml", "samples.png", "summary.json"]:
        assert (folder / name).is_file(), name
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["fid"] == pytest.approx(row["fid"]) and summary["protocol"] == trained["protocol"]


def test_a_checkpoint_older_than_the_counters_loads_with_them_at_zero_and_a_warning(student_run, tmp_path):
    folder = tmp_path / "old_run"
    shutil.copytree(student_run, folder, ignore=shutil.ignore_patterns("*.sha256"))
    for ckpt in (folder / "checkpoints").glob("*.ckpt"):
        ckpt.unlink()
    checkpoint = torch.load(student_run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    for key in LATER_COUNTERS:
        del checkpoint["state_dict"][key]
    torch.save(checkpoint, folder / "checkpoints/last.ckpt")
    with pytest.warns(UserWarning, match=r"predates the counters \['batches_trained', 'tfe', 'train_se"):
        _, method, _ = load_run(folder)
    assert float(method.tfe) == 0 and int(method.gen_steps) == 2, "the rest of the state is the checkpoint's"


def test_teacher_row_has_the_sampler_nfe_and_is_reused(workspace, tmp_path):
    results = tmp_path / "results.csv"
    args = ["data=toy2d", "sampler=heun", "sampler.steps=3", "n=64"]
    evaluate(workspace, results, *args, f"hydra.run.dir={tmp_path / 'first'}")
    first = results.read_text()
    row = pd.read_csv(results).iloc[0]
    assert row["model"] == "teacher/toy2d/heun-3" and row["method"] == "heun" and row["nfe"] == 5
    proc = evaluate(workspace, results, *args, f"hydra.run.dir={tmp_path / 'second'}")
    assert "reused the row" in proc.stdout
    assert results.read_text() == first
    assert json.loads((tmp_path / "second" / "summary.json").read_text())["fid"] == row["fid"]
    assert (tmp_path / "second" / "samples.png").is_file()

    table = pd.read_csv(results, dtype=str, keep_default_na=False)  # a row measured another way is redone
    record = json.loads(table.loc[0, "protocol"])
    table.loc[0, "protocol"] = json.dumps(record | {"weights": "sha256:0000000000000000"})
    table.to_csv(results, index=False)
    proc = evaluate(workspace, results, *args, f"hydra.run.dir={tmp_path / 'third'}")
    assert "measured under another protocol; measuring again" in proc.stdout
    again = pd.read_csv(results)
    assert len(again) == 1 and json.loads(again.loc[0, "protocol"]) == record
    assert again.loc[0, "fid"] == row["fid"], "the same figure, measured again"


def test_sweep_writes_the_fid_versus_nfe_table_and_figure(workspace, student_run, tmp_path):
    results, sweep = tmp_path / "results.csv", tmp_path / "sweep"
    proc = evaluate(
        workspace, results, "-m", "data=toy2d", "n=64", f"run=teacher,{student_run}", "sampler=heun",
        "sampler.steps=2,3", f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert proc.stdout.count("reused the row") == 1, "the student's second job reuses its row"
    table = pd.read_csv(sweep / "results.csv")
    assert sorted(table["nfe"]) == [1, 3, 5]
    assert len(pd.read_csv(results)) == 3
    markdown = (sweep / "results.md").read_text().splitlines()
    assert len(markdown) == 2 + 3 + 2 and "teacher/toy2d/heun-2" in markdown[2]
    assert table["protocol"].nunique() == 1 and markdown[-1] == f"protocol: `{table['protocol'][0]}`"
    assert (sweep / "fid_vs_nfe.png").stat().st_size > 0
    assert (sweep / "precision_recall.png").stat().st_size > 0
    table_rows = [ln for ln in (sweep / "noise_means.md").read_text().splitlines() if ln.startswith("| ")]
    assert len(table_rows) == 1 + 3, "one noise seed: a row each"


def test_noise_means_averages_each_model_over_its_noise_seeds():
    teacher = "teacher/digits/dpmpp2m-20"
    base = {"data": "digits", "extractor": "clf", "n": 2000, "precision": 0.9, "recall": 0.8,
            "samples_per_second": 10.0, "protocol": '{"extractor":"clf"}'}  # fmt: skip
    cases = [(teacher, 20, 0, 0.4), (teacher, 20, 2, 0.6), ("run", 8, 0, 1.0)]
    rows = [base | {"model": m, "nfe": nfe, "noise_seed": seed, "fid": fid} for m, nfe, seed, fid in cases]
    lines = noise_means(pd.DataFrame(rows)).splitlines()
    assert lines[0].startswith("| model | NFE | noise seeds | fid |") and lines[4] == ""
    # two seeds: 0.5 ± t(0.975, 1)·0.1414/√2 = 0.5 ± 1.27; one seed: the value alone, and no test
    teacher_row = "| teacher/digits/dpmpp2m-20 | 20 | 0,2 | 0.5 ± 1.3 | 0.9 ± 0 | 0.8 ± 0 | 10 ± 0 | best |"
    assert lines[2] == teacher_row
    assert lines[3] == "| run | 8 | 0 | 1 | 0.9 | 0.8 | 10 | untested |"
    assert "Welch" in lines[5]


def test_on_exact_data_noise_means_reads_the_log_density_gap_by_its_distance_from_zero():
    base = {"data": "gmm_digits", "extractor": "clf", "n": 1000, "nfe": 8, "precision": 0.9, "recall": 0.8,
            "samples_per_second": 10.0, "protocol": "{}", "coverage_tv": 0.04, "fid": 1.0}  # fmt: skip
    gaps = {"a": [-0.10, -0.11, -0.12], "b": [0.01, -0.012, 0.008], "c": [-0.50, -0.51, -0.52]}
    rows = [base | {"model": m, "noise_seed": i, "log_density_gap": g} for m, v in gaps.items()
            for i, g in enumerate(v)]  # fmt: skip
    lines = noise_means(pd.DataFrame(rows)).splitlines()
    judged = "FID against the best | log_density_gap against the best | coverage_tv against the best |"
    assert lines[0].endswith(f"| log_density_gap | coverage_tv | {judged}")
    verdicts = {line.split(" | ")[0][2:]: line.split(" | ")[-2] for line in lines[2:5]}
    assert verdicts == {"a": "worse", "b": "best", "c": "worse"}, lines


def test_a_sweep_gathers_every_noise_seed_of_a_job_that_measured_several(tmp_path):
    names = {"time": "t", "model": "teacher/x/heun-2", "method": "heun", "data": "x", "extractor": "clf"}
    row = dict.fromkeys(COLUMNS, 1.0) | names | {"protocol": {"n": 8}}
    jobs = {"0": row | {"noise_seed": 0}, "1": {"rows": [row | {"noise_seed": 1}, row | {"noise_seed": 2}]}}
    for job, summary in jobs.items():
        (tmp_path / job).mkdir()
        (tmp_path / job / "summary.json").write_text(json.dumps(summary))
    assert sorted(gather_sweep(tmp_path)["noise_seed"]) == [0, 1, 2]


def test_a_schedule_other_than_karras_gets_its_own_teacher_row(workspace, tmp_path):
    results = tmp_path / "results.csv"
    args = ["data=toy2d", "sampler=heun", "sampler.steps=3", "n=64"]
    evaluate(workspace, results, *args, f"hydra.run.dir={tmp_path / 'karras'}")
    evaluate(
        workspace, results, *args, "schedule@sampler.schedule=improved", f"hydra.run.dir={tmp_path / 'imp'}"
    )
    table = pd.read_csv(results).set_index("model")
    assert list(table.index) == ["teacher/toy2d/heun-3", "teacher/toy2d/heun+improved-3"]
    assert table["nfe"].tolist() == [5, 5] and table["fid"].nunique() == 2, "another σ grid, another FID"


def test_direct_vs_teacher_experiment_crosses_steps_with_both_schedules_and_re_measures():
    cfg = compose("evaluate", ["experiment=direct_vs_teacher"])
    params = cfg.hydra.sweeper.params
    assert params["sampler.steps"] == "20,8" and params["schedule@sampler.schedule"] == "karras,improved"
    assert cfg.sampler._target_.endswith("DPMSolverPP2MSampler") and cfg.force is True


def test_direct_noise_seeds_experiment_crosses_both_step_counts_with_five_held_out_noise_sets():
    cfg = compose("evaluate", ["experiment=direct_noise_seeds"])
    params = cfg.hydra.sweeper.params
    assert params["sampler.steps"] == "20,8" and params["noise_seed"] == "0,2,3,4,5", "not 1: the pairs'"
    assert cfg.sampler._target_.endswith("DPMSolverPP2MSampler") and cfg.force is True


def test_fid_vs_nfe_experiment_sweeps_both_teacher_samplers():
    cfg = compose("evaluate", ["experiment=fid_vs_nfe"])
    assert cfg.hydra.mode.name == "MULTIRUN"
    params = cfg.hydra.sweeper.params
    assert params.sampler == "heun,dpmpp2m" and len(params["sampler.steps"].split(",")) >= 3
    assert cfg.hydra.callbacks.sweep_report._target_ == "distillbench.evaluate.SweepReport"


def test_upsert_replaces_the_row_of_its_key_and_keeps_the_others(tmp_path):
    path = tmp_path / "results.csv"
    filled = {"time": "t", "model": "m", "method": "SIM", "data": "toy2d", "extractor": "data", "n": 64,
              "noise_seed": 0, "nfe": 1, "fid": 0.5}  # fmt: skip
    row = dict.fromkeys(COLUMNS) | filled
    upsert_row(path, row)
    upsert_row(path, row | {"n": 128, "fid": 0.25})
    upsert_row(path, row | {"fid": 0.125})
    table = read_table(path)
    assert list(table["n"]) == ["128", "64"] and list(table["fid"]) == ["0.25", "0.125"]
    assert list(table["is"]) == ["", ""]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".results.csv.lock", "results.csv"]
    older = [column for column in COLUMNS if column != "protocol"]  # a table from before protocol records
    path.write_text(",".join(older) + "\n" + ",".join(as_cell(row[c]) for c in older) + "\n")
    assert read_table(path)["protocol"].tolist() == [""]
    assert find_row(read_table(path), {"model": "m"})["protocol"] is None, "never equal to a suite's record"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match="is not a results table"):
        upsert_row(path, row)
    assert path.read_text() == "a,b\n1,2\n", "a foreign file is never overwritten"


@pytest.mark.parametrize("case", ["no_checkpoint", "lone_checkpoint"])
def test_bad_run_exits_2_naming_the_expected_files(workspace, student_run, tmp_path, case):
    folder = tmp_path / "run_folder"
    folder.mkdir()
    if case == "no_checkpoint":
        (folder / "config.yaml").write_text((student_run / "config.yaml").read_text())
        run, message = folder, f"{folder / 'checkpoints' / 'last.ckpt'} not found"
    else:
        (folder / "last.ckpt").write_bytes((student_run / "checkpoints" / "last.ckpt").read_bytes())
        run = folder / "last.ckpt"
        message = f"looked for {folder / 'config.yaml'} and {tmp_path / 'config.yaml'}"
    results = tmp_path / "results.csv"
    proc = evaluate(workspace, results, f"run={run}", f"hydra.run.dir={tmp_path / 'out'}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not results.exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["run=/nonexistent/run"], "run=/nonexistent/run: no such run folder"),
        (["run=teacher", "n=0"], "n=0 must be >= 1"),
        (["run=/nonexistent/run", "n=0"], "n=0 must be >= 1"),
    ],
)
def test_bad_request_is_a_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build(compose("evaluate", overrides))
