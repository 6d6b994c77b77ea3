"""The runner executes numbered notebooks with real papermill, logs budgets, and names a failing cell."""
from pathlib import Path

import nbformat
import pytest

from spatialstudy import run, runs


def _notebook(path, params_src, body_src):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cell = nbformat.v4.new_code_cell(params_src)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell(body_src)]
    nbformat.write(nb, path)


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("SPATIALSTUDY_ROOT", str(tmp_path))
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    _notebook(nbs / "01_first.ipynb", 'profile = "ci"  # tier\nsize = 2  # items',
              "from spatialstudy import runs\nruns.save_run(profile, '01_first', {'size': size}, {'total': size * 10})")
    _notebook(nbs / "02_second.ipynb", 'profile = "ci"  # tier',
              "from spatialstudy import runs\nd = runs.require_run(profile, '01_first')\n"
              "m = runs.read_json(d / 'metrics.json')\nruns.save_run(profile, '02_second', {}, {'seen': m['total']})")
    (nbs / "scratch.ipynb").write_text((nbs / "01_first.ipynb").read_text())  # unnumbered: not a stage
    (tmp_path / "params" / "smoke").mkdir(parents=True)
    (tmp_path / "params" / "smoke" / "01_first.yaml").write_text("budget_s: 60\nsize: 5\n")
    return tmp_path


def test_stages_are_numbered_notebooks_in_order(project):
    assert run.stages() == ["01_first", "02_second"]


def test_smoke_profile_runs_all_with_params(project, capsys):
    assert run.main(["--profile", "smoke"]) == 0
    assert runs.read_json(project / "runs/smoke/01_first/metrics.json") == {"total": 50}  # yaml size=5 injected
    assert runs.read_json(project / "runs/smoke/02_second/metrics.json") == {"seen": 50}
    assert (project / "reports/smoke/02_second.ipynb").exists()
    assert set(runs.read_json(project / "reports/smoke/timings.json")) == {"01_first", "02_second"}
    assert "(budget 60 s) within budget" in capsys.readouterr().out


def test_require_run_builds_missing_ci_run(project):
    d = runs.require_run("ci", "01_first")  # executes the notebook at its ci defaults
    assert runs.read_json(d / "metrics.json") == {"total": 20}


def test_failure_names_notebook_and_cell(project, capsys):
    _notebook(project / "notebooks" / "03_broken.ipynb", 'profile = "ci"  # tier', "1 / 0")
    assert run.main(["--profile", "ci", "--only", "03_broken"]) == 1
    err = capsys.readouterr().err
    assert "notebook 03_broken failed in cell" in err and "ZeroDivisionError" in err


def test_each_stage_time_is_recorded_when_it_ends_so_a_failure_keeps_them(project):
    _notebook(project / "notebooks" / "03_broken.ipynb", 'profile = "ci"  # tier', "1 / 0")
    assert run.main(["--profile", "ci", "--only", "01_first", "--only", "03_broken"]) == 1
    assert set(runs.read_json(project / "reports/ci/timings.json")) == {"01_first"}


def test_unknown_param_in_yaml_fails_before_running(project):
    (project / "params" / "smoke" / "01_data.yaml").write_text("n_trian: 3\n")
    with pytest.raises(KeyError, match="did you mean 'n_train'"):
        run.load_params("01_data", "smoke")


BAD_PARAMS = {  # file content of the LAST stage's parameters -> what the one STOPPED line must name
    "wrong type": ("n_train: '3'\n", r"params/smoke/02_second\.yaml: parameter 'n_train' must be .*int.*got str"),
    "yaml float notation for an int": ("n_omni: 4e2\n", r"02_second\.yaml: parameter 'n_omni' must be .*got str"),
    "bad value": ("n_train: 0\n", r"02_second\.yaml: n_train must be positive"),
    "unknown key": ("n_trian: 3\n", r"02_second\.yaml: unknown parameter 'n_trian' .*did you mean 'n_train'"),
    "budget not a number": ("budget_s: soon\n", r"02_second\.yaml: budget_s must be a positive number.*'soon'"),
    "budget negative": ("budget_s: -5\n", r"02_second\.yaml: budget_s must be a positive number"),
    "budget bool": ("budget_s: true\n", r"02_second\.yaml: budget_s must be a positive number"),
    "not yaml": ("n_train: [1, 2\n", r"02_second\.yaml: not valid YAML"),
    "not a mapping": ("- n_train\n- 3\n", r"02_second\.yaml: must be a mapping"),
}


@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
def test_every_params_file_is_checked_before_the_first_stage(project, capsys, monkeypatch, case):
    import re

    from spatialstudy.configs import CONFIGS, DataConfig

    monkeypatch.setitem(CONFIGS, "02_second", DataConfig)       # a stage with a typed config
    content, pattern = BAD_PARAMS[case]
    (project / "params" / "smoke" / "02_second.yaml").write_text(content)
    assert run.main(["--profile", "smoke"]) == 2
    err = capsys.readouterr().err
    stopped = [line for line in err.splitlines() if line.startswith("[run] STOPPED")]
    assert len(stopped) == 1 and re.search(pattern, stopped[0]), err
    assert "Traceback" not in err
    assert not (project / "runs" / "smoke" / "01_first").exists()    # the first stage never started
    assert not (project / "reports" / "smoke").exists()


def test_valid_typed_params_pass_and_reach_the_stage(project, monkeypatch):
    from spatialstudy.configs import CONFIGS, DataConfig

    monkeypatch.setitem(CONFIGS, "01_first", DataConfig)
    (project / "params" / "smoke" / "01_first.yaml").write_text("budget_s: 60.5\nn_train: 3\n")
    plan = run.validate_profile(run.stages(), "smoke")
    assert plan["01_first"] == ({"n_train": 3, "profile": "smoke"}, 60.5)
    assert plan["02_second"] == ({"profile": "smoke"}, None)


def test_the_project_params_files_are_valid():
    for profile in ("ci", "smoke", "full"):
        run.validate_profile(run.stages(), profile)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb")),
                         ids=lambda p: p.name)
def test_parameters_cell_parses_into_the_config_fields(path):
    """papermill must read every parameter of the cell (a comment holding "=" or quotes makes it skip the line,
    and then warns 'Passed unknown parameter' for a value the profile sets): the names it reads are exactly the
    stage config's fields."""
    import dataclasses

    from papermill.translators import PythonTranslator

    from spatialstudy.configs import CONFIGS

    nb = nbformat.read(path, as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    names = [p.name for p in PythonTranslator.inspect(cell)]
    assert len(names) == len([line for line in cell.source.splitlines() if line.strip()]), names
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(CONFIGS[path.stem])), path.name
