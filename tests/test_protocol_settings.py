"""What a CPU-scale protocol chooses among: learning-rate schedules (hand-worked values, config
errors; their placement invariance is in test_distributed) and the validation probe, which never
looks at the test set."""
import math

import pytest
import torch

import launch.bench.protocol_search as search
from launch.compare import run_overrides, same_weights, verdict
from launch.probe import probe_finished_run
from layers.learning_rate import LearningRate
from sim.data.datasets import ImageSet, dataset_info, load_split
from sim.errors import ConfigError
from sim.run.evaluation import hold_out, linear_probe, sample_images
from tests.helpers import blocks_of, final_weights, run_config, single_process, summary, threads_of


def test_warm_up_then_cosine_by_hand():
    rate = LearningRate(1.0, "cosine", warmup_steps=2, total_steps=6, lr_min=0.1)
    # warm-up: 1/2, 2/2; then the cosine over steps 2..5 (3 intervals) from 1.0 to 0.1
    expected = [0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + math.cos(math.pi / 3)), 0.1 + 0.45 * (1 + math.cos(2 * math.pi / 3)),
                0.1]
    assert [rate.at(step) for step in range(6)] == pytest.approx(expected)
    assert rate.at(50) == pytest.approx(0.1)  # past the end it stays at lr_min
    constant = LearningRate(2e-4)
    assert not constant.varies and {constant.at(s) for s in range(100)} == {2e-4}
    assert LearningRate(2e-4, warmup_steps=4).at(0) == pytest.approx(5e-5)


def test_apply_sets_every_group():
    optimizer = torch.optim.AdamW([torch.zeros(2, requires_grad=True)], lr=1.0)
    LearningRate(1.0, "cosine", total_steps=3).apply(optimizer, 1)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)


@pytest.mark.parametrize("override, key", [("optim.schedule=linear", "optim.schedule"),
                                           ("optim.lr_min=1.0", "optim.lr_min"),
                                           ("optim.warmup_steps=-1", "optim.warmup_steps")])
def test_bad_schedules_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key):
        run_config(override)


def test_validation_probe_scores_on_held_out_training_images(tmp_path):
    """The run's probe, done again here on its final encoder: trained on 300 of the training images that
    are not held out, it scores the run's accuracies on the 500 held-out ones, and others on the test set."""
    settings = ["probe.epochs=1", "probe.validation=500", "probe.train_limit=300", "probe.augment=false"]
    single_process(tmp_path / "run", *settings)
    probe = summary(tmp_path / "run")["probe"]
    assert probe["scored_on"] == "validation" and (probe["train_images"], probe["scored_images"]) == (300, 500)
    config = run_config(*settings)
    rest, held = hold_out(load_split("synthetic", None, "train"), 500)
    trained_on = sample_images(rest, 300, config.train.seed)
    blocks, weights = blocks_of(config), final_weights(tmp_path / "run")
    for block in blocks:
        block.load_state_dict(weights[block.index])

    def accuracies(scored: ImageSet) -> list[float]:
        with threads_of(config):
            found = linear_probe(blocks, dataset_info("synthetic"), trained_on, scored, config.probe,
                                 seed=config.train.seed, device=torch.device("cpu"), progress=False)
        return [found["probe_accuracy"], *found["per_block_probe_accuracy"]]

    reported = [probe["probe_accuracy"], *probe["per_block_probe_accuracy"]]
    assert reported == accuracies(held)
    assert reported != accuracies(load_split("synthetic", None, "test"))  # the same probe, scored on the test set


def test_held_out_images_are_the_same_in_every_run_and_not_trained_on():
    images = load_split("synthetic", None, "train")
    rest, held = hold_out(images, 500)
    again_rest, again_held = hold_out(images, 500)
    assert len(held) == 500 and len(rest) == len(images) - 500
    assert torch.equal(held.images, again_held.images) and torch.equal(rest.labels, again_rest.labels)
    pixels = {bytes(x.numpy()) for x in held.images}
    assert not any(bytes(x.numpy()) in pixels for x in rest.images[:2000])  # disjoint (images are distinct)
    with pytest.raises(ValueError, match="probe.validation"):
        hold_out(images, len(images))


