"""tune.py's job end to end: run the study, re-evaluate and promote the best trial, write and print the report."""
from __future__ import annotations

from pathlib import Path

from medseg.errors import MedsegError


def run_and_promote(space, *, resume: bool = False, name: str | None = None, address: str | None = None,
                    num_cpus: int | None = None, promote: bool = True, progress: bool = True, cold: bool = False):
    """Returns (StudyOutcome, Decision | None, report paths)."""
    from medseg.registry import decide_and_register
    from medseg.report import write_study_report
    from medseg.tracking import get_client, log_metrics, ui_command, ui_url
    from medseg.tuning import run_study, trial_config

    outcome = run_study(space, resume=resume, name=name, address=address, num_cpus=num_cpus, cold=cold)
    decision, robustness = None, None
    client = get_client(outcome.tracking_uri)
    try:
        if promote and outcome.best is not None:
            best = outcome.best
            if not best.get("checkpoint") or not best.get("run_id"):
                raise MedsegError(f"best trial {best['trial_id']} left no checkpoint to evaluate")
            decision = decide_and_register(checkpoint=best["checkpoint"], run_id=best["run_id"],
                                           cfg=trial_config(best["params"], space), rule=space.champion,
                                           uri=outcome.tracking_uri, progress=progress)
            client.set_tag(outcome.parent_run_id, "decision", decision.alias)
            client.log_metric(outcome.parent_run_id, "best/eval_dice", decision.candidate["dice"])
            comp = decision.comparison or {}
            if comp.get("n_cases") is not None:  # the cases the decision rests on (fewer when the data grew)
                client.log_metric(outcome.parent_run_id, "decision/shared_cases", comp["n_cases"])
                client.log_metric(outcome.parent_run_id, "decision/left_out_cases", len(comp["left_out"]))
            # the new champion's robustness set (strongest severities), in the report and on the study run
            if decision.promoted:
                from medseg.robustness import champion_robustness

                robustness = champion_robustness(best["checkpoint"], trial_config(best["params"], space),
                                                 progress=progress)
                log_metrics(client, outcome.parent_run_id, {"champion/robust_worst_drop": robustness["worst_drop"]},
                            step=0)
        paths = write_study_report(outcome, space, decision, robustness=robustness)
        for key in ("markdown", "json", "parallel", "curves", "budget"):
            client.log_artifact(outcome.parent_run_id, str(paths[key]), "report")
    except BaseException:
        client.set_terminated(outcome.parent_run_id, "FAILED")
        raise
    client.set_terminated(outcome.parent_run_id, "FINISHED")
    print(Path(paths["markdown"]).read_text())
    print(f"report: {paths['markdown']}\nMLflow: {ui_command(outcome.tracking_uri)}, "
          f"then {ui_url(outcome.experiment_id, uri=outcome.tracking_uri)} "
          "(runs table; tick runs, Compare: parallel coordinates)")
    return outcome, decision, paths
