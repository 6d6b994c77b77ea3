"""Run dirs, atomic writes, configs and require_run, on a throwaway project root."""
import json
from dataclasses import dataclass

import pytest

from spatialstudy import runs
from spatialstudy.configs import CONFIGS, DataConfig


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("SPATIALSTUDY_ROOT", str(tmp_path))
    (tmp_path / "notebooks").mkdir()
    return tmp_path


def test_atomic_write_leaves_old_file_on_failure(project):
    path = project / "x.json"
    runs.write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        runs.write_json(path, {"a": object()})  # not serialisable: the old content must survive
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in project.iterdir() if p.name.startswith(".")] == []  # no temp file left behind


def test_save_run_writes_config_and_metrics(project):
    out = runs.save_run("smoke", "01_data", DataConfig(profile="smoke"), {"acc": 0.5})
    assert out == project / "runs" / "smoke" / "01_data"
    assert runs.read_json(out / "config.json")["profile"] == "smoke"
    assert runs.read_json(out / "metrics.json") == {"acc": 0.5}
    assert runs.is_done("smoke", "01_data")


def test_require_run_missing_names_the_command(project):
    with pytest.raises(FileNotFoundError, match=r"python -m spatialstudy.run --profile smoke --only 02_sft"):
        runs.require_run("smoke", "02_sft")


def test_require_run_returns_existing(project):
    runs.save_run("full", "01_data", {}, {})
    assert runs.require_run("full", "01_data") == project / "runs" / "full" / "01_data"


def test_config_hash_stable_and_sensitive():
    a = runs.config_hash({"lr": 1e-3, "steps": 10})
    assert a == runs.config_hash({"steps": 10, "lr": 1e-3})
    assert a != runs.config_hash({"lr": 1e-3, "steps": 11})


def test_config_rejects_typos_and_wrong_types():
    with pytest.raises(KeyError, match="did you mean 'n_train'"):
        DataConfig.check_keys({"n_trian": 5})
    with pytest.raises(TypeError, match="n_train"):
        DataConfig(n_train="5")
    with pytest.raises(ValueError, match="profile"):
        DataConfig(profile="smokey")
    with pytest.raises(NameError, match="n_omni"):
        DataConfig.from_params({"profile": "ci", "seed": 0, "n_train": 1, "n_test": 1, "image_size": 8,
                                "palette": "distinct", "spacethinker_path": "", "omnispatial_path": ""})


def test_int_accepted_for_float_field():
    @dataclass
    class C(runs.StageConfig):
        lr: float = 1e-3

    assert C(lr=1).lr == 1
    with pytest.raises(TypeError):
        C(lr="0.1")


def test_every_params_file_matches_its_notebook():
    """Each params/<profile>/<nb>.yaml key must be a parameter of the notebook and a field of its config."""
    import papermill as pm
    import yaml

    root = runs.root()
    files = sorted(root.glob("params/*/*.yaml"))
    assert files, "no params files found"
    for path in files:
        keys = set(yaml.safe_load(path.read_text()) or {}) - {"budget_s"}
        nb = root / "notebooks" / f"{path.stem}.ipynb"
        if nb.exists():
            declared = set(pm.inspect_notebook(str(nb)))
            assert keys <= declared, f"{path}: {sorted(keys - declared)} not in {nb.name}'s parameters cell"
        if path.stem in CONFIGS:
            CONFIGS[path.stem].check_keys(keys, where=str(path))


def test_for_profile_builds_a_stage_config_and_names_the_file_on_an_unknown_key():
    """Every stage's main() builds its config here: the profile comes from the argument, a typo fails naming
    params/<profile>/<stage>.yaml."""
    from spatialstudy.configs import DistillConfig

    cfg = DistillConfig.for_profile("smoke", {"max_steps": 7}, "04_distill")
    assert (cfg.profile, cfg.max_steps) == ("smoke", 7)
    with pytest.raises(KeyError, match=r"params/smoke/04_distill\.yaml"):
        DistillConfig.for_profile("smoke", {"max_step": 7}, "04_distill")


def test_require_run_builds_a_ci_run_as_a_process_of_its_own(project, monkeypatch):
    """Inside a torchrun launch (rank variables set), a missing ci run is built by a runner that does not see them:
    otherwise it would wait for ranks that never join. Real runner, real papermill kernel, a one-cell stage."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell('profile = "ci"', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell('import os\nfrom spatialstudy import runs\n'
                                          'runs.save_run(profile, "09_probe", {}, {"seen": {k: os.environ.get(k) '
                                          'for k in ("RANK", "WORLD_SIZE", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}})')]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, project / "notebooks" / "09_probe.ipynb")
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}.items():
        monkeypatch.setenv(k, v)
    path = runs.require_run("ci", "09_probe")
    assert runs.read_json(path / "metrics.json")["seen"] == dict.fromkeys(("RANK", "WORLD_SIZE", "MASTER_PORT",
                                                                            "TORCHELASTIC_RUN_ID"))