def test_probing_a_finished_run_again_repeats_its_probe_and_takes_only_probe_keys(tmp_path):
    settings = ["probe.epochs=1", "probe.train_limit=200", "probe.test_limit=100", "probe.augment=false"]
    single_process(tmp_path / "run", *settings)
    again = probe_finished_run(tmp_path / "run", [], progress=False)
    assert again["probe_accuracy"] == summary(tmp_path / "run")["probe"]["probe_accuracy"]
    longer = probe_finished_run(tmp_path / "run", ["probe.epochs=2", "probe.validation=50"], progress=False)
    assert longer["epochs"] == 2 and longer["scored_on"] == "validation" and longer["scored_images"] == 50
    with pytest.raises(ConfigError, match="only probe"):
        probe_finished_run(tmp_path / "run", ["optim.lr=1"])
    with pytest.raises(ConfigError, match="no finished run"):
        probe_finished_run(tmp_path, [])


def test_protocol_search_follows_its_written_rule():
    """Fake validation accuracies through every stage: the grid, the edge extension, the length and
    the probe are chosen as the rule in BENCHMARKS.md says, and nothing is run twice."""
    trials, asked = {}, []

    def measured(key: str, accuracy: float) -> None:
        trials[key] = {"probes": {search.FIRST_PROBE: {"test_acc": accuracy, "per_block_test_acc": [accuracy]}},
                       "date": f"{len(trials):04d}", "wall_s": 1.0}

    gains = {"constant 2e-4": 1.0, "cosine 0.001": 2.0, "cosine 0.002": 5.0, "cosine 0.004": 6.0,
             "cosine 0.008": 4.0}
    while (state := search.choose(trials))["todo"] or state.get("probes"):
        if state["todo"]:
            method, setting, steps = state["todo"][0]
            asked.append((method, setting, steps))
            bonus = 0.5 if steps == search.LONG else 0.0  # 9,000 steps gain less than a point: 3,000 is kept
            measured(search.trial_key(method, setting, steps),
                     50.0 if method == "untrained" else 50.0 + gains[setting] + bonus)
        else:
            key, probe = state["probes"][0]
            trials[key]["probes"][probe] = {"test_acc": 60.0 + len(probe) % 7, "per_block_test_acc": [1.0]}
    assert len(asked) == len(set(asked))
    assert ("clapp_pp", "cosine 0.008", search.SHORT) in asked  # 4e-3 won the grid at its edge: 8e-3 tried
    assert state["setting"] == "cosine 0.004" and state["steps"] == search.SHORT
    assert state["probe"] in search.PROBES
    assert "gain over untrained" in search.render({"trials": trials})


def test_the_main_job_says_whether_a_run_beats_the_untrained_encoder():
    assert verdict([60.0], [55.0]) == "+5.00 points; seed spread unknown (1 seed)"
    assert verdict([60.0, 62.0], [55.0, 55.5]).endswith("beats it by more than the seed spread (1.41)")
    assert "does not beat it" in verdict([56.0, 58.0], [55.5, 56.0])  # +1.25 against a spread of 1.41
    assert verdict([], [55.0]) == "-"


def test_the_main_job_checks_the_weights_of_its_layer_parallel_run(tmp_path):
    """The one-process reference of METHOD@K runs with one thread, as each rank does, and the table says
    from the two final.pt files whether they are the same, instead of assuming it."""
    names = ["random", "clapp_pp", "clapp_pp@2", "bp_infonce"]
    assert "train.threads=1" in run_overrides("clapp_pp", names) and "train.threads=1" in run_overrides("clapp_pp@2")
    assert "train.threads=1" not in run_overrides("bp_infonce", names)
    weights = {block: {"conv.weight": torch.full((2, 2), float(block))} for block in range(6)}
    for name, change in (("a", 0.0), ("b", 0.0), ("c", 0.5)):
        (tmp_path / name).mkdir()
        torch.save({b: {k: v + (change if b == 3 else 0.0) for k, v in s.items()} for b, s in weights.items()},
                   tmp_path / name / "final.pt")
    assert same_weights(tmp_path / "a", tmp_path / "b") == "yes"
    assert same_weights(tmp_path / "a", tmp_path / "c") == "no, max |dW| = 0.5"
