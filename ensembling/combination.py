"""Scoring ensembles from cached member probabilities: metrics and combination rules.

Pure NumPy, no Keras: every member predicts the validation and test images once,
and every subset of members under every rule is scored from those arrays.

Rules (`--combine`):
    average   the article's: mean of the members' softmax outputs
    weighted  a weighted mean, weights >= 0 summing to 1, fitted on the validation
              split to minimise its negative log-likelihood
    select    Caruana et al.'s ensemble selection: members added one at a time, with
              replacement, each time the one that most lowers the validation NLL of
              the average; weights are each member's share of the best such bag,
              so the members it never picks are left out (of an exported file too)
    vote      majority of the members' predicted classes, ties broken by the mean
              probability; it yields classes, not probabilities
    stack     multinomial logistic regression on the members' concatenated
              probabilities, fitted on the validation split
    temperature
              the average, its confidence set by one temperature fitted on the
              validation split (Guo et al., 2017): the same classes, calibrated
              probabilities; fitted after averaging, not member by member (Rahaman
              and Thiery, 2021);
              scored for each member alone too, as comparing NLL is only fair
              between calibrated models (Ashukha et al., 2020)

Nothing is ever fitted on the test set: fitting functions only take validation data.
"""

import itertools
import math

import numpy as np

RULES = ("average", "weighted", "select", "vote", "stack", "temperature")
FITTED_RULES = ("weighted", "select", "stack", "temperature")  # fitted on validation images
# Rules that change even one model's output; under the others a model alone is itself.
ONE_MODEL_RULES = ("average", "temperature")
ECE_BINS = 15
_EPS = 1e-12


# --------------------------------------------------------------------------- metrics


def error_rate(probs, labels):
    return float(np.mean(np.argmax(probs, axis=1) != labels))


def negative_log_likelihood(probs, labels):
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], _EPS, 1.0))))


def expected_calibration_error(probs, labels, bins=ECE_BINS):
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by size."""
    confidence = np.max(probs, axis=1)
    correct = np.argmax(probs, axis=1) == labels
    # Bin k holds confidences in (k/bins, (k+1)/bins]; a confidence of 0 joins bin 0.
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for k in range(bins):
        members = index == k
        if members.any():
            total += members.sum() * abs(correct[members].mean() - confidence[members].mean())
    return float(total / len(labels))


def per_class_error(probs, labels, num_classes):
    """The error on each class's images, class by class (None for a class with none)."""
    predicted = np.argmax(probs, axis=1)
    return [
        float(np.mean(predicted[labels == k] != k)) if np.any(labels == k) else None
        for k in range(num_classes)
    ]


def brier_score(probs, labels):
    """Mean over images of the squared distance to the one-hot label (0 best, 2 worst)."""
    one_hot = np.eye(probs.shape[1])[labels]
    return float(np.mean(np.sum((probs - one_hot) ** 2, axis=1)))


def disagreement(member_probs):
    """Mean, over member pairs, of the fraction of images they classify differently."""
    predictions = [np.argmax(p, axis=1) for p in member_probs]
    pairs = list(itertools.combinations(predictions, 2))
    return float(np.mean([np.mean(a != b) for a, b in pairs])) if pairs else 0.0


def oracle_error(member_probs, labels):
    """Fraction of images that no member classifies correctly."""
    right = np.any([np.argmax(p, axis=1) == labels for p in member_probs], axis=0)
    return float(1.0 - np.mean(right))


def mcnemar_p(correct_a, correct_b):
    """Two-sided exact McNemar test of two classifiers on the same images.

    Only the images exactly one of them gets right count: if both were equally
    accurate, each such image would be a fair coin. Returns the chance of a split
    at least as uneven as the one seen (1 when they never disagree).
    """
    a_only = int(np.sum(correct_a & ~correct_b))
    b_only = int(np.sum(~correct_a & correct_b))
    n, k = a_only + b_only, min(a_only, b_only)
    if n == 0:
        return 1.0
    return min(1.0, 2 * binomial_tail(n, n - k, 0.5))  # P(X <= k) = P(X >= n - k) at 1/2


