"""The machinery behind `ensemble.py`: settings, image readers, training, prediction,
combination rules, reports, export and the command line, in layers that each import
only from the ones below (docs/layout.md; `lint-imports` checks it)."""
