"""Search-space files (search_spaces/*.yaml): a base config, parameter domains over dotted config keys,
and the study settings (metric, samples, concurrency, resources, ASHA, Optuna seed, budget, champion rule).

Validated like configs: unknown keys are errors naming their dotted path, and every domain is checked
against the config tree by validating the base config with the domain's bounds or choices.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medseg.config import Config, PathText, _format_error, config_from_dict, load_yaml, printable
from medseg.errors import ConfigError
from medseg.io_utils import absolute_path


class _Strict(BaseModel):
    # frozen: a space is validated with its final values (load_space, space_for_configs) and never changed after
    model_config = ConfigDict(extra="forbid", frozen=True)


class Domain(_Strict):
    """One searched parameter. uniform/loguniform: [low, high]; int: low..high inclusive; choice: values."""

    type: Literal["uniform", "loguniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> "Domain":
        if self.type == "choice":
            if not self.values:
                raise ValueError("choice needs a non-empty 'values' list")
            if self.low is not None or self.high is not None:
                raise ValueError("choice takes 'values', not low/high")
            return self
        if self.values is not None:
            raise ValueError(f"{self.type} takes low/high, not 'values'")
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"{self.type} needs low < high, got low={self.low} high={self.high}")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError("loguniform needs low > 0")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("int needs integer low/high")
        return self

    def probe_values(self) -> list[Any]:
        """Values that must all give a valid config (bounds, or every choice)."""
        if self.type == "choice":
            return list(self.values)
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def to_tune(self):
        from ray import tune

        if self.type == "uniform":
            return tune.uniform(self.low, self.high)
        if self.type == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.type == "int":
            return tune.randint(int(self.low), int(self.high) + 1)  # randint's upper bound is exclusive
        return tune.choice(list(self.values))

    def contains(self, value: Any) -> bool:
        if self.type == "choice":
            return value in self.values
        return value is not None and self.low <= value <= self.high


class AshaConfig(_Strict):
    enabled: bool = True
    max_t: int = Field(8, ge=1, description="epochs of a trial that is never stopped")
    grace_period: int = Field(2, ge=1, description="epochs every trial gets before it may be stopped")
    reduction_factor: float = Field(2.0, gt=1)

    @model_validator(mode="after")
    def _check(self) -> "AshaConfig":
        if self.grace_period > self.max_t:
            raise ValueError(f"grace_period ({self.grace_period}) must be <= max_t ({self.max_t})")
        return self


class Resources(_Strict):
    cpu: float = Field(1, gt=0)
    gpu: float = Field(0, ge=0)


class ChampionRule(_Strict):
    """When a challenger replaces the champion: better by ``margin`` AND paired-bootstrap P(better) >= min_probability,
    AND no guarded metric below the champion's by more than its tolerance (``guards``)."""

    registry_name: str = "medseg"
    margin: float = Field(0.01, ge=0, description="minimum gain in mean per-case validation Dice "
                                                 "(the shipped spaces use 0.01 too)")
    min_probability: float = Field(0.95, gt=0, le=1)
    bootstrap_resamples: int = Field(10000, ge=100)
    seed: int = 0
    models_dir: PathText = "models"
    min_shared_cases: int = Field(5, ge=1, description="a champion validated on another split (the data grew) is "
                                  "re-judged on the candidate's validation cases it did not train on; fewer than "
                                  "this many such cases: no comparison, the champion stays")
    guards: dict[str, float] = Field(default_factory=dict, description="metric -> tolerance, e.g. "
                                     "{val/lesion_recall: 0.02}: a challenger whose re-evaluated metric is below the "
                                     "champion's by more is not promoted")

    @model_validator(mode="after")
    def _check_guards(self) -> "ChampionRule":
        from medseg.registry import guard_record_key

        for name, tolerance in self.guards.items():
            guard_record_key(name)  # ValueError naming the guard and the metrics a record has
            if not tolerance >= 0:
                raise ValueError(f"guard {name}: tolerance must be >= 0, got {tolerance}")
        return self


class SearchSpace(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    base_config: PathText
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted keys applied to the base config")
    params: dict[str, Domain] = Field(default_factory=dict)
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list, description="trials to run first "
                                                     "(after the base config's own values)")
    metric: str = "val/dice"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(8, ge=1)
    max_concurrent: int = Field(2, ge=1)
    resources: Resources = Field(default_factory=Resources)
    asha: AshaConfig = Field(default_factory=AshaConfig)
    optuna_seed: int = 0
    time_budget_s: float | None = Field(None, gt=0)
    max_failures: int = Field(1, ge=0, description="retries of a crashed trial, from its last checkpoint")
    storage_path: PathText = "runs/ray"
    tracking_uri: str | None = None
    experiment: str = "medseg-tune"
    reports_dir: PathText = "reports"
    champion: ChampionRule = Field(default_factory=ChampionRule)

    # derived by load_space / space_for_configs, validated with the rest
    source: str = ""
    base: dict[str, Any] = Field(default_factory=dict)
    fixed_configs: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                                     description="tune.py --configs: file -> config")
    cli_overrides: list[str] = Field(default_factory=list, description="the --set values it was loaded with")
    settings_file: str = Field("", description="tune.py --configs: the --space file that supplied the study settings")

    def updated(self, **changes: Any) -> "SearchSpace":
        """A copy with ``changes`` (top-level fields), validated again: a space is never changed in place."""
        return _validated({**self.model_dump(exclude_unset=True), **changes}, self.source)

    def base_cfg(self) -> Config:
        return config_from_dict(self.base, source=self.source, resolve=False)

    def trial_config(self, sampled: dict[str, Any]) -> Config:
        """The base config with a trial's sampled values applied."""
        return config_from_dict(self.base, source=f"{self.source} (trial)", overrides=sampled, resolve=False)

    def initial_points(self) -> list[dict[str, Any]]:
        """The base config's own point (when inside the domains), then ``points_to_evaluate``."""
        base = self.base_point()
        return ([base] if base else []) + [p for p in self.points_to_evaluate if p != base]

    def base_point(self) -> dict[str, Any] | None:
        """The base config's own values of the searched keys, when they all lie in their domains:
        evaluated first so the study's baseline is a trial like any other."""
        flat = _flat_values(self.base)
        point = {k: flat.get(k) for k in self.params}
        return point if all(d.contains(point[k]) for k, d in self.params.items()) else None


