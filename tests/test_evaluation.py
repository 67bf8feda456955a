"""Metrics against hand-computed values, combination rules, and the full table."""

import math

import numpy as np
import pytest

from ensembling import combination as ev
from ensembling.rows import ARTICLE_ROWS, table_rows

# Two images, three classes; labels 0 and 2.
P = np.array([[0.7, 0.2, 0.1], [0.3, 0.5, 0.2]])
LABELS = np.array([0, 2])


def test_error_nll_brier_by_hand():
    assert ev.error_rate(P, LABELS) == 0.5
    assert ev.negative_log_likelihood(P, LABELS) == pytest.approx(-(np.log(0.7) + np.log(0.2)) / 2)
    # (0.3² + 0.2² + 0.1²) and (0.3² + 0.5² + 0.8²), averaged
    assert ev.brier_score(P, LABELS) == pytest.approx((0.14 + 0.98) / 2)


def test_ece_by_hand_and_zero_when_perfectly_calibrated():
    # Confidences 0.7 (right) and 0.5 (wrong) fall in different bins of 15:
    # |1 - 0.7| and |0 - 0.5|, each weighted 1/2.
    assert ev.expected_calibration_error(P, LABELS) == pytest.approx((0.3 + 0.5) / 2)
    # Ten images at confidence 0.8, eight of them right: perfectly calibrated.
    probs = np.tile([0.8, 0.2], (10, 1))
    labels = np.array([0] * 8 + [1] * 2)
    assert ev.expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_disagreement_oracle_and_gain():
    a = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.9, 0.1]])  # predicts 0 0 1 0
    b = np.array([[0.9, 0.1], [0.1, 0.9], [0.1, 0.9], [0.9, 0.1]])  # predicts 0 1 1 0
    labels = np.array([0, 1, 0, 1])
    assert ev.disagreement([a, b]) == 0.25
    assert ev.oracle_error([a, b], labels) == 0.5  # images 3 and 4: nobody right
    metrics = ev.row_metrics(ev.average([a, b]), [a, b], labels)
    best_member = min(ev.error_rate(a, labels), ev.error_rate(b, labels))
    assert metrics["gain"] == pytest.approx(best_member - metrics["test_error"])


def test_mcnemar_p_by_hand():
    def correct(right_count, total):
        return np.arange(total) < right_count

    # 10 images only A gets right, 2 only B gets right, 4 both, 3 neither:
    # 2 * P(X <= 2) for X ~ Binomial(12, 1/2) = 2 * (1 + 12 + 66) / 4096.
    a = np.array([True] * 10 + [False] * 2 + [True] * 4 + [False] * 3)
    b = np.array([False] * 10 + [True] * 2 + [True] * 4 + [False] * 3)
    assert ev.mcnemar_p(a, b) == pytest.approx(2 * 79 / 4096)
    assert ev.mcnemar_p(b, a) == ev.mcnemar_p(a, b)  # two-sided
    assert ev.mcnemar_p(correct(5, 5), correct(0, 5)) == pytest.approx(2 / 32)
    assert ev.mcnemar_p(a, a) == 1.0  # they never disagree
    assert ev.mcnemar_p(correct(2, 3), np.roll(correct(2, 3), 1)) == 1.0  # capped
    # 3,000 against 2,800 disagreements: tiny, but computed, not underflowed to 0.
    many = ev.mcnemar_p(np.arange(5800) < 3000, np.arange(5800) >= 3000)
    assert 0 < many < 0.02


def test_binomial_tail_by_hand_and_at_chance_for_two_classes_as_for_ten():
    for n, k, p in ((5, 3, 0.3), (10, 0, 0.5), (10, 11, 0.5), (7, 7, 0.9), (40, 9, 0.1)):
        exact = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))
        assert ev.binomial_tail(n, k, p) == pytest.approx(exact, abs=1e-15)

    def answers(labels, right):  # one-hot answers, the first `right` of them correct
        predicted = np.where(np.arange(len(labels)) < right, labels, (labels + 1) % 2)
        return np.eye(10)[predicted]

    two = np.repeat([0, 1], 1000)  # cats and dogs: guessing gets 1000 of 2000 right
    assert not ev.at_chance(answers(two, 1070), two)  # error 0.465: weak, but p ~ 0.001
    assert ev.at_chance(answers(two, 1020), two)  # error 0.49: p ~ 0.19
    ten = np.repeat(np.arange(10), 100)
    assert ev.at_chance(np.eye(10)[np.zeros(1000, int)], ten)  # one class for all: 0.90
    assert not ev.at_chance(np.eye(10)[ten], ten)
    # CIFAR-10's 10,000 test images: at chance from error 0.893 up (README).
    assert ev.binomial_tail(10000, 1070, 0.1) >= 0.01 > ev.binomial_tail(10000, 1071, 0.1)
    # Against the commonest class, not 1/K: 80% of the images in one class.
    skewed = np.repeat([0, 1], [800, 200])
    assert ev.at_chance(np.eye(10)[np.zeros(1000, int)], skewed)  # error 0.2, yet no skill


