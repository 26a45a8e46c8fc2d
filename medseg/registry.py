"""Champion / challenger: re-evaluate, compare with a paired bootstrap, set MLflow registry aliases, mirror.

The figure that decides is the eval code's mean per-case validation Dice at full resolution (never the
training-time number). A challenger replaces the champion only when, on the same cases,
  delta = Dice(challenger) - Dice(champion) >= margin   and   P(challenger better) >= min_probability,
the probability coming from a paired bootstrap over validation cases, and no metric named in the rule's ``guards``
(e.g. ``val/lesion_recall: 0.02``) is below the champion's by more than its tolerance. Otherwise it gets the alias
``challenger`` and the decision says which condition (or guard) failed. When the champion was validated on another
split (the data grew, or the split rule changed), it is re-evaluated on the candidate's validation cases it did not
train on (``shared_cases``); the decision says how many were left out, and with fewer than
``min_shared_cases`` left there is no comparison and the champion stays. The champion is mirrored to
``<models_dir>/champion`` as a symlink switched atomically to a complete version folder.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medseg import metrics as M
from medseg.errors import MedsegError
from medseg.io_utils import atomic_write_json, atomic_write_text, disk_full_as_error, publish_mode

CHAMPION, CHALLENGER = "champion", "challenger"
PENDING = "pending"  # the ``promoted`` tag of a version while its promotion is under way (``publish_decision``)
JOURNAL = ".promotion.json"  # in models_dir while a promotion is under way
NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")  # what MLflow answers for a missing model / alias


@dataclass
class Decision:
    promoted: bool
    alias: str
    reason: str
    registry_name: str
    version: str | None
    candidate: dict[str, Any]
    champion_before: dict[str, Any] | None = None
    bootstrap: dict[str, Any] | None = None
    rule: dict[str, Any] = field(default_factory=dict)
    mirror: str | None = None
    # how the comparison was made: the cases both were scored on, and those left out because the champion (validated
    # on another split: the data grew) trained on them
    comparison: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def current_champion(client, name: str):
    """The model version holding the ``champion`` alias, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as e:
        if e.error_code in NOT_FOUND:  # no such registered model, or no version holds the alias
            return None
        raise  # a locked store or an unreachable server is not "no champion": never promote unchecked


def download_checkpoint(version, uri: str, dest: Path) -> Path:
    """The best.pt behind a model version (source ``runs:/<run>/checkpoint``)."""
    import mlflow.artifacts

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(dest), tracking_uri=uri))
    return local / "best.pt" if local.is_dir() else local


def _eval_record(result, run_id: str | None, checkpoint: str) -> dict[str, Any]:
    s = result.summary
    # per case and label: what the reported Dice averages (per label over cases, then over labels)
    per_case_label = {r["case_id"]: [float(r[f"dice/{label}"]) for label in result.labels] for r in result.rows}
    return {"run_id": run_id, "checkpoint": checkpoint, "dice": s["dice"], "iou": s["iou"],
            "dice_micro": s["dice_micro"], "lesion_recall": s.get("lesion_recall"),
            "lesion_precision": s.get("lesion_precision"), "n_cases": s["n_cases"], "n_scored": s["n_scored"],
            "split_hash": result.info.get("split_hash"), "per_case_dice": result.per_case_dice(),
            "labels": list(result.labels),
            "postprocessing": result.info.get("postprocessing"),  # applied in these scores
            "per_case_label_dice": per_case_label}


# Metrics of an evaluation record (``_eval_record``) a promotion guard can name, as ``val/<key>`` or ``<key>``; all of
# them are better when higher.
GUARD_METRICS = ("dice", "iou", "dice_micro", "lesion_recall", "lesion_precision")


def guard_record_key(name: str) -> str:
    """A guard's metric name (``val/lesion_recall``, as training logs it) -> the record key (``lesion_recall``)."""
    key = name.removeprefix("val/")
    if key not in GUARD_METRICS:
        raise ValueError(f"guard {name!r} names no metric of the re-evaluated record; use one of "
                         f"{', '.join('val/' + k for k in GUARD_METRICS)}")
    return key


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(float(value)) else None


