"""Free-running block groups (sim.schedule = "async", issue 24): the virtual-clock simulation's
semantics (pure), and the one-process engine that executes it: reproducible bit for bit, equal to the
pipelined schedule with delayed feedback when every group takes the same time, and different, as it
should be, with a straggler."""
import shutil

import numpy as np
import pytest

from analysis.store import open_run
from launch.show_schedule import main as schedule_main
from sim.errors import ConfigError
from sim.pipeline.free_running import FreeRunning, lockstep_duration, timeline
from sim.pipeline.schedule import Schedule
from sim.record.log_format import STORE_NAME
from sim.run.plan import make_plan
from tests.helpers import (
    args,
    assert_same_weights,
    batches_of,
    differing_tensors,
    final_weights,
    run_config,
    single_process,
    summary,
    threads_of,
    trained_with_delays,
)
from tests.ranks import run_ranks

THREE = ((0, 1), (2, 3), (4, 5))
WAITS = (True, True, False)
DFB_ASYNC = ["method=clapp_pp_dfb", "sim.schedule=async", "sim.placement=[[0,1],[2,3],[4,5]]",
             "sim.block_time=[1,1,1,1,1,1]"]


def setup(speeds=(1,) * 6, **options) -> FreeRunning:
    return FreeRunning(THREE, (1.0,) * 6, tuple(map(float, speeds)), WAITS, **options)


def actions(events, group):
    return [str(e) for e in events if e.group == group]


@pytest.mark.parametrize("policy", ["newest", "fifo"])
def test_equal_speeds_and_depth_one_is_the_pipelined_schedule_with_delayed_feedback(policy):
    events = timeline(setup(policy=policy), 0, 12)
    pipelined = Schedule("pipelined", "delayed", WAITS)
    for group in range(3):
        expected = [str(a) for a in pipelined.actions(group, 0, 12) if a.kind in "FU"]
        assert actions(events, group) == expected
        forwards = [e for e in events if e.group == group and e.kind == "F"]
        assert [e.begin for e in forwards] == [2.0 * (b + group) for b in range(12)]  # one tick behind the group below
    for group, delay in ((0, 2), (1, 1)):  # K - 1 - g, the delayed schedule's delay; less for the run's last batches
        ages = [e.age for e in events if e.group == group and e.kind == "U"]
        assert ages == [delay] * (12 - delay) + list(range(delay - 1, -1, -1))
    assert lockstep_duration(setup(), 0, 12) == max(e.end for e in events)


def test_the_simulation_is_reproducible_and_its_jitter_is_seeded():
    jittery = setup(jitter=0.5, seed=3)
    assert timeline(jittery, 0, 40) == timeline(jittery, 0, 40)
    assert timeline(jittery, 0, 40) != timeline(setup(jitter=0.5, seed=4), 0, 40)


def test_newest_lets_a_straggler_drop_batches_and_the_others_run_at_their_pace():
    slow = setup(speeds=(1, 1, 1, 0.25, 1, 1))  # group 1 takes 5 ticks, the others 2
    events = timeline(slow, 0, 40)
    taken = [sorted(e.batch for e in events if e.group == g and e.kind == "F") for g in range(3)]
    assert taken[0] == list(range(40))
    assert 8 <= len(taken[1]) < 20 and taken[1][-1] == 39  # the newest each time, the last batch always
    assert taken[2] == taken[1]  # the top group learns from what the straggler passes on
    assert all(e.age == 0 for e in events if e.kind == "F")  # newest: always the freshest there was
    for g in (0, 1):  # every batch a waiting group forwarded is updated with its context, or forgotten
        settled = sorted(e.batch for e in events if e.group == g and e.kind in "UX")
        assert settled == taken[g]
        assert {e.batch for e in events if e.group == g and e.kind == "U"} == set(taken[2])
    assert max(e.end for e in events) < lockstep_duration(slow, 0, 40) / 1.8