def test_per_class_error_by_hand():
    labels = np.array([0, 0, 1, 2])
    probs = np.eye(4)[[0, 1, 1, 0]]  # right, wrong, right, wrong
    assert ev.per_class_error(probs, labels, 4) == [0.5, 0.0, 1.0, None]  # no class 3


def test_the_gain_p_value_compares_the_ensemble_with_its_best_member():
    members, labels = random_members(3, count=2, images=400)
    members[0] = 0.5 * np.eye(10)[labels] + 0.5 * members[0]  # the better member
    combined = ev.average(members)
    metrics = ev.row_metrics(combined, members, labels)
    best_right = np.argmax(members[0], axis=1) == labels
    assert metrics["gain_p"] == ev.mcnemar_p(np.argmax(combined, axis=1) == labels, best_right)
    assert "gain_p" not in ev.row_metrics(members[0], members[:1], labels)


def test_vote_breaks_ties_by_mean_probability():
    a = np.array([[0.6, 0.4, 0.0], [0.1, 0.8, 0.1]])
    b = np.array([[0.1, 0.9, 0.0], [0.2, 0.7, 0.1]])
    # Image 1: one vote each for 0 and 1; mean probabilities 0.35 vs 0.65 -> 1.
    # Image 2: both vote 1.
    np.testing.assert_array_equal(ev.vote([a, b]), [1, 1])
    assert ev.row_metrics(ev.vote([a, b]), [a, b], np.array([1, 1]))["nll"] is None


def random_members(seed, count=3, images=200, classes=10):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(count, images, classes)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    return list(probs), rng.integers(0, classes, images)


def test_fitted_weights_are_valid_and_never_worse_than_equal_weights():
    members, labels = random_members(0)
    members[1] = 0.6 * np.eye(10)[labels] + 0.4 * members[1]  # one good member
    weights = ev.fit_weights(members, labels)
    assert np.all(weights >= 0) and weights.sum() == pytest.approx(1.0)
    fitted = ev.negative_log_likelihood(ev.average(members, weights), labels)
    equal = ev.negative_log_likelihood(ev.average(members), labels)
    assert fitted <= equal
    assert weights[1] == max(weights)


def test_selection_picks_members_greedily_with_replacement_and_leaves_out_the_useless():
    members, labels = random_members(4, count=4, images=300)
    knows = 0.7 * np.eye(10)[labels]
    index = np.arange(300)[:, None]
    members[0] = np.where(index < 200, knows + 0.3 * members[0], members[0])  # the best
    members[1] = np.where(index >= 100, knows + 0.3 * members[1], members[1])  # the rest
    members[3] = np.full_like(members[3], 0.1)  # knows nothing: never worth a place
    weights = ev.fit_selection(members, labels)
    assert weights.sum() == pytest.approx(1.0)
    assert weights[2] == weights[3] == 0  # left out
    assert weights[0] >= weights[1] > 0
    # Shares of a bag of whole members: counts over a bag of at most SELECTION_ROUNDS.
    sizes = range(1, ev.SELECTION_ROUNDS + 1)
    assert any(np.allclose(weights * k, np.round(weights * k)) for k in sizes)
    fitted = ev.negative_log_likelihood(ev.average(members, weights), labels)
    assert fitted < min(ev.negative_log_likelihood(m, labels) for m in members)


