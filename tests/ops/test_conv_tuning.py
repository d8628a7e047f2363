"""Tuning: measured once per machine into a JSON file, then read; budgets; overrides.

Each test tunes one tiny conv (`MIN_TUNED_FLOPS` lowered so that it qualifies) into its
own cache folder: never a full tuning run.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from vi_seg_jax.errors import DataError
from vi_seg_jax.ops import (
    ConvChoice,
    ConvEngine,
    clear_tuning_memory,
    conv_choice,
    conv_tuning,
    tuning_file,
    tuning_report,
)
from vi_seg_jax.ops.conv_forms import FORWARD_FORMS, KERNEL_GRAD_FORMS

X_SHAPE, W_SHAPE, PADS = (1, 6, 6, 6, 4), (3, 3, 3, 4, 4), ((1, 1),) * 3


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache folder, tuning allowed for tiny convs, no override in force."""
    monkeypatch.setenv("VI_SEG_JAX_CACHE", str(tmp_path))
    monkeypatch.delenv(conv_tuning.ENV_FORMULATION, raising=False)
    monkeypatch.setenv(conv_tuning.ENV_BUDGET, "60")
    monkeypatch.delenv(conv_tuning.ENV_MEMORY, raising=False)
    monkeypatch.setattr(conv_tuning, "MIN_TUNED_FLOPS", 0.0)
    clear_tuning_memory()
    yield tmp_path
    clear_tuning_memory()


def _choose():
    return conv_choice(X_SHAPE, W_SHAPE, PADS, jnp.float32)


def test_first_use_measures_and_records_the_fastest(fresh_cache):
    choice = _choose()
    report = tuning_report()
    # Forward and input gradient share one entry here (C = O): two pieces measured.
    assert report.tuned == 2 and report.seconds > 0
    path = tuning_file()
    assert path.parent.parent == fresh_cache and path.exists()
    data = json.loads(path.read_text())
    assert data["machine"]["jax"] and data["machine"]["backend"] == jax.default_backend()
    entries = data["entries"]
    assert len(entries) == 2
    for key, entry in entries.items():
        forms = FORWARD_FORMS if key.startswith("forward") else KERNEL_GRAD_FORMS
        assert set(entry["seconds"]) == set(forms)  # 6 output slices: every slab size
    forward = next(e for k, e in entries.items() if k.startswith("forward"))
    kernel_grad = next(e for k, e in entries.items() if k.startswith("kernel_grad"))

    def fastest(entry):
        return min(entry["seconds"], key=entry["seconds"].get)

    assert choice == ConvChoice(fastest(forward), fastest(forward), fastest(kernel_grad))


def test_a_second_process_reuses_the_file_and_deleting_it_retunes(fresh_cache):
    first = _choose()
    clear_tuning_memory()  # what a new process starts with
    assert _choose() == first
    report = tuning_report()
    assert report.tuned == 0 and report.seconds == 0.0 and report.reused == 3

    tuning_file().unlink()
    clear_tuning_memory()
    _choose()
    assert tuning_report().tuned == 2 and tuning_file().exists()


def test_entries_of_other_processes_are_kept(fresh_cache):
    _choose()
    data = json.loads(tuning_file().read_text())
    data["entries"]["forward other-shape"] = {"form": "xla", "seconds": {}}
    tuning_file().write_text(json.dumps(data))
    clear_tuning_memory()
    conv_choice((1, 6, 6, 6, 4), (3, 3, 3, 4, 2), PADS, jnp.float32)  # tunes new entries
    entries = json.loads(tuning_file().read_text())["entries"]
    assert "forward other-shape" in entries and len(entries) > 3


