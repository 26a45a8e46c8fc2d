"""python -m medseg.report table: the README's results table, built from a real sqlite tracking store."""
from __future__ import annotations

import shutil

import pytest

from medseg.config import config_from_dict
from medseg.errors import MedsegError
from medseg.evaluation import run_eval_cli
from medseg.registry import decide_and_register
from medseg.report import RESULTS_END, RESULTS_START, _fmt, main, replace_block, results_table
from medseg.search_space import ChampionRule
from medseg.tracking import get_client, train_tracked

from .conftest import tiny_config_dict


def test_results_table_from_runs_registry_and_held_out_evaluation(tiny_cfg, synth_root, shared_cache, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(MedsegError, match="run `make experiments`"):
        results_table(uri)
    cfg = tiny_cfg(name="exp_900_tiny", description="tiny baseline", training={"epochs": 2})
    result, run_id = train_tracked(cfg, progress=False)
    rule = ChampionRule(registry_name="tiny-models", models_dir=str(tmp_path / "models"))
    decision = decide_and_register(checkpoint=result.best_checkpoint, run_id=run_id, cfg=cfg, rule=rule, uri=uri,
                                   progress=False)
    # the held-out evaluation: a predictions folder named "champion" scored with the held-out config
    holdout = config_from_dict(tiny_config_dict(synth_root, shared_cache, tmp_path, name="holdout_tiny"),
                               source="holdout")
    shutil.copytree(synth_root / "Task900_SynthLiverTumor" / "Predictions" / "threshold", tmp_path / "champion")
    run_eval_cli(holdout, predictions=tmp_path / "champion", out=tmp_path / "eval")
    held = get_client(uri).search_runs([e.experiment_id for e in get_client(uri).search_experiments()],
                                       filter_string="tags.kind = 'eval'")[0].data.metrics

    # a later trial of a search space built on the same config (its own sampled values): not the experiment's row
    from medseg.tracking import ensure_experiment, log_metrics, start_run

    trial = start_run(get_client(uri), ensure_experiment(uri, cfg.output.experiment), run_name="trial",
                      params={"name": "exp_900_tiny"}, tags={"kind": "trial", "sampled": '{"training.lr": 0.1}'})
    log_metrics(get_client(uri), trial, {"val/dice": 0.999, "val/iou": 0.999}, step=1)
    get_client(uri).set_terminated(trial, "FINISHED")

    table = results_table(uri, registry_name="tiny-models", holdout_config="holdout_tiny")
    lines = table.splitlines()
    assert lines[0] == "| Experiment | Key change | Val Dice | Val IoU | How measured |"
    best = max(result.history, key=lambda h: h["val/dice"])
    exp_row = next(line for line in lines if line.startswith("| `exp_900_tiny`"))
    assert f"| tiny baseline | {_fmt(best['val/dice'])} | {_fmt(best['val/iou'])} |" in exp_row
    assert f"(epoch {best['epoch']})" in exp_row
    version_row = next(line for line in lines if line.startswith("| v1: "))
    assert f"| {_fmt(decision.candidate['dice'])} | {_fmt(decision.candidate['iou'])} |" in version_row
    assert "promoted" in version_row
    held_row = next(line for line in lines if line.startswith("| champion on held-out cases"))
    assert f"| {_fmt(held['eval/dice'])} | {_fmt(held['eval/iou'])} |" in held_row
    assert "AMD" in table or "Intel" in table or "cores" in table  # the machine the runs came from

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n{RESULTS_START}\nold table\n{RESULTS_END}\nafter\n")
    assert main(["table", "--tracking-uri", uri, "--registry-name", "tiny-models", "--holdout-config", "holdout_tiny",
                 "--seed-spread", str(tmp_path / "absent.json"), "--update", str(readme)]) == 0
    assert readme.read_text() == f"# title\n{RESULTS_START}\n{table}{RESULTS_END}\nafter\n"
    assert capsys.readouterr().out == table
    with pytest.raises(MedsegError, match="markers"):
        replace_block(tmp_path / "eval" / "summary.json", table)
