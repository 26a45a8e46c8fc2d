"""Config loading: every shipped file loads, unknown keys and bad values name their dotted key."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from medseg.config import config_from_dict, flatten, load_config, parse_override
from medseg.errors import ConfigError
from medseg.search_space import load_space

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.encoder_weights is None, "shipped configs must not download weights"
    assert Path(cfg.dataset.path).is_absolute() and Path(cfg.output.run_dir).is_absolute()
    assert yaml.safe_load(path.read_text())["name"] == cfg.name == path.stem


@pytest.mark.parametrize("path", sorted((ROOT / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_search_space_loads(path):
    space = load_space(path)
    assert space.params or space.fixed_configs
    for key, domain in space.params.items():
        for value in domain.probe_values():
            space.trial_config({key: value})  # every bound / choice gives a valid config


def test_unknown_key_names_its_dotted_path():
    with pytest.raises(ConfigError, match=r"training\.learning_rate: unknown key"):
        config_from_dict({"training": {"learning_rate": 0.1}})
    with pytest.raises(ConfigError, match=r"augment\.0\.name: Field required"):
        config_from_dict({"augment": [{"p": 0.5}]})


def test_bad_values_name_the_key_and_allowed_values():
    with pytest.raises(ConfigError, match=r"loss\.name: Input should be 'bce', 'dice', 'bce_dice'"):
        config_from_dict({"loss": {"name": "hinge"}})
    with pytest.raises(ConfigError, match=r"model: unknown arch 'Unett'; allowed: .*'Unet'"):
        config_from_dict({"model": {"arch": "Unett"}})
    with pytest.raises(ConfigError, match=r"model: unknown encoder 'resnet1888'; allowed: .*resnet18"):
        config_from_dict({"model": {"encoder": "resnet1888"}})
    with pytest.raises(ConfigError, match=r"augment\.0: unknown albumentations transform 'Flipp'"):
        config_from_dict({"augment": [{"name": "Flipp"}]})
    with pytest.raises(ConfigError, match=r"augment\.0: albumentations\.HorizontalFlip\(\{'p': 3\}\)"):
        config_from_dict({"augment": [{"name": "HorizontalFlip", "p": 3}]})
    # albumentations itself only warns about an unknown argument and runs on its defaults
    with pytest.raises(ConfigError, match=r"augment\.0: albumentations\.Rotate\(.*Argument\(s\) 'limt' are not valid"):
        config_from_dict({"augment": [{"name": "Rotate", "limt": 15}]})
    with pytest.raises(ConfigError,
                       match=r"augment\.0: albumentations\.ToTensorV2 is not a 2D image or image\+mask transform"):
        config_from_dict({"augment": [{"name": "ToTensorV2"}]})
    with pytest.raises(ConfigError, match=r"dataset\.split: .*group_regex '\(' is not a valid regular expression"):
        config_from_dict({"dataset": {"split": {"group_regex": "("}}})
    with pytest.raises(ConfigError, match=r"dataset\.percentiles: .*0 <= low < high <= 100, got \[99\.5, 0\.5\]"):
        config_from_dict({"dataset": {"percentiles": [99.5, 0.5]}})
    with pytest.raises(ConfigError, match=r"dataset\.image_size: .*multiple of 32"):
        config_from_dict({"dataset": {"image_size": 100}})
    with pytest.raises(ConfigError, match=r"dataset\.split: .*fold 3 out of range"):
        config_from_dict({"dataset": {"split": {"n_folds": 3, "fold": 3}}})


def test_overrides_from_the_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "c", "training": {"lr": 0.1}}))
    cfg = load_config(path, ["training.lr=3e-4", "loss.name=dice", "dataset.labels=[1, 2]", "training.patience=null"])
    assert cfg.training.lr == pytest.approx(3e-4)
    assert cfg.loss.name == "dice" and cfg.dataset.labels == [1, 2] and cfg.training.patience is None
    assert parse_override("a.b=1e-3") == ("a.b", 1e-3)
    with pytest.raises(ConfigError, match=r"training\.lrr: unknown key"):
        load_config(path, ["training.lrr=1"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(path, ["training.lr"])


def test_flatten_gives_mlflow_param_keys():
    cfg = config_from_dict({"augment": [{"name": "HorizontalFlip", "p": 0.5}]})
    flat = flatten(cfg.to_dict())
    assert flat["training.lr"] == cfg.training.lr
    assert flat["augment.0.name"] == "HorizontalFlip" and flat["augment.0.p"] == 0.5
    assert flat["model.decoder_channels"] == [64, 32, 16, 8]


def test_search_space_errors_name_keys(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"name": "base", "training": {"epochs": 4}}))

    def space(**extra):
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump({"name": "s", "base_config": "base.yaml", "asha": {"max_t": 4}, **extra}))
        return path

    with pytest.raises(ConfigError, match=r"params\.training\.lr\.type: Input should be 'uniform'"):
        load_space(space(params={"training.lr": {"type": "normal", "low": 0, "high": 1}}))
    with pytest.raises(ConfigError, match=r"params\.training\.lrr=0\.1.*training\.lrr: unknown key"):
        load_space(space(params={"training.lrr": {"type": "uniform", "low": 0.1, "high": 0.2}}))
    with pytest.raises(ConfigError, match=r"params\.loss\.name='hinge'.*loss\.name"):
        load_space(space(params={"loss.name": {"type": "choice", "values": ["dice", "hinge"]}}))
    with pytest.raises(ConfigError, match=r"loguniform needs low > 0"):
        load_space(space(params={"training.lr": {"type": "loguniform", "low": 0, "high": 1}}))
    with pytest.raises(ConfigError, match=r"asha\.max_t \(8\) must equal .*training\.epochs \(4\)"):
        load_space(space(asha={"max_t": 8}, params={"training.lr": {"type": "uniform", "low": 0.1, "high": 0.2}}))
    with pytest.raises(ConfigError, match=r"s\.yaml: num_sample: unknown key"):
        load_space(space(num_sample=3))
    # --set overrides.<config key>: one more fixed config value for every trial, checked like the others
    loaded = load_space(space(overrides={"training.epochs": 4}),
                        overrides=["overrides.training.ema_decay=0.99", "num_samples=3"])
    assert loaded.base["training"]["ema_decay"] == 0.99 and loaded.base["training"]["epochs"] == 4
    assert loaded.num_samples == 3
    with pytest.raises(ConfigError, match=r"training\.ema_decay"):
        load_space(space(), overrides=["overrides.training.ema_decay=2"])


def test_loaded_search_space_is_validated_with_its_final_values_and_frozen(tmp_path, monkeypatch):
    from pydantic import ValidationError

    from medseg.search_space import space_for_configs

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"name": "base", "training": {"epochs": 4}}))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "base_config": "base.yaml", "asha": {"max_t": 4}, "reports_dir": "rep",
                                    "storage_path": "~/ray", "champion": {"models_dir": "m", "margin": 0.02}}))
    monkeypatch.chdir(tmp_path)
    space = load_space(path, overrides=["num_samples=3"])
    assert space.source == str(path) and space.cli_overrides == ["num_samples=3"]
    assert space.base["training"]["epochs"] == 4
    assert space.reports_dir == str(tmp_path.resolve() / "rep")
    assert space.champion.models_dir == str(tmp_path.resolve() / "m")
    assert space.storage_path == str(Path("~/ray").expanduser().resolve()) and space.champion.margin == 0.02
    assert space.model_dump() == type(space).model_validate(space.model_dump()).model_dump()
    with pytest.raises(ValidationError, match="frozen"):
        space.num_samples = 4
    with pytest.raises(ValidationError, match="frozen"):
        space.champion.models_dir = "elsewhere"
    # a changed copy is validated again
    assert space.updated(time_budget_s=60).time_budget_s == 60 and space.time_budget_s is None
    with pytest.raises(ConfigError, match=r"s\.yaml: time_budget_s: Input should be greater than 0"):
        space.updated(time_budget_s=-1)
    fixed = space_for_configs([str(base)], name="fixed", template=space)
    assert not fixed.asha.enabled and fixed.num_samples == 1 and fixed.settings_file == str(path)
    assert fixed.storage_path == space.storage_path and list(fixed.fixed_configs) == [str(base.resolve())]
    with pytest.raises(ConfigError, match=r"tune\.py --configs: name: String should match pattern"):
        space_for_configs([str(base)], name="two words")


def test_new_dataset_keys_resolve_validate_and_stay_out_of_dumps_when_unset(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    path = tmp_path / "configs" / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "c", "dataset": {"format": "folders2d", "path": "data/x",
                                                             "mask_threshold": 128,
                                                             "split": {"groups_file": "groups.csv"}}}))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path)
    # groups_file ships beside its config: relative to the config's folder; dataset.path stays relative to the CWD
    assert cfg.dataset.split.groups_file == str(tmp_path / "configs" / "groups.csv")
    assert cfg.dataset.path == str(tmp_path / "data" / "x") and cfg.dataset.mask_threshold == 128
    assert cfg.to_dict()["dataset"]["mask_threshold"] == 128
    unset = config_from_dict({}, resolve=False)
    assert "mask_threshold" not in unset.to_dict()["dataset"]
    assert "groups_file" not in unset.to_dict()["dataset"]["split"]
    assert unset.dataset.mask_threshold is None and unset.dataset.split.groups_file is None
    with pytest.raises(ConfigError, match=r"dataset\.split: set group_regex or groups_file, not both"):
        config_from_dict({"dataset": {"split": {"group_regex": "^(p\\d+)", "groups_file": "g.csv"}}})
    with pytest.raises(ConfigError, match=r"dataset: mask_threshold binarises 2D mask images; format 'msd'"):
        config_from_dict({"dataset": {"format": "msd", "mask_threshold": 128}})
    with pytest.raises(ConfigError,
                       match=r"dataset: mask_threshold binarises masks to labels \{0, 1\}: labels must be \[1\]"):
        config_from_dict({"dataset": {"format": "folders2d", "mask_threshold": 128, "labels": [2]}})
    with pytest.raises(ConfigError, match=r"dataset\.mask_threshold: Input should be greater than 0"):
        config_from_dict({"dataset": {"format": "folders2d", "mask_threshold": 0}})


def test_focal_weight_is_its_own_key_and_old_focal_dice_configs_still_load():
    from medseg.losses import build_loss

    unset = config_from_dict({}, resolve=False)
    # at its default the new key stays out of dumps: configs that never set it keep their hash
    assert "focal_weight" not in unset.to_dict()["loss"] and unset.loss.focal_weight == 0.5
    focal = config_from_dict({"loss": {"name": "focal_dice", "focal_weight": 0.2, "dice_weight": 0.8}}, resolve=False)
    assert focal.to_dict()["loss"]["focal_weight"] == 0.2
    assert build_loss(focal.loss, classes=1).weights == [0.2, 0.8]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bce = config_from_dict({"loss": {"name": "bce_dice", "bce_weight": 0.3}}, resolve=False)
        default = config_from_dict({"loss": {"name": "focal_dice", "bce_weight": 0.5}}, resolve=False)
    assert build_loss(bce.loss, classes=1).weights == [0.3, 0.5]
    assert default.hash() == config_from_dict({"loss": {"name": "focal_dice"}}, resolve=False).hash()
    # before focal_weight existed, focal_dice weighted its focal term with bce_weight
    with pytest.warns(FutureWarning, match=r"^old\.yaml: loss\.bce_weight weights the focal term of focal_dice under "
                      r"its old name; read as loss\.focal_weight \(rename the key\)$") as record:
        old = config_from_dict({"loss": {"name": "focal_dice", "bce_weight": 0.3}}, source="old.yaml", resolve=False)
    assert len(record) == 1
    assert (old.loss.focal_weight, old.loss.bce_weight) == (0.3, 0.5)
    assert build_loss(old.loss, classes=1).weights == [0.3, 0.5]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config_from_dict(old.to_dict(), resolve=False).hash() == old.hash()  # its dump reloads as it is
