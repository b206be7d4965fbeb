"""``benchmarks/gpu_check.py`` at ``--size tiny`` on the CPU: every section runs end to end, the JSON and the
Markdown hold real numbers, and a section that fails or runs out of time is recorded while the rest still runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    env["COLUMNS"] = "80"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _check(args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory):
    """One whole tiny check, its output folder given as a relative path."""
    cwd = tmp_path_factory.mktemp("gpu-check")
    done = _check(["--size", "tiny", "--device", "cpu", "--out", "out"], cwd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = cwd / "out"
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text(), out


@pytest.mark.slow
def test_every_section_runs_and_reports_real_numbers(tiny_check):
    report, markdown, out = tiny_check
    sections = report["sections"]
    assert list(sections) == ["environment", "cuda_tests", "vsd_step", "real_run", "flow_families", "pixart", "probe"]
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(sections, "ok")
    assert 0 < report["total_s"] < report["time_limit_s"]
    assert all(0 < s["seconds"] <= s["budget_s"] + 10 for s in sections.values())
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]

    env = sections["environment"]
    assert env["packages"]["torch"] and env["packages"]["diffusers"] and env["cpu_count"] >= 1
    assert Path(env["wadi_imported_from"]) == ROOT

    tests = sections["cuda_tests"]
    assert tests["exit_code"] == 0 and tests["counts"]["deselected"] > 0 and not tests["counts"].get("failed")
    assert tests["counts"].get("skipped", 0) + tests["counts"].get("passed", 0) >= 1
    assert all("CUDA" in reason for reason in tests["skip_reasons"])  # this machine has no GPU

    probe = sections["probe"]
    assert probe["layers_total"] > 100 and probe["files_gb"] > 0
    for mode in ("probe", "probe-nospectra"):
        assert 0 < probe[mode]["seconds"] <= probe[mode]["process_seconds"]
        assert probe[mode]["peak_rss_mb"] > 100
    agree = probe["cpu_agreement"]
    assert len(agree["layers"]) == 4
    assert agree["max_abs_diff_all_fields"] == 0.0  # the CPU against itself, same process: the same numbers
    assert all(v is not None and v <= 1e-6 for v in agree["max_abs_diff_full_run_vs_cpu"].values())
    assert probe["targets"]["probe_full_analysis_le_10_s"] == (probe["probe"]["seconds"] <= 10)

    step = sections["vsd_step"]["precisions"]["no"]
    for variant in ("paper", "ours"):
        assert step[variant]["step_s"]["n"] == 2 and step[variant]["step_s"]["min"] > 0
        assert step[variant]["peak_mb"] > 0
    assert step["time_ratio"] == pytest.approx(step["ours"]["step_s"]["median"] / step["paper"]["step_s"]["median"],
                                               rel=0.01)
    assert step["memory_ratio"] == pytest.approx(step["ours"]["peak_mb"] / step["paper"]["peak_mb"], rel=0.01)
    assert step["adapted_layers"] > 10
    for variant in ("paper", "ours"):  # one more step each under the profiler (on a CPU: no device numbers)
        prof = step[variant]["profile"]
        assert prof["aten_calls"] > 1000 and prof["wall_s_under_profiler"] > 0
        assert prof["device_busy_s"] is None and prof["kernel_launches"] is None
        assert len(prof["top_host"]) == 12 and all(ms >= 0 and n >= 1 for _, ms, n in prof["top_host"])
    assert "| no | ours |" in markdown and "under torch's profiler" in markdown

    run = sections["real_run"]
    plan = report["plan"]["real_run"]
    for key, steps in (("checkpointing_on", plan["steps"]), ("checkpointing_off", plan["steps_no_checkpointing"])):
        assert run[key]["steps_logged"] == steps
        assert run[key]["s_per_step"]["n"] == steps - 1 and run[key]["s_per_step"]["min"] > 0
        assert run[key]["peak_rss_mb"] > 100
        assert all(math.isfinite(v) for v in run[key]["final_losses"].values())
        assert run[key]["command"].startswith("wadi-distill run --teacher ")
    for key in ("resumed", "resumed_again"):
        assert run[key]["steps_logged"] == plan["steps"] - plan["resume_from"]
    for part in ("student", "fake", "merged_export", "two_resumes_student", "two_resumes_fake"):
        assert run["resume_check"][part]["tensors"] > 0
        assert run["resume_check"][part]["bit_identical"] is True
    export = run["export_check"]
    assert export["keys_as_teacher"] and export["dtypes_and_shapes_as_teacher"]
    assert export["missing_keys"] == export["unexpected_keys"] == 0
    assert export["output_max_abs"] > 0 and export["relative_diff"] <= 1e-6
    assert run["problems"] == []

    pixart = sections["pixart"]["run"]
    assert pixart["steps_logged"] == report["plan"]["pixart"]["steps"]
    assert pixart["s_per_step"]["median"] > 0 and pixart["peak_rss_mb"] > 100

    flow = sections["flow_families"]
    assert list(flow["families"]) == report["plan"]["flow_families"]["families"] and flow["problems"] == []
    for family, entry in flow["families"].items():
        # on the CPU the metered real step and the fake-tensor estimate count the same tensors
        assert entry["peak_metered_mb"] > 0 and entry["estimate_peak_mb"] == entry["peak_metered_mb"], family
        assert entry["measured_over_estimate"] == 1.0 and entry["estimate_step_s_at_40pct"] >= 0

    # the Markdown says what the JSON holds
    assert "| real_run | ok |" in markdown and "## pixart: ok" in markdown
    assert f"| {step['time_ratio']:.2f}× |" in markdown
    assert "student 0 of " in markdown and "bit-identical means 0" in markdown
    assert f"{probe['probe']['seconds']:.3g}" in markdown


@pytest.mark.slow
def test_a_section_out_of_time_is_recorded_and_the_next_still_runs(tmp_path):
    done = _check(["--size", "tiny", "--device", "cpu", "--out", str(tmp_path / "out"), "--only",
                   "cuda_tests,environment", "--budget", "cuda_tests=1"], tmp_path)
    assert done.returncode == 1  # not every section ok
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    tests, env = report["sections"]["cuda_tests"], report["sections"]["environment"]
    # stopped by the section itself (its pytest out of time) or by the parent (the section's process killed)
    assert tests["status"] == "timeout" and "time budget" in tests["error"]
    assert tests["seconds"] < 30
    assert env["status"] == "ok" and env["packages"]["torch"]
    markdown = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "## cuda_tests: timeout" in markdown and "## environment: ok" in markdown


def test_a_section_that_crashes_is_recorded_not_fatal(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the scratch folder should be\n")
    log = tmp_path / "log.txt"
    result = gpu_check.run_section("environment", gpu_check.Context("tiny", "cpu", str(blocker), 0), 60, log, _env())
    assert result["status"] == "failed"
    assert "NotADirectoryError" in result["error"] or "FileNotFoundError" in result["error"]
    assert result["budget_s"] == 60 and result["seconds"] > 0


@pytest.mark.parametrize("args, message", [
    (["--budget", "nope=3"], "--budget takes SECTION=SECONDS"),
    (["--budget", "probe=soon"], "--budget takes SECTION=SECONDS"),
    (["--only", "probe,warp"], "unknown section(s) warp"),
    (["--size", "sd15", "--device", "cpu"], "the sd15 size needs a GPU"),
    (["--wheels", "."], "no .whl files there"),
])
def test_bad_arguments_stop_before_anything_runs(tmp_path, args, message):
    done = _check(["--size", "tiny", "--out", "out", *args], tmp_path, timeout=120)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.slow
def test_markdown_of_a_gpu_run_states_the_gpu_numbers_and_targets(tiny_check):
    """The GPU-only fields (peak GPU memory, fp16, the 24 GB target) are rendered too: built from the tiny
    report with those fields set as a CUDA run sets them."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    report = json.loads(json.dumps(tiny_check[0]))
    report.update(size="sd15", device="cuda")
    sections = report["sections"]
    sections["environment"]["gpu"] = "Some GPU"
    sections["probe"]["probe"]["peak_gpu_mb"] = 1234.5
    sections["probe"]["targets"]["probe_full_analysis_le_10_s"] = True
    fp32 = sections["vsd_step"]["precisions"].pop("no")
    for precision in ("fp16", "bf16"):
        entry = json.loads(json.dumps(fp32))
        entry.update(peak_memory="CUDA max allocated", time_ratio=0.64, memory_ratio=0.55,
                     targets={"time_ratio_le_0.7": True, "memory_ratio_le_0.6": True})
        sections["vsd_step"]["precisions"][precision] = entry
    run = sections["real_run"]
    for key, (allocated, reserved) in (("checkpointing_on", (9000.0, 11000.0)), ("resumed", (9000.0, 11000.0)),
                                       ("resumed_again", (9000.0, 11000.0)), ("checkpointing_off", (30000.0, 33000.0))):
        run[key].update(peak_gpu_allocated_mb=allocated, peak_gpu_reserved_mb=reserved)
    run.update(checkpointing_memory_ratio=0.3, targets={"batch8_fp16_checkpointing_fits_24_gb": True})
    sections["pixart"]["run"].update(peak_gpu_allocated_mb=20000.0, peak_gpu_reserved_mb=22000.0)
    flux = sections["flow_families"]["families"]["flux"]
    flux.update(peak_allocated_mb=41234.5, peak_reserved_mb=43210.0, step_s={"median": 2.5, "min": 2.4, "max": 2.6, "n": 2},
                measured_over_estimate=1.04)
    flux.pop("peak_metered_mb")
    markdown = gpu_check.render_markdown(report)
    assert "| 41234.5 | 43210 |" in markdown and "2.5 s (min 2.4, max 2.6, n=2)" in markdown and "| 1.04 |" in markdown
    assert "- machine: Some GPU," in markdown
    assert "| 1234.5 |" in markdown  # probe peak GPU MB
    assert "| fp16 |" in markdown and "| bf16 |" in markdown and "| 0.64× |" in markdown
    assert "fp16 time met, memory met; bf16 time met, memory met." in markdown
    assert "| 9000 | 11000 |" in markdown and "peak GPU memory 0.30×" in markdown
    assert "within a 24 GB card (reserved < 23 GiB): met." in markdown
    assert "(the target is for the SD1.5 pair on a GPU)" not in markdown