def _flat_values(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat_values(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_space(path: str | Path, *, overrides: list[str] | None = None) -> SearchSpace:
    """Load and validate a search-space file; the base config path is relative to the file itself.

    The file (with its --set values) is validated first; the returned space is validated once more with the
    values derived from it: its source, the resolved base config, the --set values and absolute output paths."""
    path = Path(path)
    declared = _validated(_with_sets(load_yaml(path), overrides or [], path), str(path))
    base_path = (path.parent / declared.base_config).resolve()
    base_cfg = config_from_dict(load_yaml(base_path), source=str(base_path), overrides=dict(declared.overrides),
                                config_dir=base_path.parent)
    base = base_cfg.to_dict()
    _check_points(declared, path)
    _check_domains(declared, base, path)
    space = _validated({**_values_with_absolute_paths(declared), "source": str(path), "base": base,
                        "cli_overrides": list(overrides or [])}, str(path))
    if space.asha.enabled and space.asha.max_t != base_cfg.training.epochs:
        raise ConfigError(f"{path}: asha.max_t ({space.asha.max_t}) must equal the trial epochs training.epochs "
                          f"({base_cfg.training.epochs}); set overrides: {{training.epochs: {space.asha.max_t}}}")
    return space


def _with_sets(raw: dict[str, Any], overrides: list[str], path: Path) -> dict[str, Any]:
    """The file's mapping with tune.py's --set values applied (``overrides.<config key>`` adds a config override)."""
    from medseg.config import parse_override, set_dotted

    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("overrides."):  # a config key applied to every trial: overrides.training.ema_decay=0.99
            if not isinstance(raw.get("overrides") or {}, dict):
                raise ConfigError(f"{path}: overrides: must be a mapping of dotted config keys")
            raw["overrides"] = {**(raw.get("overrides") or {}), key.removeprefix("overrides."): value}
        else:
            set_dotted(raw, key, value)
    return raw


def _validated(values: dict[str, Any], source: str) -> SearchSpace:
    try:
        return SearchSpace.model_validate(values)
    except ValidationError as err:
        raise _format_error(err, source) from None


def _check_points(space: SearchSpace, path: Path) -> None:
    """Every point of ``points_to_evaluate`` sets exactly the searched keys, each inside its domain."""
    for i, point in enumerate(space.points_to_evaluate):
        if set(point) != set(space.params):
            raise ConfigError(f"{path}: points_to_evaluate.{i}: keys {sorted(point)} must be the searched keys "
                              f"{sorted(space.params)}")
        outside = [k for k, v in point.items() if not space.params[k].contains(v)]
        if outside:
            raise ConfigError(f"{path}: points_to_evaluate.{i}: {printable(outside[0])}={point[outside[0]]!r} "
                              "is outside its domain")


def _check_domains(space: SearchSpace, base: dict[str, Any], path: Path) -> None:
    """The base config with each domain's bounds (or each choice) applied is a valid config."""
    for key, domain in space.params.items():
        for value in domain.probe_values():
            try:
                config_from_dict(base, source=f"{path}: params.{printable(key)}={value!r}", overrides={key: value},
                                 resolve=False)
            except ConfigError as err:
                raise ConfigError(str(err)) from None


def _values_with_absolute_paths(space: SearchSpace) -> dict[str, Any]:
    """The values ``space`` was validated from (defaults left to the next validation, so they keep their form in
    dumps and hashes), with its output folders made absolute against the working directory: trials running in
    other working directories or on other nodes write to the same places."""
    cwd = Path.cwd()
    champion = {**space.champion.model_dump(exclude_unset=True),
                "models_dir": absolute_path(space.champion.models_dir, cwd)}
    return {**space.model_dump(exclude_unset=True), "storage_path": absolute_path(space.storage_path, cwd),
            "reports_dir": absolute_path(space.reports_dir, cwd), "champion": champion}


def space_for_configs(config_paths: list[str], *, name: str, template: SearchSpace | None = None) -> SearchSpace:
    """A 'study' over a fixed list of config files (tune.py --configs): one trial per file, no early stopping.
    The study settings come from ``template`` (tune.py --space), else the defaults."""
    from medseg.config import load_config

    bases = [load_config(p).to_dict() for p in config_paths]
    settings = template.model_dump(exclude={"params", "base", "source", "overrides", "base_config", "name",
                                            "fixed_configs", "settings_file"}) if template else {}
    declared = _validated({**settings, "name": name, "base_config": config_paths[0]}, "tune.py --configs")
    asha = {**declared.asha.model_dump(exclude_unset=True), "enabled": False}
    fixed = {str(Path(p).resolve()): b for p, b in zip(config_paths, bases)}
    return _validated({**_values_with_absolute_paths(declared), "asha": asha, "num_samples": len(config_paths),
                       "source": ", ".join(config_paths), "settings_file": template.source if template else "",
                       "base": bases[0], "fixed_configs": fixed}, "tune.py --configs")
