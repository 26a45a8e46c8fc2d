"""python -m medseg.report history: every registry version over time, from a real sqlite store whose versions were
registered by the real decision code (a promoted champion, then a challenger held back by the rule)."""
from __future__ import annotations

import json

import pytest

from medseg.errors import MedsegError
from medseg.registry import decide_and_register
from medseg.report import history_rows, main, registry_history
from medseg.search_space import ChampionRule
from medseg.tracking import get_client, train_tracked


def test_history_of_a_champion_and_a_challenger(tiny_cfg, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rule = ChampionRule(registry_name="tiny-history", models_dir=str(tmp_path / "models"), bootstrap_resamples=500)
    with pytest.raises(MedsegError, match="no version yet"):
        registry_history(uri, registry_name="tiny-history", out=tmp_path / "h.md")
    cfg = tiny_cfg(name="hist_tiny", training={"epochs": 1})
    result, run_id = train_tracked(cfg, progress=False)
    first = decide_and_register(checkpoint=result.best_checkpoint, run_id=run_id, cfg=cfg, rule=rule, uri=uri,
                                progress=False)
    # the same config again (deterministic training): gain 0, below the margin -> challenger, with a bootstrap
    result2, run_id2 = train_tracked(cfg, progress=False)
    client = get_client(uri)
    client.set_tag(run_id2, "study", "study-b")  # what a tune.py trial carries
    client.set_tag(run_id2, "sampled", json.dumps({"training.lr": 0.003}))
    second = decide_and_register(checkpoint=result2.best_checkpoint, run_id=run_id2, cfg=cfg, rule=rule, uri=uri,
                                 progress=False)
    assert first.promoted and not second.promoted and second.bootstrap

    # the bootstrap is on the version's tags (register_version), equal to the decision's
    tags = client.get_model_version("tiny-history", second.version).tags
    assert float(tags["ci_low"]) == pytest.approx(second.bootstrap["ci_low"], abs=1e-4)
    assert float(tags["prob_better"]) == pytest.approx(second.bootstrap["prob_better"], abs=1e-3)
    assert "ci_low" not in client.get_model_version("tiny-history", first.version).tags  # no champion to compare with

    rows = history_rows(client, "tiny-history")
    assert [(r["version"], r["promoted"], r["alias"]) for r in rows] == [(1, True, "champion"),
                                                                         (2, False, "challenger")]
    assert rows[0]["bootstrap"] is None
    assert rows[1]["bootstrap"]["gain"] == pytest.approx(second.bootstrap["delta"], abs=1e-4)
    assert rows[0]["dice"] == pytest.approx(first.candidate["dice"], abs=1e-6)
    assert rows[0]["fingerprint"] and rows[0]["fingerprint"] == rows[1]["fingerprint"]
    assert (rows[0]["study"], rows[1]["study"], rows[1]["change"]) == ("hist_tiny", "study-b", "lr 0.003")

    out = tmp_path / "out" / "history.md"
    assert main(["history", "--tracking-uri", uri, "--registry-name", "tiny-history", "--out", str(out)]) == 0
    text = out.read_text()
    assert capsys.readouterr().out == text
    lines = text.splitlines()
    v1 = next(line for line in lines if line.startswith("| v1 |"))
    v2 = next(line for line in lines if line.startswith("| v2 |"))
    assert "**promoted (now champion)**: promoted: no champion yet" in v1 and "| – |" in v1
    assert "**challenger**: kept the champion: gain +0.0000 is below the margin" in v2
    assert f"P {second.bootstrap['prob_better']:.3f}" in v2 and "`study-b`: lr 0.003" in v2
    assert rows[0]["fingerprint"][:12] in v1
    assert (tmp_path / "out" / "history.png").stat().st_size > 1000 and "![history](history.png)" in text

    # a version registered before the bootstrap tags: the interval comes from the description (the decision text)
    for key in ("gain", "ci_low", "ci_high", "prob_better"):
        client.delete_model_version_tag("tiny-history", second.version, key)
    assert history_rows(client, "tiny-history")[1]["bootstrap"] == rows[1]["bootstrap"]