@pytest.mark.slow
def test_wheels_and_the_project_install_into_the_scratch_folder(tmp_path):
    """``--wheels`` and ``--install`` (the GPU machine's set-up) install into the scratch folder only, and the
    sections then find the ``wadi-distill`` command there, also when a wheel brings console scripts of its own
    (diffusers' wheel brings diffusers-cli: a second pip call into the same folder then left wadi's out)."""
    tool = tmp_path / "clitool"
    (tool / "clitool").mkdir(parents=True)
    (tool / "clitool" / "__init__.py").write_text("def main():\n    print('clitool')\n")
    (tool / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "clitool"\nversion = "1.0"\n\n[project.scripts]\nclitool-cli = "clitool:main"\n\n'
        '[tool.setuptools]\npackages = ["clitool"]\n')
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(wheels), str(tool)], check=True, capture_output=True, timeout=300)
    assert [p.name for p in wheels.glob("*.whl")] == ["clitool-1.0-py3-none-any.whl"]
    scratch = tmp_path / "scratch"
    done = _check(["--size", "tiny", "--device", "cpu", "--out", "out", "--only", "environment", "--wheels",
                   str(wheels), "--install", "--scratch", str(scratch)], tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    env = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["sections"]["environment"]
    assert env["wadi_distill_command"] == str(scratch / "site" / "bin" / "wadi-distill")
    assert (scratch / "site" / "bin" / "clitool-cli").is_file() and (scratch / "site" / "bin" / "wadi-probe").is_file()
    assert (scratch / "site" / "wadi_distill" / "__init__.py").is_file()
    assert (scratch / "site" / "clitool" / "__init__.py").is_file()
    assert Path(env["wadi_imported_from"]) == ROOT  # the working tree stays first on the path


def test_the_rest_command_and_the_end_of_the_first_traceback():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    argv = ["--size", "sd15", "--out", "/root/out/", "--wheels", ".whl", "--install", "--only", "environment,real_run"]
    assert gpu_check.rest_command(argv, ["real_run", "pixart"]) == (
        "python benchmarks/gpu_check.py --size sd15 --out /root/out-rest --wheels .whl --install "
        "--only environment,real_run,pixart")
    assert gpu_check.rest_command(["--out=a b", "--only=probe"], ["probe"]) == (
        "python benchmarks/gpu_check.py '--out=a b-rest' --only environment,probe")
    # a CUDA error raised in a checkpointed recompute, then re-raised while restoring the RNG state (the first
    # GPU run's Flux step): the first traceback's last frames and its error line, not the second traceback
    stderr = "\n".join([
        "Traceback (most recent call last):",
        '  File "/x/checkpoint.py", line 1607, in recompute_fn', "    fn(*args, **kwargs)",
        '  File "/x/module.py", line 1790, in _call_impl', "    return forward_call(*args, **kwargs)",
        '  File "/w/wadi_distill/lorad/layer.py", line 320, in _forward', "    return _AdaptedMatmul.apply(...)",
        '  File "/w/wadi_distill/lorad/layer.py", line 117, in forward', "    x_cast = _autocast_cast(x, ctx.autocast)",
        '  File "/w/wadi_distill/lorad/layer.py", line 97, in _autocast_cast', "    return t.to(dtype)",
        "torch.AcceleratorError: CUDA error: an illegal memory access was encountered",
        "For debugging consider passing CUDA_LAUNCH_BLOCKING=1", "",
        "During handling of the above exception, another exception occurred:", "",
        "Traceback (most recent call last):", '  File "/x/random.py", line 217, in fork_rng',
        "torch.AcceleratorError: CUDA error: an illegal memory access was encountered"])
    end = gpu_check.first_traceback_end(stderr, frames=3)
    assert end.splitlines()[0] == '  File "/w/wadi_distill/lorad/layer.py", line 320, in _forward'
    assert end.splitlines()[-1] == "torch.AcceleratorError: CUDA error: an illegal memory access was encountered"
    assert "fork_rng" not in end and len(end.splitlines()) == 7