@pytest.mark.parametrize("depth", [1, 3])
def test_fifo_learns_every_batch_and_never_holds_more_than_its_depth(depth):
    slow = setup(speeds=(1, 1, 1, 0.25, 1, 1), policy="fifo", depth=depth)
    events = timeline(slow, 0, 30)
    for g in range(3):
        assert sorted(e.batch for e in events if e.group == g and e.kind == "F") == list(range(30))
    for g in (1, 2):  # outputs made below and not yet taken, whenever a group takes one: the mailbox's
        made = [e.end for e in events if e.group == g - 1 and e.kind == "F"]  # depth, plus the one output
        taken = [e.begin for e in events if e.group == g and e.kind == "F"]  # its blocked sender holds
        held = max(sum(m <= when for m in made) - sum(t < when for t in taken) for when in taken)
        assert held == depth + 1 if g == 1 else held <= depth + 1  # full below the straggler only
    last = next(e for e in events if e.group == 0 and e.batch == 29)
    assert last.begin > 29 * 5 - 5 * (depth + 2)  # group 0 (2 ticks a batch) was held to the straggler's 5
    ages = [e.age for e in events if e.group == 1 and e.kind == "F"]
    assert max(ages) == depth - 1  # a full mailbox: the oldest of `depth`, the sender holding one more back


def test_the_engine_equals_the_delayed_pipeline_when_groups_are_equal(tmp_path):
    alone = single_process(tmp_path / "async", *DFB_ASYNC)
    assert_same_weights(alone, single_process(tmp_path / "again", *DFB_ASYNC))  # reproducible bit for bit
    config = run_config(*DFB_ASYNC)
    with threads_of(config):
        batches = batches_of(config)
        assert_same_weights(trained_with_delays(config, batches, [2, 2, 1, 1, 0, 0]), alone)
    found = summary(tmp_path / "async")
    assert found["schedule"] == "async"
    blocks = found["free_running"]["blocks"]
    assert blocks["0"]["context_age"] == {"0": 1, "1": 1, "2": 4} and blocks["2"]["context_age"] == {"0": 1, "1": 5}
    assert found["free_running"]["speedup_over_lockstep"] == 1.0


def test_a_straggler_changes_what_is_learned_reproducibly(tmp_path):
    slow = [*DFB_ASYNC, "sim.block_speed=[1,1,1,0.25,1,1]", "train.steps=12"]
    once = single_process(tmp_path / "slow", *slow)
    assert_same_weights(once, single_process(tmp_path / "slow_again", *slow))
    assert differing_tensors(once, single_process(tmp_path / "equal", *DFB_ASYNC, "train.steps=12"))
    blocks = summary(tmp_path / "slow")["free_running"]["blocks"]
    assert blocks["0"]["batches"] == 12 and blocks["2"]["batches"] < 12
    traced = single_process(tmp_path / "trace", *slow, "sim.stash=false")  # the eligibility trace runs free too
    assert differing_tensors(once, traced)


def test_show_schedule_draws_the_timeline(capsys):
    assert schedule_main(["launch/configs/tiny.toml", "--world-size", "1", "--steps", "8", "--set",
                          "sim.schedule=async", "--set", "method=clapp_pp_dfb", "--set",
                          "sim.block_speed=[1,1,1,0.5,1,1]"]) == 0
    out = capsys.readouterr().out
    assert "group 3 (3)" in out and "F0" in out and "lockstep (pipelined) would take" in out


@pytest.mark.parametrize("overrides, message", [
    (["sim.mailbox=lifo"], "sim.mailbox = 'lifo' is not one of newest, fifo"),
    (["sim.mailbox_depth=0"], "a mailbox holds at least 1 message"),
    (["sim.block_speed=[1,1,0.5]"], "sim.block_speed has 3 values; give one per block"),
    (["sim.block_speed=[1,1,1,0,1,1]"], "every value must be a number > 0"),
    (["sim.block_time=[1,1,1,-1,1,1]"], "every value must be a number > 0"),
    (["sim.speed_jitter=-0.1"], "give a number >= 0"),
    (["sim.feedback_delay=2"], "do not apply to sim.schedule = 'async'"),
    (["sim.placement=[[0,1],[3,4,5]]"], "block"),
])
def test_bad_async_settings_are_refused_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_plan(run_config("sim.schedule=async", *overrides), 1)