def binomial_tail(n, k, p):
    """P(X >= k) for X ~ Binomial(n, p), summed in log space: n reaches thousands."""
    if k <= 0 or p >= 1:
        return 1.0
    if k > n or p <= 0:
        return 0.0
    logs = np.array(
        [
            math.lgamma(n + 1)
            - math.lgamma(i + 1)
            - math.lgamma(n - i + 1)
            + i * math.log(p)
            + (n - i) * math.log1p(-p)
            for i in range(k, n + 1)
        ]
    )
    top = logs.max()
    return float(min(1.0, math.exp(top) * np.sum(np.exp(logs - top))))


def at_chance(probs, labels, level=0.01):
    """Whether a classifier is no better than guessing: its right answers are not
    significantly more (one-sided binomial test at `level`) than answering every
    image with the commonest class would give."""
    right = int(np.sum(np.argmax(probs, axis=1) == labels))
    commonest = np.bincount(labels).max() / len(labels)
    return binomial_tail(len(labels), right, commonest) >= level


def row_metrics(combined, member_probs, labels):
    """Every metric of one table row; `combined` is probabilities, or classes for votes."""
    if combined.ndim == 1:  # a vote gives classes only
        metrics = {"test_error": float(np.mean(combined != labels))}
        metrics.update(nll=None, ece=None, brier=None)
    else:
        metrics = {
            "test_error": error_rate(combined, labels),
            "nll": negative_log_likelihood(combined, labels),
            "ece": expected_calibration_error(combined, labels),
            "brier": brier_score(combined, labels),
        }
    if len(member_probs) > 1:
        errors = [error_rate(p, labels) for p in member_probs]
        best = member_probs[int(np.argmin(errors))]
        predicted = combined if combined.ndim == 1 else np.argmax(combined, axis=1)
        metrics["disagreement"] = disagreement(member_probs)
        metrics["oracle_error"] = oracle_error(member_probs, labels)
        metrics["gain"] = min(errors) - metrics["test_error"]
        metrics["gain_p"] = mcnemar_p(predicted == labels, np.argmax(best, axis=1) == labels)
    return metrics


# --------------------------------------------------------------------------- rules


def average(member_probs, weights=None):
    weights = np.full(len(member_probs), 1 / len(member_probs)) if weights is None else weights
    return np.tensordot(np.asarray(weights), np.asarray(member_probs), axes=1)


def vote(member_probs):
    """Majority class per image; among tied classes the highest mean probability wins."""
    stacked = np.asarray(member_probs)
    counts = np.zeros(stacked.shape[1:])
    for probs in stacked:
        counts[np.arange(len(probs)), np.argmax(probs, axis=1)] += 1
    tied = counts == counts.max(axis=1, keepdims=True)
    return np.argmax(np.where(tied, stacked.mean(axis=0), -1.0), axis=1)


def fit_weights(val_member_probs, val_labels, steps=500, learning_rate=0.1):
    """Non-negative weights summing to one that minimise validation NLL.

    Gradient descent on softmax-parametrised weights from equal weights; the best
    weights seen are returned, so they are never worse than equal weights on the
    data they were fitted on.
    """
    probs_of_label = np.asarray(val_member_probs)[:, np.arange(len(val_labels)), val_labels]
    logits = np.zeros(len(val_member_probs))
    best_weights, best_nll = None, np.inf
    for _ in range(steps + 1):
        weights = np.exp(logits - logits.max())
        weights /= weights.sum()
        mixture = np.clip(weights @ probs_of_label, _EPS, None)
        nll = -np.mean(np.log(mixture))
        if nll < best_nll:
            best_weights, best_nll = weights, nll
        grad_weights = -np.mean(probs_of_label / mixture, axis=1)
        grad_logits = weights * (grad_weights - weights @ grad_weights)  # softmax Jacobian
        logits -= learning_rate * grad_logits / (np.abs(grad_logits).max() + _EPS)
    return best_weights


