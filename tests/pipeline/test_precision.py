"""``train.mixed_precision: auto``: the choice per machine, logged, recorded, kept on resume."""

import pytest
import yaml

from pipeline import precision
from pipeline.precision import choose_mixed_precision, cpu_flags, resolve_mixed_precision

EPYC_FLAGS = {"avx2", "avx512f", "avx512_bf16"}
SAPPHIRE_RAPIDS_FLAGS = {"avx2", "avx512f", "amx_tile", "amx_bf16"}
OLDER_FLAGS = {"avx2", "fma", "avx512f"}


@pytest.mark.parametrize("flags, expected", [
    (EPYC_FLAGS, "mixed_bfloat16"), (SAPPHIRE_RAPIDS_FLAGS, "mixed_bfloat16"),
    (OLDER_FLAGS, "none"), (set(), "none"),
])
def test_a_cpu_only_machine_gets_bfloat16_only_with_native_instructions(flags, expected):
    policy, reason = choose_mixed_precision(flags=flags, capabilities=[], environ={})
    assert policy == expected
    assert ("natively" in reason) == (expected == "mixed_bfloat16")


@pytest.mark.parametrize("capabilities, expected", [
    ([(8, 0)], "mixed_bfloat16"), ([(9, 0), (8, 6)], "mixed_bfloat16"),
    ([(7, 5)], "none"), ([(8, 0), (7, 0)], "none"), ([None], "none"),
])
def test_gpus_decide_when_there_are_any(capabilities, expected):
    # the CPU's flags do not matter once a GPU does the work
    assert choose_mixed_precision(flags=EPYC_FLAGS if expected == "none" else OLDER_FLAGS,
                                  capabilities=capabilities)[0] == expected


@pytest.mark.parametrize("environ, expected", [
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, "none"), ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, "none"),
    ({"TF_ENABLE_ONEDNN_OPTS": "0"}, "none"),
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, "mixed_bfloat16"),
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, "mixed_bfloat16"),
    ({"ONEDNN_MAX_CPU_ISA": "ALL"}, "mixed_bfloat16"), ({}, "mixed_bfloat16"),
])
def test_onednn_capped_below_bfloat16_means_float32(environ, expected):
    assert choose_mixed_precision(flags=EPYC_FLAGS, capabilities=[],
                                  environ=environ)[0] == expected


def test_a_multi_worker_cluster_is_not_left_to_each_worker():
    policy, reason = resolve_mixed_precision("auto", None, across_workers=True,
                                             flags=EPYC_FLAGS, capabilities=[])
    assert policy == "none" and "set train.mixed_precision explicitly" in reason
    assert resolve_mixed_precision("auto", "mixed_bfloat16", across_workers=True)[0] == \
        "mixed_bfloat16"  # a resumed cluster run keeps what it recorded


def test_a_concrete_setting_or_a_recorded_choice_is_kept():
    assert resolve_mixed_precision("none", flags=EPYC_FLAGS, capabilities=[])[0] == "none"
    assert resolve_mixed_precision("auto", "none", flags=EPYC_FLAGS, capabilities=[]) == (
        "none", "recorded by the run being resumed")
    assert resolve_mixed_precision("auto", None, flags=EPYC_FLAGS, capabilities=[],
                                   environ={})[0] == "mixed_bfloat16"


def test_cpu_flags_reads_proc_cpuinfo_format(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16\n")
    assert cpu_flags(str(info)) == {"fpu", "avx2", "avx512_bf16", "amx_bf16"}
    assert cpu_flags(str(tmp_path / "missing")) == set()


def test_auto_is_logged_recorded_and_kept_when_resumed_elsewhere(digits16, tmp_path, monkeypatch,
                                                                capsys):
    from pipeline.train import train
    from tests.small_runs import small_config

    run_dir = str(tmp_path / "run")
    monkeypatch.setattr(precision, "gpu_capabilities", lambda: [])
    monkeypatch.setattr(precision, "cpu_flags", lambda: set(EPYC_FLAGS))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    config = small_config(digits16, "train.mixed_precision=auto", "train.epochs=1",
                          "train.knn_every=0", "train.view_images=0")
    train(config, run_dir)
    assert "train.mixed_precision auto -> mixed_bfloat16" in capsys.readouterr().out
    recorded = yaml.safe_load(open(f"{run_dir}/config.yaml"))["train"]["mixed_precision"]
    assert recorded == "mixed_bfloat16"

    # resumed (one more epoch) on a machine without bfloat16: the run keeps its choice
    monkeypatch.setattr(precision, "cpu_flags", lambda: set(OLDER_FLAGS))
    summary = train(small_config(digits16, "train.mixed_precision=auto", "train.epochs=2",
                                 "train.knn_every=0", "train.view_images=0"), run_dir)
    assert summary["final"]["epoch"] == 2
    assert "recorded by the run being resumed" in capsys.readouterr().out
    assert yaml.safe_load(open(f"{run_dir}/config.yaml"))["train"]["mixed_precision"] == \
        "mixed_bfloat16"
