"""Metrics for generated reports: corpus BLEU-1..4, ROUGE-L, and finding F1 from a keyword labeller with negation.

Text is compared as lower-case runs of letters and digits, punctuation dropped (as the PTB tokenizer of
pycocoevalcap does for captioning metrics), so "2.5 cm;" and a decoder's "2. 5 cm ;" give the same tokens.
Written with the standard library: no BLEU/ROUGE package is a dependency of mmvl.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_WORD = re.compile(r"[a-z0-9]+")


def tokenize_report(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]],
                max_n: int = 4) -> dict[str, float]:
    """Corpus BLEU-1..``max_n`` (Papineni et al. 2002): clipped n-gram precisions summed over the corpus, their
    geometric mean with uniform weights, times the brevity penalty ``exp(1 - r / c)`` when the candidate length
    ``c`` is below the effective reference length ``r`` (per sentence the reference length closest to the
    candidate's, the shorter on ties). No smoothing: a corpus without a matching n-gram scores 0 for that order.

    ``references[i]``: one reference text, or a list of several.
    Returns ``{"bleu1": ..., ..., "bleu{max_n}": ...}`` in [0, 1].
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"corpus_bleu: {len(hypotheses)} hypotheses but {len(references)} references")
    matches, totals = [0] * max_n, [0] * max_n
    hyp_length = ref_length = 0
    for hypothesis, refs in zip(hypotheses, references):
        hyp = tokenize_report(hypothesis)
        ref_tokens = [tokenize_report(ref) for ref in ([refs] if isinstance(refs, str) else refs)]
        if not ref_tokens:
            raise ValueError("corpus_bleu: a hypothesis has no reference")
        hyp_length += len(hyp)
        ref_length += min((abs(len(ref) - len(hyp)), len(ref)) for ref in ref_tokens)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(hyp, n)
            most: Counter = Counter()
            for ref in ref_tokens:
                most |= _ngrams(ref, n)  # max count of each n-gram over the references
            matches[n - 1] += sum(min(count, most[gram]) for gram, count in counts.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if hyp_length == 0:
        return {f"bleu{n}": 0.0 for n in range(1, max_n + 1)}
    brevity = 1.0 if hyp_length > ref_length else math.exp(1.0 - ref_length / hyp_length)
    scores, log_sum = {}, 0.0
    for n in range(1, max_n + 1):
        if matches[n - 1] == 0:
            log_sum = float("-inf")
        else:
            log_sum += math.log(matches[n - 1] / totals[n - 1])
        scores[f"bleu{n}"] = brevity * math.exp(log_sum / n) if log_sum > float("-inf") else 0.0
    return scores


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(hypotheses: Sequence[str], references: Sequence[str], beta: float = 1.2) -> float:
    """Mean sentence ROUGE-L F-measure (Lin 2004) from the longest common subsequence:
    ``(1 + beta^2) P R / (R + beta^2 P)`` with ``beta = 1.2`` as in pycocoevalcap."""
    if len(hypotheses) != len(references):
        raise ValueError(f"rouge_l: {len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        return 0.0
    total = 0.0
    for hypothesis, reference in zip(hypotheses, references):
        hyp, ref = tokenize_report(hypothesis), tokenize_report(reference)
        common = _lcs_length(hyp, ref)
        if common:
            precision, recall = common / len(hyp), common / len(ref)
            total += (1 + beta**2) * precision * recall / (recall + beta**2 * precision)
    return total / len(hypotheses)


# ---------------------------------------------------------------------------------------------------------
# Keyword finding labeller
# ---------------------------------------------------------------------------------------------------------

# Mentions of each finding, as worded in chest X-ray reports (and in datasets/synthetic.py's templates).
FINDING_PATTERNS: dict[str, tuple[str, ...]] = {
    "pleural effusion": (r"effusions?", r"pleural fluid", r"hydrothora(?:x|ces)"),
    "cardiomegaly": (
        r"cardiomegaly",
        r"(?:heart|cardiac silhouette|cardiac shadow) (?:is|appears) (?:(?!not\b)\w+ )?enlarged",
        r"enlarged (?:heart|cardiac silhouette)",
        r"enlargement of the (?:heart|cardiac silhouette)",
    ),
    "pneumothorax": (r"pneumothora(?:x|ces)", r"pleural air"),
    "nodule": (r"nodules?", r"nodular", r"rounded opacit(?:y|ies)"),
}
# NegEx-style cues (Chapman et al. 2001): before the mention in its clause, or after it.
# ("absent" is no cue before a mention: "absent lung markings ..., consistent with a pneumothorax".)
_NEGATION_BEFORE = re.compile(r"\b(?:no|not|without|negative for|free of|absence of|resolution of|rule out)\b")
_NEGATION_AFTER = re.compile(r"^\W*(?:\w+\W+){0,3}?(?:(?:is|are|was|were) (?:not|no longer)|(?:has |have )?resolved"
                             r"|absent)\b")
# Clauses end at sentence punctuation (not a decimal point) and at words that turn the sentence round or start
# a new statement; a comma does not end one ("no focal consolidation, effusion, or pneumothorax").
_CLAUSE_END = re.compile(r"(?<!\d)[.!?;](?!\d)|\n|\b(?:but|however|although|though|whereas|except|there (?:is|are))\b")
_COMPILED = {name: re.compile(r"\b(?:" + "|".join(patterns) + r")\b") for name, patterns in FINDING_PATTERNS.items()}


def label_report(text: str, findings: Iterable[str] | None = None) -> dict[str, int]:
    """``{finding: 1}`` when the report affirms the finding in at least one clause, else 0 (negated, as in
    "no pleural effusion or pneumothorax" / "without pneumothorax" / "pneumothorax is not seen", or absent)."""
    names = list(FINDING_PATTERNS if findings is None else findings)
    unknown = [name for name in names if name not in _COMPILED]
    if unknown:
        raise ValueError(f"label_report: no keywords for {unknown}; known findings: {sorted(FINDING_PATTERNS)}")
    labels = dict.fromkeys(names, 0)
    for clause in _CLAUSE_END.split(" ".join(text.lower().split())):
        for name in names:
            if labels[name]:
                continue
            for mention in _COMPILED[name].finditer(clause):
                before, after = clause[: mention.start()], clause[mention.end():]
                if not _NEGATION_BEFORE.search(before) and not _NEGATION_AFTER.match(after):
                    labels[name] = 1
                    break
    return labels


def _canonical(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


def truth_labels(labels: Mapping[str, Any] | None) -> dict[str, int]:
    """Manifest labels of the findings the labeller knows (names matched case-insensitively); unknown values
    (None, -1, NaN) are left out."""
    out = {}
    for name, value in (labels or {}).items():
        key = _canonical(name)
        if key in FINDING_PATTERNS and value is not None and value == value and int(value) in (0, 1):
            out[key] = int(value)
    return out


def _f1_table(predicted: Sequence[Mapping[str, int]], truth: Sequence[Mapping[str, int]],
              findings: Sequence[str]) -> dict[str, Any]:
    per_finding, tp_all, fp_all, fn_all = {}, 0, 0, 0
    for name in findings:
        pairs = [(p.get(name, 0), t[name]) for p, t in zip(predicted, truth) if name in t]
        tp = sum(p and t for p, t in pairs)
        fp = sum(p and not t for p, t in pairs)
        fn = sum(t and not p for p, t in pairs)
        per_finding[name] = {**_prf(tp, fp, fn), "support": sum(t for _, t in pairs), "n": len(pairs)}
        tp_all, fp_all, fn_all = tp_all + tp, fp_all + fp, fn_all + fn
    return {"per_finding": per_finding, "micro": _prf(tp_all, fp_all, fn_all)}


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def finding_f1(
    generated: Sequence[str],
    labels: Sequence[Mapping[str, Any] | None],
    reference_labels: Sequence[Mapping[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """Per-finding and micro precision/recall/F1 of the findings :func:`label_report` reads in ``generated``
    against the true ``labels``, and the same for two constant baselines: the majority class, each finding
    predicted as its most common value in ``reference_labels`` (e.g. the training labels; default ``labels``
    themselves), which scores 0 for any finding present in under half of the studies; and every finding
    predicted present, whose F1 is ``2p / (1 + p)`` at prevalence ``p`` (the best constant F1).
    """
    if len(generated) != len(labels):
        raise ValueError(f"finding_f1: {len(generated)} reports but {len(labels)} label sets")
    truth = [truth_labels(row) for row in labels]
    findings = [name for name in FINDING_PATTERNS if any(name in row for row in truth)]
    predicted = [label_report(text, findings) for text in generated]
    reference = truth if reference_labels is None else [truth_labels(row) for row in reference_labels]
    majority = {}
    for name in findings:
        values = [row[name] for row in reference if name in row]
        majority[name] = int(2 * sum(values) > len(values)) if values else 0
    return {
        "findings": findings,
        "model": _f1_table(predicted, truth, findings),
        "majority_baseline": _f1_table([majority] * len(truth), truth, findings),
        "all_positive_baseline": _f1_table([dict.fromkeys(findings, 1)] * len(truth), truth, findings),
        "majority_class": majority,
    }


def report_metrics(
    generated: Sequence[str],
    references: Sequence[str] | None = None,
    labels: Sequence[Mapping[str, Any] | None] | None = None,
    reference_labels: Sequence[Mapping[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """Flat summary: ``bleu1..4`` and ``rouge_l`` when ``references`` are given; ``finding_f1`` (micro),
    ``baseline_f1`` (majority class, micro), ``all_positive_f1`` and ``f1/<finding>`` when ``labels`` are; ``n``
    always."""
    out: dict[str, Any] = {"n": len(generated)}
    if references is not None:
        out.update(corpus_bleu(generated, references))
        out["rouge_l"] = rouge_l(generated, references)
    if labels is not None:
        scores = finding_f1(generated, labels, reference_labels)
        out["finding_f1"] = scores["model"]["micro"]["f1"]
        out["baseline_f1"] = scores["majority_baseline"]["micro"]["f1"]
        out["all_positive_f1"] = scores["all_positive_baseline"]["micro"]["f1"]
        out.update({f"f1/{name}": row["f1"] for name, row in scores["model"]["per_finding"].items()})
    return out