# auto-sklearn's default bag size: each weight is a whole number of picks over the
# kept bag's size, 50 at most.
SELECTION_ROUNDS = 50


def fit_selection(val_member_probs, val_labels, rounds=SELECTION_ROUNDS):
    """Weights by greedy ensemble selection (Caruana et al., ICML 2004).

    From an empty bag, each round adds the member (again, if it is already in)
    whose addition gives the bag's average the lowest validation NLL; the bag that
    scored best over all rounds is kept, the smallest on ties, as the paper keeps it
    (auto-sklearn keeps the last, with ties drawn at random). Each member's weight
    is its share of that bag: a member never picked weighs 0. Unlike `fit_weights`,
    this leaves members out, and an exported file holds only those picked.
    """
    probs_of_label = np.asarray(val_member_probs)[:, np.arange(len(val_labels)), val_labels]
    counts = np.zeros(len(val_member_probs), dtype=int)
    bag_sum = np.zeros(len(val_labels))  # the bag's summed probability of each label
    best_counts, best_nll = None, np.inf
    for size in range(1, rounds + 1):
        candidates = (bag_sum + probs_of_label) / size  # the average with each one added
        nlls = -np.mean(np.log(np.clip(candidates, _EPS, None)), axis=1)
        pick = int(np.argmin(nlls))  # the first on ties: the same members, the same bag
        counts[pick] += 1
        bag_sum += probs_of_label[pick]
        if nlls[pick] < best_nll:
            best_counts, best_nll = counts.copy(), nlls[pick]
    return best_counts / best_counts.sum()


WEIGHTING_RULES = ("weighted", "select")  # rules that weigh the members' average


def fit_rule_weights(rule, val_member_probs, val_labels):
    """The weights of a `WEIGHTING_RULES` rule, fitted on the validation images."""
    fit = fit_weights if rule == "weighted" else fit_selection
    return fit(val_member_probs, val_labels)


def fit_stacking(val_member_probs, val_labels, steps=300, l2=1e-3, learning_rate=0.05):
    """A multinomial logistic regression on concatenated member probabilities (Adam)."""
    features = np.concatenate(val_member_probs, axis=1)
    num_classes = val_member_probs[0].shape[1]
    one_hot = np.eye(num_classes)[val_labels]
    params = [np.zeros((features.shape[1], num_classes)), np.zeros(num_classes)]
    moments = [[np.zeros_like(p), np.zeros_like(p)] for p in params]
    for step in range(1, steps + 1):
        probs = softmax(features @ params[0] + params[1])
        delta = (probs - one_hot) / len(val_labels)
        grads = [features.T @ delta + l2 * params[0], delta.sum(axis=0)]
        for param, grad, (m, v) in zip(params, grads, moments, strict=True):
            m[:] = 0.9 * m + 0.1 * grad
            v[:] = 0.999 * v + 0.001 * grad**2
            m_hat, v_hat = m / (1 - 0.9**step), v / (1 - 0.999**step)
            param -= learning_rate * m_hat / (np.sqrt(v_hat) + 1e-8)
    return {"kernel": params[0], "bias": params[1]}


def apply_stacking(stacker, member_probs):
    return softmax(np.concatenate(member_probs, axis=1) @ stacker["kernel"] + stacker["bias"])


# Where the fitted temperature may lie: 100 times softer or sharper than the average.
TEMPERATURE_RANGE = (0.01, 100.0)