def guard_failures(champion: dict[str, Any], candidate: dict[str, Any], guards: dict[str, float]) -> list[str]:
    """One text per guard that holds the candidate back: its metric below the champion's by more than the tolerance,
    or not measurable for the candidate while the champion has it. A metric the champion lacks (NaN: e.g. no
    lesion in the split) guards nothing."""
    failed = []
    for name, tolerance in guards.items():
        key = guard_record_key(name)
        theirs, ours = _number(champion.get(key)), _number(candidate.get(key))
        if theirs is None:
            continue
        if ours is None:
            failed.append(f"guard {name} held it back: the candidate has no {key} (champion {theirs:.4f})")
        elif theirs - ours > tolerance + 1e-9:
            failed.append(f"guard {name} held it back: {key} {ours:.4f} is {theirs - ours:.4f} below the champion's "
                          f"{theirs:.4f} (tolerance {tolerance:.4f})")
    return failed


def compare(champion: dict[str, Any], candidate: dict[str, Any], rule) -> tuple[bool, str, dict[str, Any]]:
    """Apply the promotion rule to two evaluation records on the same cases: the Dice gain and P(better), then the
    guards (``rule.guards``), which hold a challenger back whatever its Dice."""
    ids = sorted(candidate["per_case_dice"])
    if sorted(champion["per_case_dice"]) != ids:
        return False, "champion and candidate were scored on different cases", {}
    key = "per_case_dice"
    if len(candidate.get("labels") or []) > 1:
        if champion.get("labels") != candidate["labels"] or "per_case_label_dice" not in champion:
            return False, (f"champion and candidate were scored on different labels ({champion.get('labels')} vs "
                           f"{candidate['labels']})"), {}
        key = "per_case_label_dice"  # several labels: bootstrap the reported statistic, not each case's label average
    boot = M.paired_bootstrap([champion[key][i] for i in ids], [candidate[key][i] for i in ids],
                              n_resamples=rule.bootstrap_resamples, seed=rule.seed)
    delta, prob = boot["delta"], boot["prob_better"]
    failed = []
    if not delta >= rule.margin:
        failed.append(f"gain {delta:+.4f} is below the margin {rule.margin:.4f}")
    if not prob >= rule.min_probability:
        failed.append(f"P(better) {prob:.3f} is below {rule.min_probability:.2f}")
    failed += guard_failures(champion, candidate, getattr(rule, "guards", None) or {})
    summary = (f"Dice {candidate['dice']:.4f} vs champion {champion['dice']:.4f} (gain {delta:+.4f}, "
               f"95% CI [{boot['ci_low']:+.4f}, {boot['ci_high']:+.4f}], P(better) {prob:.3f})")
    if failed:
        return False, f"kept the champion: {'; '.join(failed)}. {summary}", boot
    return True, f"promoted: {summary}", boot


def decide_and_register(*, checkpoint: str | Path, run_id: str, cfg, rule, uri: str, data=None,
                        progress: bool = True) -> Decision:
    """Re-evaluate the candidate (and the current champion) on the validation split, decide, register, mirror."""
    from filelock import FileLock

    from medseg.evaluation import evaluate_checkpoint
    from medseg.tracking import get_client
    from medseg.training import prepare_data

    client = get_client(uri)
    data = data or prepare_data(cfg, progress=progress)
    candidate_eval = evaluate_checkpoint(checkpoint, cfg, split="val", data=data, progress=progress)
    candidate = _eval_record(candidate_eval, run_id, str(checkpoint))
    Path(rule.models_dir).mkdir(parents=True, exist_ok=True)
    # One decision at a time per models folder: two studies finishing together would otherwise both judge against
    # the old champion, and their alias switches and mirrors could interleave (alias on one, folder on the other).
    with FileLock(str(Path(rule.models_dir) / ".champion.lock")):
        repaired = reconcile_champion(client, Path(rule.models_dir))
        if repaired:
            print(f"warning: {repaired}", file=sys.stderr, flush=True)
        return _decide_locked(client, checkpoint, run_id, cfg, rule, uri, data, candidate, progress, candidate_eval)


