"""The runner executes numbered notebooks with real papermill, logs budgets, and names a failing cell."""
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


def test_unknown_param_in_yaml_fails_before_running(project):
    (project / "params" / "smoke" / "01_data.yaml").write_text("n_trian: 3\n")
    with pytest.raises(KeyError, match="did you mean 'n_train'"):
        run.load_params("01_data", "smoke")