def fit_temperature(val_probs, val_labels, steps=50):
    """The temperature T at which `with_temperature(val_probs, T)` has the lowest NLL.

    Temperature scaling (Guo et al., ICML 2017) on probabilities: softmax(log(p) / T),
    that is p ** (1 / T) renormalised, so T > 1 softens overconfident outputs and
    T < 1 sharpens underconfident ones (an average of members, or label smoothing),
    and the predicted class never changes. The NLL is convex in b = 1 / T: its slope
    is the mean over images of E[log p] under the scaled output less log p of the
    label, its curvature the variance of log p there. Newton's steps from b = 1 find
    the minimum in a few, each kept inside the bracket of the slope's sign change (or
    replaced by halving it, in log space) within `TEMPERATURE_RANGE`, whose ends are
    returned when the minimum lies beyond them.
    """
    logs = _logs(val_probs)
    of_label = np.mean(logs[np.arange(len(val_labels)), val_labels])

    def slope_and_curvature(inverse):  # of the NLL, in b = 1 / T
        scaled = softmax(logs * inverse)
        mean = np.sum(scaled * logs, axis=1)
        variance = np.sum(scaled * logs**2, axis=1) - mean**2
        return float(np.mean(mean) - of_label), float(np.mean(variance))

    low, high = 1 / TEMPERATURE_RANGE[1], 1 / TEMPERATURE_RANGE[0]
    if slope_and_curvature(low)[0] >= 0:
        return TEMPERATURE_RANGE[1]
    if slope_and_curvature(high)[0] <= 0:
        return TEMPERATURE_RANGE[0]
    inverse = 1.0
    for _ in range(steps):
        slope, curvature = slope_and_curvature(inverse)
        low, high = (inverse, high) if slope < 0 else (low, inverse)
        step = inverse - slope / curvature if curvature > 0 else low
        if not low < step < high:
            step = math.sqrt(low * high)
        done = abs(step - inverse) <= 1e-12 * inverse
        inverse = step
        if done:
            break
    return float(1 / inverse)


def with_temperature(probs, temperature):
    """softmax(log(probs) / temperature): `probs` made softer (T > 1) or sharper."""
    return softmax(_logs(probs) / temperature)


def _logs(probs):
    """log(probs) in float64, a probability of 0 (float32's softmax gives them) as 1e-12."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0))


def softmax(logits):
    """Each row of `logits` as probabilities (shifted by its maximum: no overflow)."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------- the table


def repeated(names):
    """The first of `names` (in sorted order) given more than once, or None: members
    are keyed by name, so two of one name would be scored as one."""
    return min((name for name in names if names.count(name) > 1), default=None)


# Every subset of 6 members is 63 subsets, scored under all six rules in 59 s on
# 10,000 images; of 8, 255 subsets in 286 s, against 14.7 s for each member, all but
# each and all (`python bench/bench_subsets.py`, a 2-core VM). Each member more
# doubles the time, and no one reads a thousand rows.
EVERY_SUBSET_UP_TO = 6


def subsets(names, every=None):
    """The member subsets to score, singles first, in the order given.

    Every non-empty subset of up to `EVERY_SUBSET_UP_TO` members (or if `every`);
    beyond, each member, all but each one (what each adds), and all of them.
    """
    if every is None:
        every = len(names) <= EVERY_SUBSET_UP_TO
    if every:
        sizes = range(1, len(names) + 1)
    else:
        sizes = sorted({1, len(names) - 1, len(names)} - {0})
    return [c for size in sizes for c in itertools.combinations(names, size)]


def combine(rule, names, test_probs, val_probs, val_labels):
    """(combined test output, fitted parameters) for `names` under `rule`."""
    test = [test_probs[n] for n in names]
    if rule == "temperature":  # one model alone is calibrated too
        temperature = fit_temperature(average([val_probs[n] for n in names]), val_labels)
        return with_temperature(average(test), temperature), {"temperature": temperature}
    if rule == "average" or len(names) == 1:
        return average(test), None
    if rule == "vote":
        return vote(test), None
    val = [val_probs[n] for n in names]
    if rule in WEIGHTING_RULES:
        weights = fit_rule_weights(rule, val, val_labels)
        return average(test, weights), {"weights": [round(float(w), 6) for w in weights]}
    if rule == "stack":
        stacker = fit_stacking(val, val_labels)
        return apply_stacking(stacker, test), stacker
    raise ValueError(f"unknown combination rule {rule!r}; choose from {', '.join(RULES)}")
