"""Champion / challenger: re-evaluate, compare with a paired bootstrap, set MLflow registry aliases, mirror.

The figure that decides is the eval code's mean per-case validation Dice at full resolution (never the
training-time number). A challenger replaces the champion only when, on the same split,
  delta = Dice(challenger) - Dice(champion) >= margin   and   P(challenger better) >= min_probability,
the probability coming from a paired bootstrap over validation cases, and no metric named in the rule's ``guards``
(e.g. ``val/lesion_recall: 0.02``) is below the champion's by more than its tolerance. Otherwise it gets the alias
``challenger`` and the decision says which condition (or guard) failed. The champion is mirrored to
``<models_dir>/champion`` as a symlink switched atomically to a complete version folder.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medseg import metrics as M
from medseg.io_utils import atomic_write_json, atomic_write_text, publish_mode

CHAMPION, CHALLENGER = "champion", "challenger"
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
        return _decide_locked(client, checkpoint, run_id, cfg, rule, uri, data, candidate, progress)


def _decide_locked(client, checkpoint, run_id, cfg, rule, uri, data, candidate, progress) -> Decision:
    from medseg.checkpoint import load_checkpoint
    from medseg.evaluation import evaluate_checkpoint

    champion_version = current_champion(client, rule.registry_name)
    champion_before, boot = None, None
    if champion_version is None:
        promoted, reason = True, f"promoted: no champion yet (Dice {candidate['dice']:.4f})"
    else:
        with tempfile.TemporaryDirectory(prefix="medseg-champion-") as tmp:
            champ_ckpt = download_checkpoint(champion_version, uri, Path(tmp))
            champ_split = load_checkpoint(champ_ckpt)["meta"].get("split_hash")
            if champ_split != data.split.hash:
                champion_before = {"version": champion_version.version, "run_id": champion_version.run_id,
                                   "split_hash": champ_split}
                promoted = False
                reason = (f"kept the champion: it was validated on split {champ_split}, the candidate on "
                          f"{data.split.hash}; scores on different splits are not comparable")
            else:
                champ_eval = evaluate_checkpoint(champ_ckpt, cfg, split="val", data=data, progress=progress)
                champion_before = {**_eval_record(champ_eval, champion_version.run_id, champion_version.source),
                                   "version": champion_version.version}
                promoted, reason, boot = compare(champion_before, candidate, rule)
    version = register_version(client, rule.registry_name, run_id, candidate, promoted, reason, bootstrap=boot)
    alias = CHAMPION if promoted else CHALLENGER
    decision = Decision(promoted=promoted, alias=alias, reason=reason, registry_name=rule.registry_name,
                        version=version, candidate=candidate, champion_before=champion_before, bootstrap=boot,
                        rule=rule.model_dump())
    if promoted:  # mirror first: if it fails, the alias still names the champion that models/champion holds
        try:
            decision.mirror = str(mirror_champion(Path(rule.models_dir), checkpoint, cfg, decision))
        except BaseException as e:
            client.set_model_version_tag(rule.registry_name, version, "promoted", "false")
            client.set_model_version_tag(rule.registry_name, version, "mirror_error", f"{type(e).__name__}: {e}"[:500])
            raise
    client.set_registered_model_alias(rule.registry_name, alias, version)
    return decision


def register_version(client, name: str, run_id: str, candidate: dict[str, Any], promoted: bool, reason: str,
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
    try:
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