def test_selection_by_hand_and_never_worse_than_the_best_member():
    # The probability each member gives the right label, on two images:
    # A 0.8 and 0.4, B 0.2 and 0.9, C 0.1 and 0.1 (any other class takes the rest).
    labels = np.array([0, 0])

    def member(first, second):
        return np.array([[first, 1 - first], [second, 1 - second]])

    a, b, c = member(0.8, 0.4), member(0.2, 0.9), member(0.1, 0.1)
    # Round 1: A alone, NLL (0.223 + 0.916) / 2 = 0.570, against B's 0.857, C's 2.303.
    np.testing.assert_allclose(ev.fit_selection([a, b, c], labels, rounds=1), [1, 0, 0])
    # Round 2: A + B, 0.5 and 0.65: 0.562, better than A again (0.570).
    np.testing.assert_allclose(ev.fit_selection([a, b, c], labels, rounds=2), [0.5, 0.5, 0])
    # Round 3: A again (A, A, B: 0.6 and 0.567, 0.539), not B (0.4 and 0.733, 0.613).
    np.testing.assert_allclose(ev.fit_selection([a, b, c], labels, rounds=3), [2 / 3, 1 / 3, 0])
    # In 50 rounds, near the best weight of A, w: 0.6 / (0.2 + 0.6 w) = 0.5 / (0.9 - 0.5 w),
    # w = 0.44 / 0.6 = 0.733; C never.
    weights = ev.fit_selection([a, b, c], labels)
    assert weights[0] == pytest.approx(0.733, abs=0.02) and weights[2] == 0
    for seed in range(5):  # the first round picks the member of the lowest NLL
        members, labels = random_members(seed, count=5, images=50)
        weights = ev.fit_selection(members, labels)
        best = min(ev.negative_log_likelihood(m, labels) for m in members)
        assert ev.negative_log_likelihood(ev.average(members, weights), labels) <= best


def test_temperature_by_hand_and_at_its_ends():
    # Every image scored [0.9, 0.1], three of four right: calibrated means [0.75, 0.25],
    # (0.9 / 0.1) ** (1 / T) = 0.75 / 0.25, so 1 / T = log 3 / log 9 and T = 2.
    probs, labels = np.tile([0.9, 0.1], (4, 1)), np.array([0, 0, 0, 1])
    assert ev.fit_temperature(probs, labels) == pytest.approx(2.0, rel=1e-9)
    np.testing.assert_allclose(ev.with_temperature(probs, 2.0), np.tile([0.75, 0.25], (4, 1)))
    # Scored [0.6, 0.4] and right nine times in ten: sharper, T = log 1.5 / log 9.
    probs, labels = np.tile([0.6, 0.4], (10, 1)), np.array([0] * 9 + [1])
    assert ev.fit_temperature(probs, labels) == pytest.approx(math.log(1.5) / math.log(9))
    # Always right, and sure of it: as sharp as the range allows; the classes stay.
    sure = np.eye(3)[[0, 2, 1]] * 0.98 + 0.01
    assert ev.fit_temperature(sure, np.array([0, 2, 1])) == ev.TEMPERATURE_RANGE[0]
    sharpened = ev.with_temperature(sure, ev.TEMPERATURE_RANGE[0])
    np.testing.assert_array_equal(np.argmax(sharpened, axis=1), [0, 2, 1])
    # Right as often as chance, sure of it anyway: as soft as the range allows.
    assert ev.fit_temperature(sure, np.array([1, 0, 2])) == ev.TEMPERATURE_RANGE[1]


def test_temperature_undoes_over_and_underconfidence():
    rng = np.random.default_rng(0)
    logits = 2 * rng.normal(size=(5000, 10))
    labels = np.array([rng.choice(10, p=p) for p in ev.softmax(logits)])  # calibrated
    for scale in (3.0, 1.0, 0.5):  # logits 3x too sure, as they are, half as sure
        probs = ev.softmax(scale * logits)
        temperature = ev.fit_temperature(probs, labels)
        assert temperature == pytest.approx(scale, rel=0.1)
        scaled = ev.with_temperature(probs, temperature)
        nll = ev.negative_log_likelihood(scaled, labels)
        for other in (1.0, 0.9 * temperature, 1.1 * temperature):  # the minimum
            assert nll <= ev.negative_log_likelihood(ev.with_temperature(probs, other), labels)
        np.testing.assert_array_equal(np.argmax(scaled, axis=1), np.argmax(probs, axis=1))
        np.testing.assert_allclose(scaled.sum(axis=1), 1.0)


