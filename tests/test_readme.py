"""The README's Python code runs as written: every ```python block, as a script, under `python`
and under `mpirun -np 2`. (Its shell commands are run by the tests of what they launch:
`test_launchers.py`, `test_k8s.py`, `test_trainjob.py`, `test_sources.py`.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import MPI_ROOT_VARIABLES, REPO_ROOT, launcher_command, run_script

README = REPO_ROOT / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", README.read_text(), re.MULTILINE | re.DOTALL)


def test_readme_has_a_python_block():
    assert python_blocks(), "README.md has no ```python block"


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_python_block_runs_as_written_in_one_process(tmp_path, index):
    script = tmp_path / "snippet.py"
    script.write_text(python_blocks()[index])
    completed = run_script("python", script)
    _assert_learned(completed.stdout.strip().splitlines()[-1])


def _assert_learned(printed: str) -> None:
    """The block prints the validation top-3 accuracy per epoch: it ends far above guessing's
    0.3 (measured: 0.92 after 5 epochs)."""
    values = [float(v) for v in printed.strip("[]").split(",")]
    assert values[-1] >= 0.8 and values[-1] > values[0], printed


@pytest.mark.multiworker
@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_python_block_runs_as_written_under_mpirun(tmp_path, index):
    script = tmp_path / "snippet.py"
    script.write_text(python_blocks()[index])
    completed = run_script("mpirun", script, num_workers=2)
    # Each rank prints the History's values, which count every worker's samples: the same list.
    printed = [line for line in completed.stdout.splitlines() if line.startswith("[")]
    assert len(printed) == 2 and printed[0] == printed[1], completed.stdout
    _assert_learned(printed[0])


@pytest.mark.multiworker
def test_metric_that_cannot_take_the_labels_is_named_on_every_rank_when_the_readme_model_uses_it(
        tmp_path):
    # The README's model with AUC, which takes binary or multi-label targets, not 10 classes'
    # integer labels: every rank's error names the metric, not the data. (One process:
    # tests/test_trainer.py's test_model_that_cannot_take_the_data_names_the_metric_or_loss...)
    snippet = python_blocks()[0]
    assert 'keras.metrics.SparseTopKCategoricalAccuracy(3, name="top3")' in snippet
    script = tmp_path / "snippet.py"
    script.write_text(snippet.replace('keras.metrics.SparseTopKCategoricalAccuracy(3, name="top3")',
                                      'keras.metrics.AUC(name="auc")'))
    ranks = 2
    env = {**os.environ, **MPI_ROOT_VARIABLES}
    completed = subprocess.run([*launcher_command("mpirun", ranks), sys.executable, str(script)],
                               capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert completed.returncode != 0
    errors = [line for line in completed.stderr.splitlines()
              if line.startswith("distaccum.ModelDataMismatch: ")]
    assert len(errors) == ranks, completed.stderr[-3000:]
    for line in errors:
        assert line.startswith("distaccum.ModelDataMismatch: the metric 'auc' (AUC) fails "
                               "on y (32,) and model output (32, 10): "), line
        assert line.endswith(". Every rank failed on its first micro-batch, so the model, loss or "
                             "metrics do not fit the data's shapes or label format; nothing was "
                             "trained"), line