def champion_training_cases(meta: dict[str, Any], data) -> set[str] | None:
    """The cases a champion checkpoint learnt from: ``meta["split_train"]``, else (checkpoints written before it) the
    train side of the saved splits.json whose fold has the champion's split hash, in the cache of any version of the
    data (``<cache_dir>/<task>-<fingerprint>/splits-*/``: the champion's data may be an older version); None when
    neither says."""
    from medseg.data.split import split_from_table

    if isinstance(meta.get("split_train"), list):
        return {str(c) for c in meta["split_train"]}
    wanted = meta.get("split_hash")
    for path in sorted(Path(data.split.path).parent.parent.parent.glob("*/splits-*/splits.json")):
        try:
            table = json.loads(path.read_text())
            for fold in range(len(table["folds"])):
                split = split_from_table(table, path, fold)
                if split.hash == wanted:
                    return set(split.train)
        except (OSError, ValueError, KeyError, TypeError, MedsegError):
            continue  # an unreadable or foreign file cannot vouch for anything
    return None


def shared_cases(champion_meta: dict[str, Any], data, rule) -> tuple[list[str] | None, dict[str, Any]]:
    """The candidate's validation cases the champion may be scored on, and the comparison's record.

    Same split: all of them. Another split (cases were added, or the rule changed): those the champion did not train
    on; None (no comparison) when its training cases are unknown or fewer than ``rule.min_shared_cases`` remain."""
    val = data.split.cases("val")
    record: dict[str, Any] = {"champion_split": champion_meta.get("split_hash"), "candidate_split": data.split.hash,
                              "n_val": len(val), "left_out": []}
    if champion_meta.get("split_hash") == data.split.hash:
        return val, {**record, "n_cases": len(val), "same_split": True}
    trained = champion_training_cases(champion_meta, data)
    if trained is None:
        return None, {**record, "same_split": False, "why": (
            f"it was validated on split {champion_meta.get('split_hash')}, the candidate on {data.split.hash}, and "
            "the cases it trained on are unknown (no split_train in its checkpoint, no saved splits.json with its "
            "split); scores on different cases are not comparable")}
    kept = [c for c in val if c not in trained]
    record = {**record, "same_split": False, "n_cases": len(kept), "left_out": [c for c in val if c in trained]}
    if len(kept) < rule.min_shared_cases:
        return None, {**record, "why": (
            f"only {len(kept)} of the candidate's {len(val)} validation cases were not trained on by the champion "
            f"(champion.min_shared_cases {rule.min_shared_cases}); no comparison")}
    return kept, record


def _subset_record(result, cases: list[str], run_id: str | None, checkpoint: str) -> dict[str, Any]:
    """An evaluation record of ``result`` restricted to ``cases`` (its summary recomputed on them)."""
    from medseg.evaluation import EvalResult

    rows = [r for r in result.rows if r["case_id"] in set(cases)]
    return _eval_record(EvalResult(name=result.name, rows=rows, summary=M.summarize(rows), labels=result.labels,
                                   info=result.info), run_id, checkpoint)


def _check_same_task(champion_meta: dict[str, Any], data, rule, version) -> None:
    """A registry whose champion segments other labels (another task) cannot judge this study: one line, nothing
    registered or promoted."""
    theirs = [str(v) for v in champion_meta.get("labels") or []]
    ours = [str(v) for v in data.labels or []]
    if theirs != ours:
        raise MedsegError(f"champion.registry_name {rule.registry_name!r}: its champion (v{version.version}) segments "
                          f"labels {theirs}, this study {ours}: another task; give this space its own registry_name")


