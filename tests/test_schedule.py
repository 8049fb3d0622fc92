"""Schedules as data: action lists, delays, flushes at checkpoints, and the printed grid."""
import pytest
import torch

from launch.show_schedule import main as schedule_main
from sim.pipeline.schedule import Action, Message, Schedule, render_grid, simulate
from sim.pipeline.transport import InProcess, ProtocolError
from tests.helpers import ROOT

CONFIG = str(ROOT / "launch/configs/fashion_mnist.toml")


def kinds(schedule: Schedule, rank: int, stop: int, start: int = 0) -> list[str]:
    return [str(a) for a in schedule.actions(rank, start, stop)]


def test_pipelined_lateral_ranks_only_forward():
    schedule = Schedule("pipelined", "exact", (False, False, False))
    assert kinds(schedule, 1, 4) == ["F0", "F1", "F2", "F3", "C4"]


def test_exact_feedback_updates_before_the_next_batch():
    schedule = Schedule("pipelined", "exact", (True, True, False))
    assert kinds(schedule, 0, 3) == ["F0", "U0", "F1", "U1", "F2", "U2", "C3"]
    assert kinds(schedule, 2, 3) == ["F0", "F1", "F2", "C3"]  # the top block is here: no message waited for


@pytest.mark.parametrize("k", [2, 3, 6])
def test_delayed_feedback_lands_delay_batches_late(k):
    schedule = Schedule("pipelined", "delayed", tuple(r < k - 1 for r in range(k)))
    for rank in range(k - 1):
        delay = schedule.delay(rank)
        assert delay == k - 1 - rank
        actions = kinds(schedule, rank, 20)
        for step in range(20 - delay - 1):  # U(s) sits between F(s + delay) and F(s + delay + 1)
            assert actions.index(f"F{step + delay}") < actions.index(f"U{step}") < actions.index(f"F{step + delay + 1}")


def test_checkpoints_flush_pending_updates():
    schedule = Schedule("pipelined", "delayed", (True, True, False), checkpoint_every=3)
    actions = kinds(schedule, 0, 6)
    assert actions == ["F0", "F1", "F2", "U0", "U1", "U2", "C3", "F3", "F4", "F5", "U3", "U4", "U5", "C6"]
    assert kinds(schedule, 0, 6, start=3) == actions[7:]  # a resumed run repeats the same actions


def test_alignment_gradients_follow_the_update():
    schedule = Schedule("pipelined", "exact", (True, True, False), align_every=2)
    assert kinds(schedule, 1, 3) == ["F0", "U0", "G0", "F1", "U1", "F2", "U2", "G2", "C3"]
    assert "G0" not in kinds(schedule, 2, 3)  # the top rank back-propagates within its forward


def test_sequential_rank_zero_waits_for_the_top():
    assert kinds(Schedule("sequential", "exact", (False, False)), 0, 2) == ["F0", "W0", "F1", "W1", "C2"]
    with pytest.raises(ValueError, match="needs sim.schedule = 'pipelined'"):
        Schedule("sequential", "delayed", (True, False))


@pytest.mark.parametrize("k, name, feedback, waits, align", [
    (k, n, f, w, a) for k in (1, 2, 3, 6) for n, f in (("pipelined", "exact"), ("pipelined", "delayed"),
                                                      ("sequential", "exact"))
    for w in (False, True) for a in (0, 2)])
def test_no_schedule_deadlocks(k, name, feedback, waits, align):
    """Every message, held-out and alignment ones included, is received as the kind it was sent."""
    schedule = Schedule(name, feedback, tuple(waits and r < k - 1 for r in range(k)), checkpoint_every=4,
                        log_every=3 if align else 0, align_every=align)
    timeline = simulate(schedule, 9)
    assert all(sum(a.kind == "F" for _, a in events) == 9 for events in timeline)


def test_messages_are_data_that_a_wrong_order_fails():
    schedule = Schedule("pipelined", "exact", (True, True, False), log_every=2, align_every=2)
    middle = [str(m) for m in schedule.messages(1, Action("F", 0))]
    assert middle == ["recv heldout from 0", "send heldout to 2", "recv activations from 0", "send activations to 2"]
    assert [str(m) for m in schedule.messages(2, Action("F", 2))] == [
        "recv heldout from 1", "recv activations from 1", "send feedback to 0", "send feedback to 1",
        "send gradient to 1"]
    assert [str(m) for m in schedule.messages(1, Action("G", 2))] == ["recv gradient from 2", "send gradient to 0"]
    assert schedule.messages(1, Action("F", 1)) == (Message("activations", 0, False), Message("activations", 2, True))

    class GradientFirst(Schedule):  # the top rank sends the gradient before the feedback rank 1 waits for
        def messages(self, rank: int, action: Action) -> tuple[Message, ...]:
            listed = super().messages(rank, action)
            return tuple(sorted(listed, key=lambda m: m.kind != "gradient")) if rank == 2 else listed

    with pytest.raises(RuntimeError, match="rank 1 expects feedback from rank 2 in U0, but the next message"):
        simulate(GradientFirst("pipelined", "exact", (True, True, False), log_every=2, align_every=2), 3)


def test_the_link_refuses_a_message_its_schedule_does_not_list():
    link = InProcess(torch.device("cpu"))  # the check lives in every transport: no process group needed
    link.rank = 1
    link.begin([Message("activations", 0, False), Message("activations", 2, True)])
    link._check(Message("activations", 0, False))
    with pytest.raises(ProtocolError, match="rank 1 did send feedback to 0, but its schedule lists send activations"):
        link._check(Message("feedback", 0, True))
    link.begin([Message("token", 2, False)])
    with pytest.raises(ProtocolError, match="W3 did not recv token from 2"):
        link.end(Action("W", 3))


def test_grid_shows_the_stalls_of_exact_feedback():
    exact = render_grid(Schedule("pipelined", "exact", (True, False)), 4)
    lateral = render_grid(Schedule("pipelined", "exact", (False, False)), 4)
    assert exact.splitlines()[1].split()[1:4] == ["F0", ".", "U0"]  # rank 0 waits for the top
    assert lateral.splitlines()[1].split()[1:5] == ["F0", "F1", "F2", "F3"]  # never waits


def test_schedule_command_prints_the_grid(capsys):
    assert schedule_main([CONFIG, "--world-size", "3", "--set", "method=clapp_pp_dfb",
                          "--set", "sim.feedback=delayed"]) == 0
    out = capsys.readouterr().out
    assert "delayed feedback (delay in steps per block: [2, 2, 1, 1, 0, 0]) on 3 process(es)" in out
    assert "feedback delay per rank (steps): [2, 1, 0]" in out
    assert "rank 2 F0    recv heldout from 1, recv activations from 1, send feedback to 0, send feedback to 1" in out
    assert schedule_main([CONFIG, "--world-size", "7"]) == 2