def test_async_refuses_what_it_cannot_run():
    with pytest.raises(ConfigError, match="paces real processes"):
        make_plan(run_config("sim.schedule=async", "sim.pace_s=0.1"), 1)
    with pytest.raises(ConfigError, match="end-to-end backprop"):
        make_plan(run_config("sim.schedule=async", "method=bp_infonce"), 1)
    with pytest.raises(ConfigError, match="sim.replicas = 1"):
        make_plan(run_config("sim.schedule=async", "sim.replicas=2"), 2)


PACED = ["method=clapp_pp_dfb", "sim.schedule=async", "sim.placement=[[0,1],[2,3],[4,5]]",
         "sim.block_time=[1,1,1,1,1,1]", "sim.block_speed=[1,1,1,0.25,1,1]", "sim.pace_s=0.05", "train.steps=40"]


def mean_age(histogram: dict) -> float:
    return sum(int(a) * n for a, n in histogram.items()) / sum(histogram.values())


def test_three_processes_run_free_and_the_simulation_predicts_their_ages(tmp_path):
    outcomes = run_ranks(3, args(*PACED, "log.every=10", out=tmp_path / "run"), tmp_path / "logs")
    assert [o.exitcode for o in outcomes] == [0, 0, 0], outcomes[1].log[-2000:]
    log = open_run(tmp_path / "run")  # each rank logs every row, a straggler when it reaches it
    assert all(list(log.blocks[b].steps) == [0, 10, 20, 30] for b in range(6)) and not log.damage
    assert log.blocks[5].activations(3).shape[0] == 32
    ages = log.blocks[2].series["context_age"]  # the straggler's group waits for feedback
    assert np.isnan(ages[0]) and np.nanmin(ages[1:]) >= 0 and np.isfinite(log.blocks[4].series["input_age"][1:]).all()
    found = summary(tmp_path / "run")["free_running"]
    assert found["engine"] == "processes" and found["most_in_mailbox"][1:] == [1, 1]  # newest holds one
    measured, predicted = found["blocks"], found["predicted_blocks"]
    assert measured["0"]["batches"] == 40 and measured["2"]["batches"] < 30  # the straggler skips batches
    for block in ("0", "2"):  # every batch a waiting block forwarded was updated or forgotten
        assert measured[block]["updates_with_feedback"] + measured[block]["forgotten"] == measured[block]["batches"]
    # Fed the seconds per batch each process measured, the simulation predicts what the processes did, within
    # 30 % of the batches learned and max(1.5, 30 %) of the mean context age (timing on a loaded machine).
    for block in ("2", "4"):
        assert abs(measured[block]["batches"] - predicted[block]["batches"]) <= 0.3 * predicted[block]["batches"]
    for block in ("0", "2"):
        expected = mean_age(predicted[block]["context_age"])
        assert abs(mean_age(measured[block]["context_age"]) - expected) <= max(1.5, 0.3 * expected), found


def test_fifo_processes_learn_every_batch_within_their_mailboxes(tmp_path):
    run = [*PACED, "sim.mailbox=fifo", "sim.mailbox_depth=2", "train.steps=24"]
    outcomes = run_ranks(3, args(*run, out=tmp_path / "run"), tmp_path / "logs")
    assert [o.exitcode for o in outcomes] == [0, 0, 0], outcomes[1].log[-2000:]
    found = summary(tmp_path / "run")["free_running"]
    assert all(block["batches"] == 24 and block["forgotten"] == 0 for block in found["blocks"].values())
    assert all(most <= 2 for most in found["most_in_mailbox"][1:])
    assert max(int(a) for a in found["blocks"]["2"]["input_age"]) <= 1  # the oldest of at most 2 taken