def test_forced_formulation_and_rule_measure_nothing(fresh_cache, monkeypatch):
    monkeypatch.setenv(conv_tuning.ENV_FORMULATION, "xla")
    assert _choose() == ConvChoice.every("xla")
    monkeypatch.setenv(conv_tuning.ENV_FORMULATION, "rule")
    rule = conv_tuning.rule_form(X_SHAPE, W_SHAPE, PADS, "forward", jax.default_backend())
    assert _choose().forward == rule
    assert tuning_report().tuned == 0 and not tuning_file().exists()
    monkeypatch.setenv(conv_tuning.ENV_FORMULATION, "fastest")
    with pytest.raises(DataError, match=conv_tuning.ENV_FORMULATION):
        _choose()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (conv_tuning.ENV_FORMULATION, "fastest"),
        (conv_tuning.ENV_BUDGET, "ten"),
        (conv_tuning.ENV_MEMORY, "-5"),
    ],
)
def test_a_bad_setting_is_a_one_line_cli_error(name, value, tmp_path):
    """Checked before the command does anything: exit 2, one line naming the variable."""
    env = {**os.environ, name: value, "VI_SEG_JAX_CACHE": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-m", "experiments.train", "--workdir", str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [run.stderr.strip()]
    assert name in run.stderr and value in run.stderr
    assert not (tmp_path / "run").exists()


def test_zero_budget_and_small_convs_use_the_rule(fresh_cache, monkeypatch):
    monkeypatch.setenv(conv_tuning.ENV_BUDGET, "0")
    _choose()
    assert tuning_report().tuned == 0 and tuning_report().skipped_budget == 3
    monkeypatch.setenv(conv_tuning.ENV_BUDGET, "60")
    monkeypatch.setattr(conv_tuning, "MIN_TUNED_FLOPS", 1e12)
    _choose()
    assert tuning_report().tuned == 0 and tuning_report().skipped_small == 3
    assert not tuning_file().exists()


def test_candidates_over_the_memory_budget_are_not_timed(fresh_cache, monkeypatch):
    # Just above the input: XLA's conv (input + output) fits, the expanded forms do not.
    monkeypatch.setenv(conv_tuning.ENV_MEMORY, str(4 * 6**3 * 4 * 2.5 / 2**20))
    _choose()
    entries = json.loads(tuning_file().read_text())["entries"]
    forward = next(e for k, e in entries.items() if k.startswith("forward"))
    over = {f for f, mb in forward["memory_mb"].items() if mb * 2**20 > 4 * 6**3 * 4 * 2.5}
    assert over and not over & set(forward["seconds"])
    assert _choose().forward not in over


def test_a_lower_memory_budget_applies_to_recorded_entries(fresh_cache, monkeypatch):
    _choose()
    entries = json.loads(tuning_file().read_text())["entries"]
    forward = next(e for k, e in entries.items() if k.startswith("forward"))
    least = min(forward["memory_mb"].values())
    fits = {f for f, mb in forward["memory_mb"].items() if mb <= least}
    assert fits != set(forward["seconds"])  # the budget excludes some
    monkeypatch.setenv(conv_tuning.ENV_MEMORY, str(least))
    clear_tuning_memory()
    assert _choose().forward == min(fits, key=forward["seconds"].get)
    assert tuning_report().tuned == 0


def test_a_forward_only_program_tunes_no_gradient(fresh_cache):
    engine = ConvEngine()
    x, w = jnp.ones(X_SHAPE, jnp.float32), jnp.ones(W_SHAPE, jnp.float32)
    dn = ("NDHWC", "DHWIO", "NDHWC")

    def forward(x, w):
        return jnp.sum(engine(x, w, (1, 1, 1), PADS, dimension_numbers=dn))

    jax.jit(forward).lower(x, w)
    keys = json.loads(tuning_file().read_text())["entries"]
    assert [k.split()[0] for k in keys] == ["forward"] and tuning_report().tuned == 1
    jax.jit(jax.grad(forward, argnums=1)).lower(x, w)
    keys = json.loads(tuning_file().read_text())["entries"]
    assert sorted(k.split()[0] for k in keys) == ["forward", "kernel_grad"]


def test_a_read_only_cache_still_tunes_for_the_process(fresh_cache, monkeypatch):
    blocked = fresh_cache / "file"
    blocked.write_text("")
    monkeypatch.setenv("VI_SEG_JAX_CACHE", str(blocked))  # the tuning folder cannot be made
    clear_tuning_memory()
    with pytest.warns(UserWarning, match="tuning file"):
        first = _choose()
    assert tuning_report().tuned == 2
    assert _choose() == first and tuning_report().tuned == 2  # remembered in the process
