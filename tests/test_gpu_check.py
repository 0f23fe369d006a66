"""``python -m distillbench.gpu_check``: the GPU check's cases, profiles, results file, budget and bad input,
run on the CPU with a tiny DDPM++ (the check itself is for one GPU; see docs/performance.md)."""

from __future__ import annotations

import json
import time

import pytest

from distillbench.gpu_check import PastDeadline, deadline, settings_of
from tests.helpers import run_here

TINY_NET = ["sample_shape=[3,8,8]", "net.img_resolution=8", "net.model_channels=16", "net.channel_mult=[1,1]",
            "net.num_blocks=1", "net.attn_resolutions=[4]", "batch_size=2", "warmup=1", "steps=2",
            "profile_steps=1", "top_ops=5", "case_s=0", "compile_s=0", "recompile_s=0"]  # fmt: skip


def test_every_case_gets_a_row_with_throughput_profiles_and_the_tables(tmp_path):
    out = tmp_path / "check.json"
    cases = ("cases=[{method:sid,profile:true},{method:sid,precision:bf16-mixed,channels_last:true},"
             "{method:sim,like:fastest,matmul:high},{method:di,compile:true},"
             "{experiment:paper/cifar10_sid,like:fastest,seconds:1,batch:2}]")  # fmt: skip
    run_here("distillbench.gpu_check", *TINY_NET, cases, "compile_backend=eager", f"out={out}",
            f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)  # fmt: skip
    result = json.loads(out.read_text())
    assert result["device"].startswith("CPU") and result["network"] == "SongUNet" and result["parameters"] > 0
    rows = result["rows"]
    assert [r["method"] for r in rows] == ["sid", "sid", "sim", "di", "paper/cifar10_sid"]
    for row in rows:
        assert row["status"] == "ok" and row["images_per_second"] > 0 and row["ms_per_update"] > 0, row
        assert row["loss_fake"] > 0 and row["seconds"] > 0
    fastest = max(rows[:2], key=lambda r: r["images_per_second"])
    assert {k: rows[2][k] for k in ("precision", "channels_last")} == {
        k: fastest[k] for k in ("precision", "channels_last")
    }, "like: fastest takes the fastest SiD case's settings"
    assert rows[2]["matmul"] == "high" and rows[3]["compile"] is True and rows[4]["batch"] == 2
    assert rows[4]["updates"] >= 2 and rows[4]["kimg"] > 0 and rows[4]["dropped_samples"] == 0
    profile = rows[0]["profile"]
    assert profile["sorted_by"] == "self_cpu_ms" and len(profile["top"]) == 5
    assert profile["cpu_ms_per_update"] > 0
    times = [op["self_cpu_ms"] for op in profile["top"]]
    assert times == sorted(times, reverse=True) and "profile" not in rows[1]
    table = out.with_suffix(".md").read_text()
    assert table.count("| sid |") == 2 and "SongUNet" in table and "Profile of case 0" in table


def test_cases_past_the_budget_are_recorded_as_skipped(tmp_path):
    out = tmp_path / "check.json"
    cases = "cases=[{method:di},{method:sid,compile:true}]"
    run_here("distillbench.gpu_check", *TINY_NET, cases, "budget_s=-1", f"out={out}",
            f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all(r["status"].startswith("skipped: would end past budget_s") for r in rows)


def test_a_case_past_the_deadline_is_stopped():
    start = time.perf_counter()
    with pytest.raises(PastDeadline), deadline(0.05):
        time.sleep(5)
    assert time.perf_counter() - start < 2


def test_like_fastest_takes_the_fastest_sid_settings_the_case_does_not_name():
    rows = [{"method": "sid", "status": "ok", "images_per_second": 1.0, "precision": "32-true",
             "matmul": "high", "compile": False, "channels_last": False, "batch": 64,
             "cudnn_benchmark": True},
            {"method": "sid", "status": "ok", "images_per_second": 3.0, "precision": "bf16-mixed",
             "matmul": "highest", "compile": True, "channels_last": True, "batch": 256,
             "cudnn_benchmark": True},
            {"method": "sim", "status": "ok", "images_per_second": 9.0, "precision": "32-true",
             "matmul": "high", "compile": False, "channels_last": False, "batch": 8,
             "cudnn_benchmark": False}]  # fmt: skip
    like = settings_of({"method": "sim", "like": "fastest", "precision": "32-true"}, rows, 64)
    assert like == {"precision": "32-true", "matmul": "highest", "compile": True, "channels_last": True,
                    "batch": 256, "cudnn_benchmark": True}  # fmt: skip
    assert settings_of({"method": "sid"}, rows, 64) == {"precision": "32-true", "matmul": "highest",
                                                        "compile": False, "channels_last": False, "batch": 64,
                                                        "cudnn_benchmark": True}  # fmt: skip


def test_an_unknown_method_exits_2_before_any_work(tmp_path):
    proc = run_here("distillbench.gpu_check", "cases=[{method:sim},{method:dmd}]",
                   f"out={tmp_path / 'c.json'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                   check=False)  # fmt: skip
    assert proc.returncode == 2 and "unknown method 'dmd'" in proc.stderr
    assert not (tmp_path / "c.json").exists()
