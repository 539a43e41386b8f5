"""`casa.study.schedule`: units run after what they need, the longest ready first, in worker processes with
--jobs; and the full study's plan (one shared stage 0, insertion@flops after casa and insertion, the
cross-image experiment's own stage 0 and arms)."""

import os
from pathlib import Path

import pytest

from casa.study.run import HEADLINE_ARMS, SIZES, StudyConfig, arms_of, plan_units, seed_arms
from casa.study.schedule import Unit, run_units


def test_units_run_after_their_dependencies_and_the_longest_ready_first():
    order = []

    def note(key):
        order.append(key)
        return key.upper()

    units = [Unit("short", note, ("short",), cost=1.0),
             Unit("long", note, ("long",), cost=5.0),
             Unit("after-short", note, ("after-short",), after=("short",), cost=9.0),
             Unit("middle", note, ("middle",), cost=3.0)]
    results = run_units(units, jobs=1)
    # "after-short" is the costliest, but only ready once "short" ran
    assert order == ["long", "middle", "short", "after-short"]
    assert results == {"short": "SHORT", "long": "LONG", "after-short": "AFTER-SHORT", "middle": "MIDDLE"}


def test_bad_plans_are_refused_before_anything_runs():
    ran = []
    with pytest.raises(ValueError, match=r"depend on \['missing'\]"):
        run_units([Unit("a", ran.append, (1,), after=("missing",))])
    with pytest.raises(ValueError, match="duplicate unit keys"):
        run_units([Unit("a", ran.append, (1,)), Unit("a", ran.append, (2,))])
    with pytest.raises(ValueError, match="cycle"):
        run_units([Unit("a", ran.append, (1,), after=("b",)), Unit("b", ran.append, (2,), after=("a",))])
    assert ran == []


def test_jobs_run_units_in_worker_processes_and_return_their_results(tmp_path):
    # Path.write_text returns the characters written; getpid says which process ran the unit
    units = [Unit(f"w{i}", Path.write_text, (tmp_path / f"{i}.txt", "x" * i)) for i in range(1, 4)]
    units += [Unit(f"pid{i}", os.getpid, after=(f"w{i}",)) for i in range(1, 4)]
    results = run_units(units, jobs=2, threads=2)
    assert [results[f"w{i}"] for i in range(1, 4)] == [1, 2, 3]
    assert [(tmp_path / f"{i}.txt").read_text() for i in range(1, 4)] == ["x", "xx", "xxx"]
    pids = {results[f"pid{i}"] for i in range(1, 4)}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


def test_a_failing_unit_fails_the_run(tmp_path):
    with pytest.raises(FileNotFoundError):
        run_units([Unit("bad", Path.read_text, (tmp_path / "absent.txt",)), Unit("ok", os.getpid)], jobs=2)


def test_the_full_plan_shares_one_stage0_and_orders_the_flops_arm(tmp_path):
    spec = StudyConfig(size="full").spec
    arms = arms_of(spec["variants"], spec["full_arms"])
    units = {u.key: u for u in plan_units(spec, ["color"], arms, tmp_path)}
    assert [k for k in units if k.startswith("stage0/")] == ["stage0/s0"]
    arm_runs = [k for k in units if "/" not in k]
    assert len(arm_runs) == 3 * len(arms) + 2 * len(HEADLINE_ARMS)
    assert all(units[f"{a}_s{s}"].after[0] == "stage0/s0" for s, names in seed_arms(spec, arms) for a in names)
    assert units["insertion@flops_s4"].after == ("stage0/s0", "casa_s4", "insertion_s4")
    cross = SIZES["full"]["crossimage"]
    # the cross-image experiment: one stage 0 of its own, every seed's arms after it
    assert [k for k in units if k.startswith("crossimage/stage0/")] == ["crossimage/stage0/s0"]
    assert {units[f"crossimage/casa+m16_s{s}"].after for s in range(cross["seeds"])} == {("crossimage/stage0/s0",)}
    assert len([k for k in units if k.startswith("crossimage/") and "stage0" not in k]) == \
        cross["seeds"] * len(cross["arms"])
    # what is on disk is not planned again, and nothing waits for it
    (tmp_path / "stage0" / "s0").mkdir(parents=True)
    (tmp_path / "stage0" / "s0" / "stats.json").write_text("{}")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "casa_s4.json").write_text("{}")
    again = {u.key: u for u in plan_units(spec, ["color"], arms, tmp_path)}
    assert "stage0/s0" not in again and "casa_s4" not in again
    assert again["insertion@flops_s4"].after == ("insertion_s4",)
    # a run without casa has neither the flops arm nor the cross-image experiment
    assert not any(k.startswith(("insertion@flops", "crossimage/"))
                   for k in (u.key for u in plan_units(spec, ["color"], arms_of(["insertion", "ca"], []), tmp_path)))
