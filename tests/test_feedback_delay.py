"""Any feedback delay (sim.feedback_delay = d, issue 24): every block that learns from the top block's
context applies the update of batch s just before it forwards batch s + d + 1. One process runs it
as a delay line, K processes as their schedule; both equal an in-process reference that applies each
block's feedback d steps late, bit for bit (gloo, spawn, one thread per rank)."""
import pytest

from launch.show_schedule import main as schedule_main
from layers.model import feature_dims
from sim.errors import ConfigError
from sim.pipeline.schedule import Schedule, simulate
from sim.run.plan import make_plan
from tests.helpers import (
    TINY_CONFIG,
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

DFB = "method=clapp_pp_dfb"


def test_one_process_and_three_processes_run_the_same_delay(tmp_path):
    delay = [DFB, "sim.feedback_delay=3"]
    alone = single_process(tmp_path / "k1", *delay)
    outcomes = run_ranks(3, args(*delay, "sim.placement=[[0,1],[2,3],[4,5]]", out=tmp_path / "k3"), tmp_path / "logs")
    assert [o.exitcode for o in outcomes] == [0, 0, 0], outcomes[0].log
    assert_same_weights(alone, single_process(tmp_path / "k1_again", *delay))  # deterministic
    assert_same_weights(alone, final_weights(tmp_path / "k3"))  # the transport does not change the answer
    config = run_config(DFB)
    with threads_of(config):
        batches = batches_of(config)
        expected = [3, 3, 3, 3, 3, 0]  # the top block learns from its own context at once
        assert_same_weights(trained_with_delays(config, batches, expected), alone)
        assert differing_tensors(trained_with_delays(config, batches, [2, 2, 2, 2, 2, 0]), alone)  # d counts
    assert summary(tmp_path / "k1")["feedback_delay_steps"] == expected
    assert summary(tmp_path / "k3")["feedback_delay_steps"] == expected


def test_delay_zero_is_exact_feedback(tmp_path):
    assert_same_weights(single_process(tmp_path / "d0", DFB, "sim.feedback_delay=0"),
                        single_process(tmp_path / "exact", DFB, "sim.feedback=exact"))


@pytest.mark.parametrize("k", [2, 3, 6])
def test_a_delay_the_pipeline_cannot_keep_is_refused_naming_the_smallest(k):
    waits = tuple(r < k - 1 for r in range(k))
    for d in range(1, k - 1):
        with pytest.raises(ValueError, match=f"use 0 .* or at least {k - 1}"):
            Schedule("pipelined", "exact", waits, feedback_delay=d)
    for d in (0, k - 1, k + 4):
        schedule = Schedule("pipelined", "exact", waits, feedback_delay=d, checkpoint_every=5)
        assert [schedule.delay(r) for r in range(k)] == [d] * (k - 1) + [0]
        timeline = simulate(schedule, 12)  # no deadlock, every message received as the kind sent
        assert all(sum(a.kind == "F" for _, a in events) == 12 for events in timeline)


@pytest.mark.parametrize("overrides, message", [
    (["sim.feedback_delay=-2"], "give a delay in steps >= 0"),
    (["sim.feedback_delay=2", "sim.feedback=delayed"], "both set the delay"),
    (["sim.feedback_delay=2", "sim.schedule=sequential"], "needs sim.schedule = 'pipelined'"),
])
def test_bad_delays_are_refused_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        run_config(DFB, *overrides)


def test_a_rule_without_feedback_refuses_a_delay():
    with pytest.raises(ConfigError, match="clapp_pp has no top-down feedback to delay"):
        make_plan(run_config("method=clapp_pp", "sim.feedback_delay=2"), 1)
    with pytest.raises(ConfigError, match="at least 2"):
        make_plan(run_config(DFB, "sim.feedback_delay=1"), 3)


def test_show_schedule_shows_the_delay_of_each_block(capsys):
    assert schedule_main([str(TINY_CONFIG), "--world-size", "2", "--set", DFB, "--set", "sim.feedback_delay=4",
                          "--set", "sim.placement=[[0,1,2],[3,4,5]]"]) == 0
    shown = capsys.readouterr().out
    assert "feedback delayed 4 steps (delay in steps per block: [4, 4, 4, 4, 4, 0])" in shown


@pytest.mark.parametrize("k", [2, 3, 6])
@pytest.mark.parametrize("logged", [False, True])
def test_no_delay_deadlocks_with_the_sends_a_rank_keeps_in_flight(k, logged):
    """`simulate` lets a rank begin an action only with at most `sends_in_flight` unreceived sends,
    as the transport does: with too small a bound, long delays deadlock (a 3-rank run with d = 3 and
    2 sends in flight stopped); with the schedule's, none does."""
    waits = tuple(r < k - 1 for r in range(k))
    extra = {"log_every": 3, "align_every": 2} if logged else {}
    for d in (0, k - 1, k + 2, 3 * k + 5):
        schedule = Schedule("pipelined", "exact", waits, feedback_delay=d, checkpoint_every=7, **extra)
        timeline = simulate(schedule, 3 * k + 9)
        assert all(sum(a.kind == "F" for _, a in events) == 3 * k + 9 for events in timeline)


def test_a_bound_of_two_sends_deadlocks_a_long_delay():
    class TwoInFlight(Schedule):
        def sends_in_flight(self, rank: int) -> int:
            return 2

    with pytest.raises(RuntimeError, match="deadlocks"):
        simulate(TwoInFlight("pipelined", "exact", (True, True, False), feedback_delay=5), 12)


def test_without_stashing_delay_zero_is_still_exact_feedback(tmp_path):
    """sim.stash = false keeps no weights: the update comes from the kept input and pooled activity
    with the block's current weights; with no delay those are the forward pass's, so nothing changes."""
    exact = single_process(tmp_path / "exact", DFB)
    assert_same_weights(exact, single_process(tmp_path / "trace0", DFB, "sim.feedback_delay=0", "sim.stash=false"))


def test_without_stashing_a_delay_learns_with_current_weights_on_any_world_size(tmp_path):
    trace = [DFB, "sim.feedback_delay=3", "sim.stash=false"]
    alone = single_process(tmp_path / "k1", *trace)
    outcomes = run_ranks(3, args(*trace, "sim.placement=[[0,1],[2,3],[4,5]]", out=tmp_path / "k3"), tmp_path / "logs")
    assert [o.exitcode for o in outcomes] == [0, 0, 0], outcomes[0].log
    assert_same_weights(alone, final_weights(tmp_path / "k3"))
    stashed = single_process(tmp_path / "stashed", DFB, "sim.feedback_delay=3")
    # the updates use other weights: every waiting block ends elsewhere (and the top, which they feed)
    assert set(differing_tensors(alone, stashed)) >= {f"block {b} conv.conv.weight" for b in range(6)}


def test_the_memory_each_mode_holds():
    config = run_config(DFB, "model.width=1.0", "train.batch_size=32", "sim.feedback_delay=4")
    rows, blocks = 64, list(range(6))
    stash = make_plan(config, 1).held_memory(blocks)
    trace = make_plan(run_config(DFB, "model.width=1.0", "train.batch_size=32", "sim.feedback_delay=4",
                                 "sim.stash=false"), 1).held_memory(blocks)
    exact = make_plan(run_config(DFB, "model.width=1.0", "train.batch_size=32"), 1).held_memory(blocks)
    assert stash["optimizer_state"] == trace["optimizer_state"] == exact["optimizer_state"]
    assert stash["activity"] == 5 * exact["activity"]  # five batches' graphs (delay 4 + 1), every block kept
    assert exact["stashed_weights"] == trace["stashed_weights"] == 0 and stash["stashed_weights"] > 0
    # a trace: each pending batch's input of every block (3 x 32 x 32 into block 0, ...) and its pooled activity
    plan = make_plan(config, 1)
    dims = feature_dims(1.0, 32, plan.kernels)
    inputs = [3 * 32 * 32, 128 * 32 * 32, 256 * 16 * 16, 256 * 16 * 16, 512 * 8 * 8, 1024 * 4 * 4]
    assert trace["activity"] == 5 * sum(rows * (i + d) * 4 for i, d in zip(inputs, dims))
    assert trace["activity"] < stash["activity"] / 3
