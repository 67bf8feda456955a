"""The README's Python example runs as written, on a tiny synthetic data set."""

import re
from pathlib import Path

import keras
from conftest import write_tree

README = Path(__file__).resolve().parents[1] / "README.md"
SOURCE = 'source = "../shared/data/cifar10-jpeg.tar.gz"'


def readme_example():
    text = README.read_text()
    section = text.split("## From Python: ensembling your own classifiers", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_reports_every_combination_and_exports(tmp_path, monkeypatch, capsys):
    code = readme_example()
    assert SOURCE in code and '"mine.keras"' in code  # the data line is swapped below
    tree = write_tree(tmp_path / "tree", train_per_class=4, test_per_class=3)
    code = code.replace(SOURCE, f"source = {str(tree)!r}")
    monkeypatch.chdir(tmp_path)  # mine.keras lands here

    exec(compile(code, str(README), "exec"), {"__name__": "readme"})

    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["row", "test", "error"]
    rows = [line.split("  ")[0] for line in table[2:]]
    assert rows == ["ALL-CNN-C", "NIN", "pair C", "pair C (weighted)", "pair C (stack)"]
    exported = keras.saving.load_model(tmp_path / "mine.keras")
    assert exported.name == "ensemble_weighted"
    assert exported.output_shape == (None, 10)


def test_the_readme_models_example_builds_named_models():
    section = README.read_text().split("## Import the models", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {"__name__": "readme"}
    exec(compile(code, str(README), "exec"), scope)
    assert scope["model"].name == "nin_cnn" and scope["model"].output_shape == (None, 10)
    assert scope["grey"].output_shape == (None, 100)
    assert set(scope["MODELS"]) == {"conv_pool_cnn", "all_cnn", "nin_cnn"}