def _decide_locked(client, checkpoint, run_id, cfg, rule, uri, data, candidate, progress, candidate_eval=None
                   ) -> Decision:
    from medseg.checkpoint import load_checkpoint
    from medseg.evaluation import evaluate_checkpoint

    champion_version = current_champion(client, rule.registry_name)
    champion_before, boot, comparison = None, None, None
    if champion_version is None:
        promoted, reason = True, f"promoted: no champion yet (Dice {candidate['dice']:.4f})"
    else:
        with tempfile.TemporaryDirectory(prefix="medseg-champion-") as tmp:
            champ_ckpt = download_checkpoint(champion_version, uri, Path(tmp))
            champ_meta = load_checkpoint(champ_ckpt)["meta"]
            _check_same_task(champ_meta, data, rule, champion_version)
            cases, comparison = shared_cases(champ_meta, data, rule)
            if cases is None:
                champion_before = {"version": champion_version.version, "run_id": champion_version.run_id,
                                   "split_hash": comparison["champion_split"]}
                promoted, reason = False, f"kept the champion: {comparison['why']}"
            else:
                champ_eval = evaluate_checkpoint(champ_ckpt, cfg, split="val", data=data, progress=progress,
                                                 cases=cases, allow_split_mismatch=not comparison["same_split"])
                champion_before = {**_eval_record(champ_eval, champion_version.run_id, champion_version.source),
                                   "version": champion_version.version}
                judged = candidate if comparison["same_split"] or candidate_eval is None else _subset_record(
                    candidate_eval, cases, run_id, str(checkpoint))
                promoted, reason, boot = compare(champion_before, judged, rule)
                if not comparison["same_split"]:
                    reason += (f" [re-judged on {len(cases)} shared validation cases of split {data.split.hash}; "
                               f"{len(comparison['left_out'])} left out: the champion (split "
                               f"{comparison['champion_split']}) trained on them]")
    decision = Decision(promoted=promoted, alias=CHAMPION if promoted else CHALLENGER, reason=reason,
                        registry_name=rule.registry_name, version=None, candidate=candidate,
                        champion_before=champion_before, bootstrap=boot, rule=rule.model_dump(), comparison=comparison)
    return publish_decision(client, decision, checkpoint, cfg, Path(rule.models_dir))


def publish_decision(client, decision: Decision, checkpoint: str | Path, cfg, models_dir: Path) -> Decision:
    """Register the candidate as a new version and give it its alias; a promotion also mirrors it. Call under the
    champion lock.

    A promotion writes to two stores (the registry and ``models_dir``), so it keeps a journal that a killed process
    leaves behind: ``.promotion.json`` first (the run), the version registered with ``promoted=pending``, the journal
    told its number, the mirror switched, the alias set, the tag made ``true``, the journal removed.
    ``reconcile_champion`` (the next decision runs it first) finishes a promotion whose alias was set and undoes one
    whose alias was not, so that the alias and ``models_dir/champion`` name the same version again."""
    name, run_id, candidate = decision.registry_name, decision.candidate["run_id"], decision.candidate
    if not decision.promoted:
        decision.version = register_version(client, name, run_id, candidate, False, decision.reason,
                                            bootstrap=decision.bootstrap)
        client.set_registered_model_alias(name, CHALLENGER, decision.version)
        return decision
    models_dir.mkdir(parents=True, exist_ok=True)
    link = models_dir / "champion"
    journal = {"registry_name": name, "run_id": run_id, "version": None,
               "previous_link": os.readlink(link) if link.is_symlink() else None}
    atomic_write_json(models_dir / JOURNAL, journal)
    decision.version = register_version(client, name, run_id, candidate, PENDING, decision.reason,
                                        bootstrap=decision.bootstrap)
    atomic_write_json(models_dir / JOURNAL, {**journal, "version": decision.version})
    try:  # mirror first: if it fails, the alias still names the champion that models/champion holds
        decision.mirror = str(mirror_champion(models_dir, checkpoint, cfg, decision))
    except BaseException as e:
        client.set_model_version_tag(name, decision.version, "promoted", "false")
        client.set_model_version_tag(name, decision.version, "mirror_error", f"{type(e).__name__}: {e}"[:500])
        (models_dir / JOURNAL).unlink(missing_ok=True)
        raise
    client.set_registered_model_alias(name, CHAMPION, decision.version)
    client.set_model_version_tag(name, decision.version, "promoted", "true")
    (models_dir / JOURNAL).unlink()
    return decision


