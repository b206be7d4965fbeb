"""run_options / run_command_line: a config written as the `wadi-distill run` options that train it again."""

from __future__ import annotations

import shlex

from wadi_distill.vsd.config import DistillConfig, run_command_line, run_options


def test_a_full_finetune_without_average_and_with_an_unguided_fake_score():
    config = DistillConfig(teacher="sd15", output_dir="o", student_adapter="full", cfg=4.5, fake_cfg=1.0,
                           ema_decay=None, lr=2e-5, fake_updates_per_step=5, sequential_cfg=True, adam_beta1=0.0)
    options = run_options(config)
    assert list(options)[:2] == ["--teacher", "--full-finetune"]
    assert options["--fake-cfg"] == 1.0 and options["--cfg"] == 4.5 and options["--no-ema"] is True
    assert "--ema-power" not in options and "--ema-decay" not in options and "--prompts" not in options
    assert options["--sequential-cfg"] is True and "--gradient-checkpointing" not in options
    assert options["adam_beta1"] == 0.0 and "adam_beta2" not in options  # no option for it: named as the field
    words = shlex.split(run_command_line(options, "runs/a b"))
    assert words[:6] == ["wadi-distill", "run", "--teacher", "sd15", "--output-dir", "runs/a b"]
    assert "adam_beta1" not in words and words[words.index("--lr") + 1] == "2e-05"
    assert "--full-finetune" in words and words[words.index("--full-finetune") + 1].startswith("--")
    assert "--dmd-normalization" not in options  # off: left out, as every unset flag


def test_dmd_normalization_is_written_as_a_bare_flag_and_is_a_training_option():
    from wadi_distill.vsd.config import TRAINING_OPTIONS

    options = run_options(DistillConfig(teacher="builtin:digits", output_dir="o", dmd_normalization=True))
    assert options["--dmd-normalization"] is True
    words = shlex.split(run_command_line(options))
    assert "--dmd-normalization" in words and words[words.index("--dmd-normalization") + 1].startswith("--")
    assert "dmd_normalization" in TRAINING_OPTIONS  # resuming with the other setting is refused


def test_a_plan_from_a_probe_report_and_floats_written_exactly():
    config = DistillConfig(teacher="builtin:digits", output_dir="o", rank_from_probe="out/report.json", budget=0.05,
                           ema_power=2 / 3)
    options = run_options(config)
    assert options["--rank-from-probe"] == "out/report.json" and options["--budget"] == 0.05
    assert "--preset" not in options and "--full-finetune" not in options
    words = shlex.split(run_command_line(options))
    assert float(words[words.index("--ema-power") + 1]) == 2 / 3  # not 0.666667
    preset = run_options(DistillConfig(teacher="t", output_dir="o", preset="paper", rank=64,
                                       student_adapter="lora"))
    assert preset["--student-adapter"] == "lora" and preset["--preset"] == "paper" and preset["--rank"] == 64
