"""Metrics for generated reports: BLEU-1..4, METEOR, ROUGE-L and CIDEr (pycocoevalcap), and finding F1 from the
rule-based report labeller (:mod:`mmvl.evaluation.labeller`; clinical efficacy in
:mod:`mmvl.evaluation.clinical_efficacy`).

BLEU and ROUGE-L come from pycocoevalcap, the captioning reference implementation (mmvl's own ones agreed with it
to 1e-9 on fixed inputs and were removed). Where one n-gram order has no match anywhere in the corpus, its
1e-15 division guard leaves a small positive BLEU (up to ~0.03 when no hypothesis is n words long) instead of 0.

Tokenizers: ``"simple"`` keeps lower-case runs of letters and digits, punctuation dropped, so "2.5 cm;" and a
decoder's "2. 5 cm ;" give the same tokens; ``"ptb"`` is pycocoevalcap's Stanford PTB tokenizer (as published
captioning scores use), which needs Java, like METEOR.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mmvl.evaluation.labeller import OBSERVATIONS, POSITIVE, UNCERTAIN, label_observations, unreadable

_WORD = re.compile(r"[a-z0-9]+")
TOKENIZERS = ("auto", "ptb", "simple")


def tokenize_report(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@functools.lru_cache(maxsize=1)
def java_problem() -> str | None:
    """Why Java cannot run pycocoevalcap's PTB tokenizer and METEOR here, or None when it can."""
    java = shutil.which("java")
    if java is None:
        return "no 'java' on PATH (METEOR and the PTB tokenizer are Java programs; install a JRE, e.g. openjdk)"
    try:
        result = subprocess.run([java, "-version"], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return f"'{java} -version' failed: {err}"
    if result.returncode != 0:
        return f"'{java} -version' exited with {result.returncode}: {result.stderr.decode(errors='replace')[:200]}"
    return None


def _as_lists(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    out = [[refs] if isinstance(refs, str) else list(refs) for refs in references]
    if any(not refs for refs in out):
        raise ValueError("a hypothesis has no reference")
    return out


def tokenize_corpus(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]],
                    tokenizer: str = "simple") -> tuple[dict[int, list[str]], dict[int, list[str]], str, str | None]:
    """pycocoevalcap inputs ``(res, gts)``: space-joined tokens keyed by row, and the tokenizer used with the reason
    for any fallback. ``"auto"``: PTB where Java runs, else simple; ``"ptb"`` falls back to simple likewise."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    refs = _as_lists(references)
    fallback = None
    if tokenizer != "simple":
        fallback = java_problem()
        if fallback is None:
            from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

            captions = {("hyp", i): [{"caption": text}] for i, text in enumerate(hypotheses)}
            captions.update({("ref", i): [{"caption": text} for text in texts] for i, texts in enumerate(refs)})
            try:
                tokens = PTBTokenizer().tokenize(captions)
            except OSError as err:  # it writes a temporary file beside its jar: a read-only install fails
                fallback = f"PTB tokenizer failed: {err}"
            else:
                if all(len(tokens.get(key, ())) == len(texts) for key, texts in captions.items()):
                    res = {i: tokens[("hyp", i)] for i in range(len(hypotheses))}
                    gts = {i: tokens[("ref", i)] for i in range(len(refs))}
                    return res, gts, "ptb", None
                fallback = "PTB tokenizer returned fewer lines than it was given (did the JVM fail?)"
    res = {i: [" ".join(tokenize_report(text))] for i, text in enumerate(hypotheses)}
    gts = {i: [" ".join(tokenize_report(text)) for text in texts] for i, texts in enumerate(refs)}
    return res, gts, "simple", fallback


def _bleu(res: dict, gts: dict, max_n: int) -> list[float]:
    from pycocoevalcap.bleu.bleu import Bleu

    if not res:
        return [0.0] * max_n
    scores, _ = Bleu(max_n).compute_score(gts, res, verbose=0)
    return [float(score) for score in scores]


def _rouge_l(res: dict, gts: dict, beta: float = 1.2) -> float:
    from pycocoevalcap.rouge.rouge import Rouge

    if not res:
        return 0.0
    scorer = Rouge()
    scorer.beta = beta
    return float(scorer.compute_score(gts, res)[0])


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]],
                max_n: int = 4) -> dict[str, float]:
    """Corpus BLEU-1..``max_n`` (Papineni et al. 2002; pycocoevalcap, simple tokenizer): clipped n-gram precisions
    summed over the corpus, their geometric mean with uniform weights, times the brevity penalty
    ``exp(1 - r / c)`` when the candidate length ``c`` is below the effective reference length ``r`` (per sentence
    the reference length closest to the candidate's, the shorter on ties). No smoothing.

    ``references[i]``: one reference text, or a list of several.
    Returns ``{"bleu1": ..., ..., "bleu{max_n}": ...}`` in [0, 1].
    """
    try:
        res, gts, _, _ = tokenize_corpus(hypotheses, references, "simple")
    except ValueError as err:
        raise ValueError(f"corpus_bleu: {err}") from err
    return {f"bleu{n}": score for n, score in enumerate(_bleu(res, gts, max_n), start=1)}


def rouge_l(hypotheses: Sequence[str], references: Sequence[str], beta: float = 1.2) -> float:
    """Mean sentence ROUGE-L F-measure (Lin 2004; pycocoevalcap, simple tokenizer) from the longest common
    subsequence: ``(1 + beta^2) P R / (R + beta^2 P)`` with ``beta = 1.2`` as in pycocoevalcap."""
    try:
        res, gts, _, _ = tokenize_corpus(hypotheses, references, "simple")
    except ValueError as err:
        raise ValueError(f"rouge_l: {err}") from err
    return _rouge_l(res, gts, beta)


def _meteor(res: dict, gts: dict) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()  # starts a JVM (meteor-1.5.jar, -Xmx2G)
    try:
        return float(scorer.compute_score(gts, res)[0])
    finally:
        # A failed compute_score leaves its lock held, and Meteor.__del__ would then wait on it for ever.
        if scorer.lock.locked():
            scorer.lock.release()


def _cider(res: dict, gts: dict) -> float:
    from pycocoevalcap.cider.cider import Cider

    return float(Cider().compute_score(gts, res)[0])


def caption_metrics(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]],
                    tokenizer: str = "auto", meteor: bool = True) -> dict[str, Any]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr (pycocoevalcap; CIDEr as its ``Cider``: tf-idf n-gram cosine, 1-4 grams,
    x10, with a Gaussian length penalty, idf from these references) over paired hypotheses and references.

    ``tokenizer``: ``"auto"`` (PTB where Java runs, else simple), ``"ptb"`` or ``"simple"``; the result names the
    one used (``tokenizer``) and why it fell back (``tokenizer_note``). METEOR needs Java: without it, or with
    ``meteor=False``, ``meteor`` is None and ``unavailable["meteor"]`` says why.
    """
    res, gts, used, fallback = tokenize_corpus(hypotheses, references, tokenizer)
    out: dict[str, Any] = {"n": len(res), "tokenizer": used}
    if fallback and tokenizer != "simple":
        out["tokenizer_note"] = f"simple tokenizer used: {fallback}"
    out.update({f"bleu{n}": score for n, score in enumerate(_bleu(res, gts, 4), start=1)})
    unavailable: dict[str, str] = {}
    out["meteor"] = None
    if not meteor:
        unavailable["meteor"] = "not requested"
    elif not res:
        unavailable["meteor"] = "no reports"
    elif problem := java_problem():
        unavailable["meteor"] = problem
    else:
        try:
            out["meteor"] = _meteor(res, gts)
        except (OSError, ValueError) as err:  # the JVM did not start or answered nothing (e.g. out of memory)
            unavailable["meteor"] = f"METEOR failed: {err}"
    out["rouge_l"] = _rouge_l(res, gts)
    if any(text for texts in gts.values() for text in texts):
        out["cider"] = _cider(res, gts)
    else:
        out["cider"] = None
        unavailable["cider"] = "every reference is empty after tokenization"
    if unavailable:
        out["unavailable"] = unavailable
    return out


# ---------------------------------------------------------------------------------------------------------
# Finding labels read from report text (mmvl.evaluation.labeller)
# ---------------------------------------------------------------------------------------------------------

UNCERTAIN_POLICIES = ("positive", "negative")


def binary_label(value: int | None, uncertain: str = "positive") -> int:
    """1 for a positive reading, 0 for negative or not mentioned, and for an uncertain one 1 (``"positive"``, the
    policy of the clinical-efficacy papers: R2Gen, CXRMate, LLaVA-Rad) or 0 (``"negative"``)."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain must be one of {UNCERTAIN_POLICIES}, got {uncertain!r}")
    if value == UNCERTAIN:
        return int(uncertain == "positive")
    return int(value == POSITIVE)


def label_report(text: str, findings: Iterable[str] | None = None, uncertain: str = "positive") -> dict[str, int]:
    """``{finding: 1}`` when the report affirms the finding (:func:`mmvl.evaluation.labeller.label_observations`:
    a positive mention, or an uncertain one under ``uncertain="positive"``), else 0 (negated, as in "no pleural
    effusion or pneumothorax" / "clear of ... effusion" / "effusion has resolved", or not mentioned).

    ``findings``: label names as manifests spell them ("pleural effusion", "nodule", "Lung Opacity"; default the
    labeller's observations in lower case), keys of the result; a name it has no rules for is a ValueError.
    """
    names = [name.lower() for name in OBSERVATIONS] if findings is None else list(findings)
    missing = unreadable(names)
    if missing:
        raise ValueError(f"label_report: no rules for {missing}; known findings: {[n.lower() for n in OBSERVATIONS]}")
    return {name: binary_label(value, uncertain) for name, value in label_observations(text, names).items()}


def _canonical(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


def truth_labels(labels: Mapping[str, Any] | None) -> dict[str, int]:
    """Manifest labels with a known value, names lower-cased with spaces for underscores; unknown values (None,
    -1, NaN) are left out. Names the labeller cannot read are kept (:func:`finding_f1` names them)."""
    out = {}
    for name, value in (labels or {}).items():
        if value is not None and value == value and int(value) in (0, 1):
            out[_canonical(name)] = int(value)
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
    uncertain: str = "positive",
) -> dict[str, Any]:
    """Per-finding and micro precision/recall/F1 of the findings :func:`label_report` reads in ``generated``
    against the true ``labels``, and the same for two constant baselines: the majority class, each finding
    predicted as its most common value in ``reference_labels`` (e.g. the training labels; default ``labels``
    themselves), which scores 0 for any finding present in under half of the studies; and every finding
    predicted present, whose F1 is ``2p / (1 + p)`` at prevalence ``p`` (the best constant F1).

    ``labels`` lists every label name with a known value; ``findings`` those scored, ``unreadable`` those the
    labeller has no rules for (not scored, never silently dropped). ``uncertain`` maps an uncertain reading.
    """
    if len(generated) != len(labels):
        raise ValueError(f"finding_f1: {len(generated)} reports but {len(labels)} label sets")
    truth = [truth_labels(row) for row in labels]
    names = list(dict.fromkeys(name for row in truth for name in row))
    missing = unreadable(names)
    findings = [name for name in names if name not in missing]
    predicted = [label_report(text, findings, uncertain) for text in generated]
    reference = truth if reference_labels is None else [truth_labels(row) for row in reference_labels]
    majority = {}
    for name in findings:
        values = [row[name] for row in reference if name in row]
        majority[name] = int(2 * sum(values) > len(values)) if values else 0
    return {
        "labels": names,
        "findings": findings,
        "unreadable": missing,
        "uncertain_policy": uncertain,
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