def reconcile_champion(client, models_dir: Path) -> str | None:
    """Repair what a promotion killed half way left (``publish_decision``'s journal); call under the champion lock.
    Returns what was done (None when there was nothing to repair).

    Staging folders and temporary links of killed mirrors are removed. With a journal: when the alias already names
    the journal's version the promotion is finished (tag ``promoted=true``); otherwise it is undone: the
    ``champion`` link set back to where it pointed before, the version's mirror folder removed, the version tagged
    ``promoted=false`` and ``interrupted``. The alias is never moved here: it is set last, so it always names a
    champion whose promotion completed."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return None
    for leftover in models_dir.glob(".staging-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in models_dir.glob(".champion.*.tmp"):
        leftover.unlink(missing_ok=True)
    path = models_dir / JOURNAL
    if not path.exists():
        return None
    journal = json.loads(path.read_text())
    name, version = journal["registry_name"], journal.get("version")
    champion = current_champion(client, name)
    if version is not None and champion is not None and str(champion.version) == str(version):
        client.set_model_version_tag(name, version, "promoted", "true")
        done = f"finished the promotion of {name} v{version} (its alias was set before the process stopped)"
    else:
        link = models_dir / "champion"
        previous = journal.get("previous_link")
        if previous is None:
            link.unlink(missing_ok=True)
        else:
            tmp_link = models_dir / f".champion.{os.getpid()}.tmp"
            tmp_link.unlink(missing_ok=True)
            os.symlink(previous, tmp_link)
            os.replace(tmp_link, link)
        pending = [mv for mv in client.search_model_versions(f"name='{name}'")
                   if mv.run_id == journal["run_id"] and mv.tags.get("promoted") == PENDING]
        for mv in pending:
            client.set_model_version_tag(name, mv.version, "promoted", "false")
            client.set_model_version_tag(name, mv.version, "interrupted",
                                         "the promotion was stopped before its alias was set; undone")
            folder = models_dir / "versions" / f"{name}-v{mv.version}"
            if folder.is_dir() and os.path.realpath(folder) != os.path.realpath(link):
                shutil.rmtree(folder, ignore_errors=True)
        done = (f"undid the interrupted promotion of {name} run {journal['run_id']} "
                f"({', '.join('v' + str(mv.version) for mv in pending) or 'no version registered'}); "
                f"the champion is {'v' + str(champion.version) if champion else 'none'}")
    path.unlink()
    return done


def register_version(client, name: str, run_id: str, candidate: dict[str, Any], promoted: bool | str, reason: str,
                     bootstrap: dict[str, Any] | None = None) -> str:
    """A new model version for the run's logged checkpoint (``runs:/<run>/checkpoint``), tagged with its scores and,
    when the decision compared with a champion, the paired bootstrap of the Dice gain (``gain``, ``ci_low``,
    ``ci_high``, ``prob_better``): ``python -m medseg.report history`` reads these tags."""
    from mlflow.exceptions import MlflowException

    boot_tags = {} if not bootstrap else {"gain": f"{bootstrap['delta']:.6f}", "ci_low": f"{bootstrap['ci_low']:.6f}",
                                          "ci_high": f"{bootstrap['ci_high']:.6f}",
                                          "prob_better": f"{bootstrap['prob_better']:.6f}"}
    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code not in NOT_FOUND:
            raise
        client.create_registered_model(name,
                                       description="medseg segmentation models; alias 'champion' is the one to use")
    tags = {"val_dice": f"{candidate['dice']:.6f}", "val_iou": f"{candidate['iou']:.6f}",
            "split_hash": str(candidate["split_hash"]), "promoted": str(promoted).lower(), **boot_tags}
    mv = client.create_model_version(name, source=f"runs:/{run_id}/checkpoint", run_id=run_id, description=reason[:500],
                                     tags=tags)
    return str(mv.version)


def model_card(decision: Decision, cfg) -> str:
    from medseg.postprocess import describe

    c = decision.candidate
    post = c.get("postprocessing")
    lines = [
        f"# {decision.registry_name} v{decision.version} (champion)",
        "",
        f"- Promoted: {time.strftime('%Y-%m-%d %H:%M:%S')}; {decision.reason}",
        f"- MLflow run: `{c['run_id']}`; registry: `models:/{decision.registry_name}@champion`",
        f"- Data: `{cfg.dataset.path}` task `{cfg.dataset.task}`, labels {cfg.dataset.labels}; "
        f"split hash `{c['split_hash']}`",
        f"- Model: {cfg.model.arch} / {cfg.model.encoder} (depth {cfg.model.encoder_depth}, "
        f"weights {cfg.model.encoder_weights}), input {cfg.dataset.image_size} px, "
        f"2.5D context {cfg.dataset.context_slices}",
        f"- Training: loss {cfg.loss.name}, {cfg.training.optimizer} lr {cfg.training.lr:g}, "
        f"{cfg.training.scheduler} schedule, {cfg.training.epochs} epochs, "
        f"augmentations: {', '.join(a.name for a in cfg.augment) or 'none'}",
        f"- Post-processing (chosen on validation after training, applied by eval.py and infer.py, included in the "
        f"scores below): {describe(post) if post else 'none'}",
        "",
        "## Validation (full resolution, per case)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| mean per-case Dice | {c['dice']:.4f} |",
        f"| mean per-case IoU | {c['iou']:.4f} |",
        f"| micro Dice | {c['dice_micro']:.4f} |",
        f"| lesion recall | {_rounded(c['lesion_recall'])} |",
        f"| lesion precision | {_rounded(c['lesion_precision'])} |",
        f"| cases (scored) | {c['n_cases']} ({c['n_scored']}) |",
        "",
        "Use: `python infer.py --ckpt models/champion/checkpoint.pt --input <volume or folder> --out <dir>`.",
        "Limits: trained on the data above only; not a medical device; check the per-case table before relying on it.",
    ]
    return "\n".join(lines) + "\n"


def _rounded(value: float | None) -> float | None:
    return value if value is None else round(value, 4)


def mirror_champion(models_dir: Path, checkpoint: str | Path, cfg, decision: Decision) -> Path:
    """Write ``versions/<name>-v<version>/`` completely, then switch the ``champion`` symlink to it atomically."""
    models_dir.mkdir(parents=True, exist_ok=True)
    final = models_dir / "versions" / f"{decision.registry_name}-v{decision.version}"
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=models_dir))
    kept = f"the champion ({models_dir / 'champion'}) is unchanged and the partial version folder removed"
    try:
        with disk_full_as_error(final, kept=kept):
            shutil.copyfile(checkpoint, staging / "checkpoint.pt")
            (staging / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            atomic_write_json(staging / "metrics.json", {k: v for k, v in decision.to_dict().items()})
            atomic_write_text(staging / "MODEL_CARD.md", model_card(decision, cfg))
        final.parent.mkdir(parents=True, exist_ok=True)
        publish_mode(staging, directory=True)
        if final.exists():  # a version number seen before: another (or a reset) tracking store; never delete it
            final = final.with_name(f"{final.name}-{decision.candidate.get('run_id') or 'run'}")
            if final.exists():
                raise FileExistsError(f"{final} already exists; move it away (it may hold an earlier champion)")
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    link = models_dir / "champion"
    if link.exists() and not link.is_symlink():
        raise FileExistsError(f"{link} is a real folder, not the champion symlink; move it away")
    tmp_link = models_dir / f".champion.{os.getpid()}.tmp"
    if tmp_link.is_symlink():
        tmp_link.unlink()
    os.symlink(os.path.relpath(final, models_dir), tmp_link)
    os.replace(tmp_link, link)  # rename over the old symlink: readers see the old or the new champion, never a mix
    return link


def read_champion_metrics(models_dir: Path) -> dict[str, Any] | None:
    path = Path(models_dir) / "champion" / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else None
