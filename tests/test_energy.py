"""`python -m analysis energy`: energy per learned image from summary.json's accounting, with the
default table or the user's, on runs with or without a log, and on runs written before the accounting
(what cannot be known is said)."""
import dataclasses
import json

import pytest

from analysis.__main__ import main as analysis_main
from analysis.energy import DEFAULT_TABLE
from tests.helpers import single_process, summary


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("energy") / "run"
    single_process(out, "log.every=0")  # no log: energy needs summary.json only
    return out


def written(out) -> dict:
    return json.loads((out / "energy.json").read_text())


def test_energy_is_the_accounting_times_the_table(run, tmp_path, capsys):
    assert analysis_main(["energy", str(run), "--out", str(tmp_path / "a")]) == 0
    found = written(tmp_path / "a")["runs"][0]
    blocks = summary(run)["accounting"]["blocks"]
    macs = sum(b["forward_macs"] + b["update_macs"] + b["backward_macs"] for b in blocks.values())
    assert found["compute_uj_total"] == pytest.approx(macs * DEFAULT_TABLE["mac_pj"] * 1e-6)
    assert found["memory_uj_total"] > 0 and found["communication_uj_total"] == 0  # one process sends nothing
    assert (tmp_path / "a" / "energy.png").stat().st_size > 0 and "microjoules" in capsys.readouterr().out
    table = tmp_path / "table.toml"
    table.write_text("mac_pj = 0.2  # an 8-bit multiply\n")
    assert analysis_main(["energy", str(run), "--table", str(table), "--out", str(tmp_path / "b")]) == 0
    assert written(tmp_path / "b")["runs"][0]["compute_uj_total"] == pytest.approx(macs * 0.2e-6)


def test_a_run_from_before_the_accounting_says_what_it_cannot_know(run, tmp_path, capsys):
    old = tmp_path / "old"
    old.mkdir()
    values = summary(run)
    del values["accounting"]
    values["ranks"][0]["bytes_sent"] = 4096
    (old / "summary.json").write_text(json.dumps(values))
    assert analysis_main(["energy", str(old), "--out", str(tmp_path / "o")]) == 0
    assert "compute and memory unknown" in capsys.readouterr().out
    found = written(tmp_path / "o")["runs"][0]
    images = values["steps"] * values["config"]["train"]["batch_size"]
    assert found["compute_uj_total"] is None
    assert found["communication_uj_total"] == pytest.approx(8 * 4096 / images * DEFAULT_TABLE["link_pj_per_bit"] * 1e-6)


@pytest.mark.parametrize("text, message", [("watts = 3\n", "unknown keys ['watts']"), ("mac_pj = -1\n", ">= 0"),
                                           ("mac_pj = \n", "not a readable TOML file")])
def test_a_bad_table_is_refused_in_one_line(run, tmp_path, capsys, text, message):
    table = tmp_path / "t.toml"
    table.write_text(text)
    assert analysis_main(["energy", str(run), "--table", str(table), "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err


def test_a_folder_without_a_summary_is_refused(tmp_path, capsys):
    assert analysis_main(["energy", str(tmp_path)]) == 2
    assert "no summary.json" in capsys.readouterr().err


def test_the_energy_study_counts_local_and_backprop_runs_side_by_side(tmp_path, monkeypatch):
    from launch.bench import energy as study  # noqa: PLC0415 - its module constants are patched below

    monkeypatch.setattr(study, "SCALES", {"tiny": ["data.name=synthetic", "model.width=0.0625", "train.steps=2"]})
    monkeypatch.setattr(study, "WAYS", study.WAYS[::2] + study.WAYS[3:])  # clapp_pp on 2, bp_infonce on 1 and 2
    monkeypatch.setattr(study, "RESULTS", dataclasses.replace(study.RESULTS, results=tmp_path / "energy.json"))
    monkeypatch.setattr(study, "FIGURES", {"tiny": tmp_path / "energy.png"})
    page = tmp_path / "BENCHMARKS.md"
    page.write_text(f"{study.MARKERS[0]}\nold\n{study.MARKERS[1]}\n")
    monkeypatch.setattr(study, "BENCHMARKS", page)
    assert study.main(["--runs", str(tmp_path / "runs")]) == 0
    cells = json.loads((tmp_path / "energy.json").read_text())["cells"]
    local, backprop = cells["tiny/clapp_pp, 2 processes"]["energy"], cells["tiny/bp_infonce, 1 process"]["energy"]
    assert local["communication_uj_total"] > 0 and backprop["communication_uj_total"] == 0  # one process sends nothing
    assert backprop["compute_uj_total"] > local["compute_uj_total"] > 0  # a backward pass through every block
    pipeline = cells["tiny/bp_infonce, BP pipeline on 2"]["energy"]  # activations up, gradients down
    assert pipeline["communication_uj_total"] > local["communication_uj_total"]
    text = page.read_text()
    assert "| clapp_pp, 2 processes |" in text and "| bp_infonce, 1 process |" in text and "old" not in text
    assert (tmp_path / "energy.png").stat().st_size > 0
