"""The rows of the results table: every subset of members under every rule, named
as the article names them, scored from cached probabilities (NumPy only)."""

from ensembling import combination

# The article's table: (row, members), then its published test errors (the
# author's notebook, canonical CIFAR-10, Keras 2; NIN was trained 100 epochs there).
ARTICLE_ROWS = (
    ("ConvPool-CNN-C", ("conv_pool_cnn",)),
    ("ALL-CNN-C", ("all_cnn",)),
    ("NIN", ("nin_cnn",)),
    ("ensemble of three", ("conv_pool_cnn", "all_cnn", "nin_cnn")),
    ("pair A", ("conv_pool_cnn", "all_cnn")),
    ("pair B", ("conv_pool_cnn", "nin_cnn")),
    ("pair C", ("all_cnn", "nin_cnn")),
)
ARTICLE_ERRORS = {
    "ConvPool-CNN-C": 0.2414,
    "ALL-CNN-C": 0.2609,
    "NIN": 0.3164,
    "ensemble of three": 0.2049,
    "pair A": 0.2120,
    "pair B": 0.2282,
    "pair C": 0.2447,
}


def table_rows(names, rules, test_probs, val_probs, val_labels, labels, every_subset=None):
    """Every non-empty subset of members under every rule; the article's 7 rows first.

    Beyond `combination.EVERY_SUBSET_UP_TO` members, unless `every_subset`: each
    member, all but each one, and all of them (`combination.subsets`).
    """
    twice = combination.repeated(names)
    if twice:  # their probabilities, keyed by name, would already be one member's
        raise ValueError(
            f"two members are both named {twice!r}; give each its own name "
            f"(model.name = '{twice}_2')"
        )
    article = [members for _, members in ARTICLE_ROWS if set(members) <= set(names)]
    # Subsets in any member order (--models nin_cnn all_cnn) are still the article's rows.
    ordered = article + [
        s
        for s in combination.subsets(names, every_subset)
        if set(s) not in [set(a) for a in article]
    ]
    rows = []
    for rule in ("average", *(r for r in rules if r != "average")):
        for members in ordered:
            if len(members) == 1 and rule not in combination.ONE_MODEL_RULES:
                continue  # a single model is itself under this rule
            combined, fitted = combination.combine(rule, members, test_probs, val_probs, val_labels)
            base = row_name(members, names)
            row = {
                "row": base if rule == "average" else f"{base} ({rule})",
                "members": list(members),
                "rule": rule,
                **combination.row_metrics(combined, [test_probs[m] for m in members], labels),
                "article_error": ARTICLE_ERRORS.get(base) if rule == "average" else None,
            }
            if rule in combination.WEIGHTING_RULES:
                row["weights"] = fitted["weights"]
            if rule == "temperature":
                row["temperature"] = round(fitted["temperature"], 4)
            rows.append(row)
    return rows


def per_class_errors(names, test_probs, labels, classes):
    """{"classes": names, row: [test error of each class]} for each member and, of
    several, their average (the article's ensemble): where averaging helps."""
    errors = {"classes": list(classes)}
    for name in names:
        errors[row_name((name,), names)] = combination.per_class_error(
            test_probs[name], labels, len(classes)
        )
    if len(names) > 1:
        mean = combination.average([test_probs[n] for n in names])
        errors[row_name(tuple(names), names)] = combination.per_class_error(
            mean, labels, len(classes)
        )
    return errors


def row_name(members, names):
    """The table's name for the average of `members` (of all `names`): the article's,
    in any member order, or `subset_name`'s."""
    article = (row for row, chosen in ARTICLE_ROWS if set(chosen) == set(members))
    return next(article, None) or subset_name(members, names)


# Beyond this many members, the rows of all of them and of all but one are named so:
# eight seeds' names joined by "+" run past a hundred characters, and the row of all
# but one is read for the one it leaves out.
JOINED_NAMES_UP_TO = 4


def subset_name(members, names):
    """A row's name: its members joined by "+", or of many, "all 8" and "all but a"."""
    if len(names) > JOINED_NAMES_UP_TO and len(members) == len(names):
        return f"all {len(names)}"
    if len(names) > JOINED_NAMES_UP_TO and len(members) == len(names) - 1:
        return f"all but {next(name for name in names if name not in members)}"
    return "+".join(members)