def test_a_failing_free_running_rank_stops_the_others_naming_it(tmp_path):
    run = [*PACED, "sim.mailbox=fifo", "train.steps=30"]
    outcomes = run_ranks(3, args(*run, out=tmp_path / "run"), tmp_path / "logs", fault=(2, 3))
    assert all(o.exitcode not in (0, None) for o in outcomes), [o.exitcode for o in outcomes]
    for outcome in (outcomes[0], outcomes[1]):  # one waits for a credit, one for input or feedback
        assert "rank 2 failed: NonFiniteLoss" in outcome.log, outcome.log[-1500:]


@pytest.mark.parametrize("world_size", [1, 3])
def test_a_resumed_free_running_run_repeats_the_uninterrupted_one(tmp_path, world_size):
    run = [*PACED, "sim.mailbox=fifo", "train.steps=12", "train.checkpoint_every=6"]
    if world_size == 1:
        run.remove("sim.pace_s=0.05")  # one process runs on its virtual clock
    whole = run_ranks(world_size, args(*run, out=tmp_path / "whole"), tmp_path / "logs_whole")
    assert [o.exitcode for o in whole] == [0] * world_size, whole[0].log[-2000:]
    out = tmp_path / "stopped"
    crashed = run_ranks(world_size, args(*run, out=out), tmp_path / "logs1", fault=(world_size - 1, 9))
    assert all(o.exitcode not in (0, None) for o in crashed)
    resumed = run_ranks(world_size, ["--resume", str(out)], tmp_path / "logs2")
    assert [o.exitcode for o in resumed] == [0] * world_size, resumed[0].log[-2000:]
    assert "resuming" in resumed[0].log
    if world_size == 1:  # one process is exact: bit for bit
        assert_same_weights(final_weights(tmp_path / "whole"), final_weights(out))
    else:  # fifo learns every batch; the timing of feedback may differ between runs, so only the cut is exact
        assert summary(out)["free_running"]["blocks"]["0"]["batches"] == 6  # the second stretch, after the cut


def test_a_simulated_run_logs_the_ages_and_an_older_log_reads_without_them(tmp_path):
    out = tmp_path / "run"
    single_process(out, *DFB_ASYNC, "sim.block_speed=[1,1,1,0.25,1,1]", "log.every=2", "train.steps=8")
    log = open_run(out)
    assert list(log.blocks[0].steps) == [0, 2, 4, 6] and log.blocks[5].activations(3).shape[0] == 32
    first = log.blocks[0].series  # a waiting group: its context ages are logged
    assert np.isnan(first["context_age"][0]) and np.nanmin(first["context_age"]) >= 1  # none before the first row
    assert np.all(first["input_age"][1:] == 0)  # the data's own group: always the newest batch
    shutil.rmtree(out / STORE_NAME / "block0" / "input_age")  # as a log written before the ages were
    older = open_run(out)
    assert np.isnan(older.blocks[0].series["input_age"]).all() and not older.damage
    assert np.array_equal(older.blocks[0].series["context_age"], first["context_age"], equal_nan=True)


def test_free_running_memory_counts_every_batch_a_waiting_group_holds():
    slow_top = [*DFB_ASYNC, "sim.block_speed=[1,1,1,1,1,0.25]"]
    plan = make_plan(run_config(*slow_top), 1)
    events = timeline(plan.free_running, 0, 200)
    longest = max(e.age for e in events if e.kind == "U" and e.group == 0)
    pending = plan.pending_batches([0])
    assert pending >= longest + 1 > 2  # the waits of a group that forwards 4 batches per context
    one_batch = make_plan(run_config("method=clapp_pp_dfb"), 1).held_memory([0])  # exact feedback: one batch
    stashed, traced = plan.held_memory([0]), make_plan(run_config(*slow_top, "sim.stash=false"), 1).held_memory([0])
    assert stashed["activity"] == pending * one_batch["activity"] and stashed["stashed_weights"] > 0
    assert traced["stashed_weights"] == 0 and traced["activity"] < stashed["activity"]