def test_temperature_rows_calibrate_each_member_and_each_average_on_validation_only(
    monkeypatch,
):
    names = ("conv_pool_cnn", "all_cnn", "nin_cnn")
    val, val_labels = random_members(2)
    test, test_labels = random_members(3)
    val_probs, test_probs = dict(zip(names, val, strict=True)), dict(zip(names, test, strict=True))
    seen = []
    original = ev.fit_temperature
    monkeypatch.setattr(
        ev, "fit_temperature", lambda p, labels: seen.append((p, labels)) or original(p, labels)
    )
    rows = table_rows(names, ("temperature",), test_probs, val_probs, val_labels, test_labels)
    calibrated = rows[7:]
    # Members alone too: comparing NLL is only fair between calibrated models.
    assert [r["row"] for r in calibrated] == [f"{r['row']} (temperature)" for r in rows[:7]]
    assert len(seen) == 7 and all(labels is val_labels for _, labels in seen)
    for row, (probs, _) in zip(calibrated, seen, strict=True):
        np.testing.assert_allclose(probs, np.mean([val_probs[m] for m in row["members"]], 0))
        assert row["temperature"] == pytest.approx(original(probs, val_labels), abs=1e-4)
    for plain, row in zip(rows[:7], calibrated, strict=True):  # the same classes
        assert row["test_error"] == plain["test_error"]
        expected = ev.with_temperature(np.mean([test_probs[m] for m in row["members"]], 0),
                                       row["temperature"])  # fmt: skip
        assert row["nll"] == pytest.approx(ev.negative_log_likelihood(expected, test_labels),
                                           abs=1e-4)  # fmt: skip


def test_stacking_learns_from_validation_only():
    members, labels = random_members(1)
    members[0] = 0.5 * np.eye(10)[labels] + 0.5 * members[0]
    stacker = ev.fit_stacking(members, labels)
    stacked = ev.apply_stacking(stacker, members)
    np.testing.assert_allclose(stacked.sum(axis=1), 1.0, rtol=1e-6)
    assert ev.error_rate(stacked, labels) < ev.error_rate(ev.average(members), labels) + 0.05


def test_table_rows_fit_rules_on_validation_and_never_see_the_test_set(monkeypatch):
    names = ("conv_pool_cnn", "all_cnn", "nin_cnn")
    val, val_labels = random_members(2)
    test, test_labels = random_members(3)
    val_probs, test_probs = dict(zip(names, val, strict=True)), dict(zip(names, test, strict=True))
    seen = []
    for fit in ("fit_weights", "fit_selection", "fit_stacking"):
        original = getattr(ev, fit)
        monkeypatch.setattr(
            ev,
            fit,
            lambda probs, labels, _f=original: seen.append((probs, labels)) or _f(probs, labels),
        )
    rows = table_rows(
        names,
        ("average", "weighted", "select", "vote", "stack", "temperature"),
        test_probs,
        val_probs,
        val_labels,
        test_labels,
    )
    assert len(seen) == 12  # 4 subsets x 3 fitted rules
    for probs, labels in seen:
        assert labels is val_labels
        assert all(any(p is v for v in val) for p in probs)
        assert not any(any(p is t for t in test) for p in probs)
    # The article's 7 rows first, under its names; then 4 rows per other rule.
    assert [r["row"] for r in rows[:7]] == [row for row, _ in ARTICLE_ROWS]
    assert len(rows) == 7 + 4 * 4 + 7  # temperature scores each member alone too
    assert rows[7]["row"] == "ensemble of three (weighted)"
    assert sum(rows[7]["weights"]) == pytest.approx(1.0, abs=1e-5)
    assert rows[11]["row"] == "ensemble of three (select)"
    assert rows[11]["weights"] == pytest.approx(ev.fit_selection(val, val_labels), abs=1e-6)
    # Average rows agree with the article's ensemble: the mean of member outputs.
    expected = ev.error_rate(np.mean(test, axis=0), test_labels)
    assert rows[3]["test_error"] == pytest.approx(expected)


def test_subsets_are_generic_in_the_number_of_members():
    assert len(ev.subsets(["a", "b", "c", "d"])) == 15
    assert ev.subsets(["a", "b"]) == [("a",), ("b",), ("a", "b")]
    assert len(ev.subsets(list("abcdef"))) == 63  # every one, up to EVERY_SUBSET_UP_TO


def test_beyond_six_members_each_all_but_each_and_all_are_scored():
    names = list("abcdefg")
    chosen = ev.subsets(names)
    assert chosen[:7] == [(n,) for n in names]
    assert chosen[7:14] == [tuple(n for n in names if n != out) for out in reversed(names)]
    assert chosen[14:] == [tuple(names)]
    assert len(ev.subsets(names, every=True)) == 127
    assert ev.subsets(["a"], every=False) == [("a",)]


def test_members_named_in_another_order_still_give_each_row_once():
    names = ("nin_cnn", "all_cnn")  # --models nin_cnn all_cnn
    test, test_labels = random_members(3)
    test_probs = {"nin_cnn": test[2], "all_cnn": test[1]}
    rows = table_rows(names, ("average",), test_probs, {}, None, test_labels)
    assert [r["row"] for r in rows] == ["ALL-CNN-C", "NIN", "pair C"]
