"""Rule-based radiology report labeller: the 14 CheXpert observations and the CT-RATE findings of mmvl's CT configs,
each read as positive, negative, uncertain or not mentioned (mention, negation and uncertainty rules in the
tradition of the CheXpert labeller, Irvin et al. AAAI 2019, and NegEx, Chapman et al. 2001).

Rules written by hand: medspaCy's ConText (1.3.1, run offline with a blank tokenizer) took 66-110 s for 3,955 reports
on one (loaded) core, and on Python 3.11 pins spaCy < 3.8, hence numpy < 2, which mmvl's environment cannot take.

How a report is read: it is lower-cased and split into sentences (at ``.``, ``;``, ``!``, not at decimal points)
and each sentence into clauses at words that turn it round ("but", "however", "although", "except", "there
is"...). In a clause, every mention of an observation takes the assertion of the nearest cue before it ("no",
"without", "clear of", "no evidence of", "negative for", "resolution of" are negations; "possible", "may",
"likely", "suspicious for", "cannot exclude", "versus", "?" are uncertainty), so a cue covers a list across
commas and "or" ("no focal consolidation, effusion, or pneumothorax") but not past a new predicate ("is",
"are") or a comma that starts a new statement (", stable cardiomegaly"). Without a cue before it, a cue after
it decides ("... is not seen", "has resolved", "cannot be excluded", "versus ..."), and a mention joined to
another by "or" ("atelectasis or pneumonia") is uncertain. Phrases such as "no change in" are not negations.
Stated normals ("heart size is normal") make an observation negative. A report's label per observation is
positive if any mention is, else uncertain if any is, else negative if any is, else not mentioned (CheXpert's
aggregation); No Finding is positive when no pathology (everything but Support Devices) is positive or
uncertain, and not mentioned otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "CHEXPERT_OBSERVATIONS",
    "COMMON_FIVE",
    "CT_FINDINGS",
    "IU_MESH_TERMS",
    "NEGATIVE",
    "NOT_MENTIONED",
    "OBSERVATIONS",
    "POSITIVE",
    "UNCERTAIN",
    "canonical_observation",
    "label_observations",
    "mesh_observations",
    "unreadable",
]

# CheXpert's values: 1 positive, 0 negative, -1 uncertain, blank (None) not mentioned.
POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1
NOT_MENTIONED = None

CHEXPERT_OBSERVATIONS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Lesion",
    "Lung Opacity",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
# CT-RATE abnormalities (Hamamci et al. 2024) that mmvl's CT configs use (datasets/synthetic_ct.py FINDINGS) beyond
# the CheXpert names: lung nodule, pleural effusion, emphysema, cardiomegaly, consolidation.
CT_FINDINGS = ("Emphysema", "Lung Nodule")
OBSERVATIONS = CHEXPERT_OBSERVATIONS + CT_FINDINGS
# The five observations of the CheXpert competition, reported by most clinical-efficacy papers beside the 14.
COMMON_FIVE = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
# Other names for an observation, as manifests spell labels (lower case, spaces for underscores).
ALIASES = {
    "effusion": "Pleural Effusion",
    "nodule": "Lung Nodule",
    "lung nodules": "Lung Nodule",
    "nodules": "Lung Nodule",
    "lesion": "Lung Lesion",
    "opacity": "Lung Opacity",
    "enlarged cardiac silhouette": "Cardiomegaly",
    "support device": "Support Devices",
    "normal": "No Finding",
}
_PATHOLOGIES = tuple(name for name in OBSERVATIONS if name not in ("No Finding", "Support Devices"))


@dataclass(frozen=True)
class _Rules:
    mention: re.Pattern  # a mention of the observation
    normal: re.Pattern | None = None  # a stated normal: the observation is negative


def _words(*patterns: str) -> re.Pattern:
    return re.compile(r"\b(?:" + "|".join(patterns) + r")\b")


_HEART = (r"(?:heart|cardiac (?:silhouette|shadow|size|contours?|diameter)|heart size|heart shadow|"
          r"cardiomediastinal silhouette)")
_NOT_NEGATED = r"(?: (?!not\b|no\b)[a-z]+){0,3}"  # up to three words, none a negation ("is mildly")
_MEDIASTINUM = (r"(?:(?:cardio)?mediastin(?:um|al (?:silhouette|contours?|width|shadow))|"
                r"cardiomediastinal (?:silhouette|contours?)|mediastinal|hila and mediastinum)")
_NODULE = r"nodules?|(?:fibro|reticulo|micro)nodular|nodular (?:[a-z]+ )?(?:densit(?:y|ies)|opacit(?:y|ies)|lesions?)"
RULES: dict[str, _Rules] = {
    "Enlarged Cardiomediastinum": _Rules(
        _words(rf"{_MEDIASTINUM}{_NOT_NEGATED} (?:widen(?:ed|ing)|enlarged|prominent)",
               r"(?:widen(?:ed|ing)|enlarged|prominent) (?:superior |upper )?(?:cardio)?mediastin(?:um|al \w+)",
               r"(?:widening|enlargement|prominence) of the (?:superior |upper )?(?:cardio)?mediastin(?:um|al \w+)",
               r"mediastinal (?:widening|enlargement|prominence|mass|lymphadenopathy)"),
        _words(rf"{_MEDIASTINUM}(?: [a-z]+){{0,4}} "
               r"(?:normal|unremarkable|within normal limits|stable|not (?:widened|enlarged))",
               r"normal (?:cardio)?mediastinal (?:silhouette|contours?)")),
    "Cardiomegaly": _Rules(
        _words(r"cardiomegaly", r"cardiac (?:enlargement|hypertrophy)", r"cardiomyopathy",
               rf"{_HEART}{_NOT_NEGATED} (?:enlarged|increased|large)",
               r"(?:enlarged|large|increased) (?:heart|cardiac silhouette|cardiac shadow|heart size|cardiac size)",
               r"(?:enlarged|large|increased) cardiomediastinal silhouette",
               r"(?:enlargement|increase in (?:the )?size) of the (?:heart|cardiac silhouette|cardiac shadow)",
               r"increase in (?:the )?(?:heart|cardiac) size", rf"{_HEART}(?: (?:is|are|remains))* borderline",
               r"borderline (?:heart size|cardiac size|enlarged)"),
        _words(rf"{_HEART}(?: [a-z]+){{0,4}} (?:normal|within normal limits|not enlarged|unremarkable|stable)",
               r"normal (?:heart|cardiac|cardiomediastinal)(?: size| silhouette| contours?)?",
               rf"{_HEART} and (?:mediastinal|pulmonary vascular|pulmonary) (?:contours?|silhouette|vascularity)"
               r"(?: [a-z]+){0,2} (?:normal|within normal limits|unremarkable)",
               r"(?:cardiomediastinal|cardiac) silhouette(?: [a-z]+){0,4} "
               r"(?:normal|within normal limits|unremarkable)")),
    "Lung Lesion": _Rules(_words(_NODULE, r"(?<!soft tissue )mass(?:es)?(?! effect)", r"mass-?like",
                                 r"(?:lung|pulmonary|cavitary) lesions?",
                                 r"tumou?rs?", r"carcinoma", r"neoplasms?", r"metastas[ie]s", r"metastatic disease")),
    "Lung Opacity": _Rules(
        _words(r"opacit(?:y|ies)", r"opacification", r"air ?-?space (?:disease|opacit(?:y|ies)|process)",
               r"infiltrat(?:e|es|ion|ive)", r"(?:lung|pulmonary|parenchymal) densit(?:y|ies)",
               r"interstitial (?:markings?|pattern|prominence|thickening|disease|lung disease)",
               r"reticul(?:ar|ation|onodular)", r"hazy", r"haziness"),
        _words(r"lungs? (?:are |is |remain |appear )?(?:otherwise )?clear(?! of)", r"clear lungs?")),
    "Edema": _Rules(_words(r"(?<!soft tissue )edema", r"(?:vascular|pulmonary|venous) congestion",
                           r"congestive (?:heart )?failure", r"chf",
                           r"(?:pulmonary )?vascular (?:engorgement|prominence)",
                           r"cephalization", r"kerley b?\s?lines")),
    "Consolidation": _Rules(_words(r"consolidat(?:ion|ions|ive|ed)")),
    "Pneumonia": _Rules(_words(r"pneumonias?", r"pneumonitis", r"infectious (?:process|disease|infiltrate)",
                               r"(?<!granulomatous )(?:lung |pulmonary |superimposed )?infection",
                               r"bronchopneumonia")),
    "Atelectasis": _Rules(_words(r"atelecta(?:sis|ses|tic)", r"(?:lung|lobar|lobe) collapse",
                                 r"collapse of the (?:left |right )?(?:lung|(?:\w+ ){0,2}lobe)")),
    "Pneumothorax": _Rules(_words(r"(?:hydro)?pneumothora(?:x|ces)", r"pleural air")),
    "Pleural Effusion": _Rules(_words(r"(?<!pericardial )effusions?", r"pleural fluid", r"hydrothora(?:x|ces)",
                                      r"hydropneumothora(?:x|ces)")),
    "Pleural Other": _Rules(_words(r"pleural (?:thickening|plaques?|scar(?:ring)?|calcifications?|fibrosis)",
                                   r"thicken(?:ed|ing) (?:of the )?pleura", r"fibrothorax",
                                   r"pleuro-?parenchymal (?:scar(?:ring)?|thickening|opacit(?:y|ies))",
                                   r"(?:apical )?pleural cap(?:ping)?")),
    "Fracture": _Rules(_words(r"fractures?", r"fractured", r"broken ribs?")),
    "Support Devices": _Rules(
        _words(r"(?:endotracheal|et|nasogastric|ng|og|feeding|chest|enteric|tracheostomy|dobhoff|gastric|"
               r"thoracostomy) tubes?", r"catheters?", r"picc", r"(?:central venous|central|picc|midline|"
               r"swan[- ]ganz|jugular|subclavian|ij) lines?", r"pacemakers?", r"pacers?", r"aicd", r"icd",
               r"defibrillators?", r"port-?a-?cath", r"(?:chest|power|infusion|venous|mediport) port",
               r"(?:pacing|pacer|pacemaker|defibrillator) (?:wires?|leads?)", r"stents?", r"drains?",
               r"tracheostomy", r"(?:valve|mitral|aortic) (?:replacement|prosthesis)", r"prosthetic valves?",
               r"balloon pump", r"iabp", r"lvad", r"loop recorder", r"(?:gastrostomy|g|j) tubes?",
               r"(?:monitor|monitoring|ecg|ekg|telemetry) leads", r"prosthetic (?:\w+ )?valves?",
               r"(?:pacemaker|pacer|defibrillator|cardiac) generator")),
    "Emphysema": _Rules(_words(r"(?<!subcutaneous )(?<!soft tissue )emphysema(?:tous)?", r"bullae", r"bullous")),
    "Lung Nodule": _Rules(_words(_NODULE)),
}

# Sentences end at . ; ! (not a decimal point) and at line breaks; "?" is a cue, not an end.
_SENTENCE = re.compile(r"(?<!\d)[.;!](?!\d)|\n")
# Clauses end at words that turn the sentence round or start a new statement.
_CLAUSE = re.compile(r"\b(?:but|however|although|though|whereas|except|aside from|apart from|otherwise|which|"
                     r"there (?:is|are|has been|have been))\b")
# Phrases that look like negation but are not ("no change in the effusion", "not significantly changed").
_PSEUDO = re.compile(r"\b(?:no|without|not) (?:significant |interval |appreciable |substantial |definite |"
                     r"significantly |much |other )*(?:change|changed|increase|increased|decrease|decreased|"
                     r"improvement|worsening|enlargement in size|difference|progression)\b|\bnot only\b|"
                     r"\bno longer (?:increased|enlarged)\b|\bto (?:suggest|indicate)\b")
# Cues before a mention; uncertainty alternatives first so that "cannot exclude" is not read as "not". ("absent" is
# no cue before a mention: "absent lung markings, consistent with a pneumothorax".)
_CUE_BEFORE = re.compile(
    r"(?P<ignore>\b(?:evaluation (?:for|of)|evaluate for|assess(?:ment)? for|limited for|assessment of|"
    r"obscur\w*|to (?:identify|exclude|evaluate|assess))\b)"
    r"|(?P<uncertain>\b(?:can ?not|could not|cant|can't) (?:be )?(?:entirely |completely |totally )?"
    r"(?:exclude|excluded|rule out|ruled out)|\bnot (?:be )?(?:excluded|ruled out)|\b(?:possible|possibly|"
    r"probable|probably|likely|may|might|could|questionable|question of|questioned|suspicious for|suspected|suspect|"
    r"suspicion|concern|concerning|suggest|suggests|suggestive|suggesting|differential|versus|vs|borderline|"
    r"equivocal|presumed|presumably|perhaps|rule out|r/o|worrisome|represent|represents|representing|"
    r"indeterminate)\b|\?)"
    r"|(?P<negative>\b(?:no|not|without|negative for|free of|clear of|absence of|resolution of|"
    r"resolved|removal of|removed|rather than|neither|nor|nor is|never|lack of|no evidence of|no signs? of|"
    r"excluded|ruled out|exclude|resolving of)\b)")
# What ends a cue's reach inside a clause: a new predicate, or a comma that starts a new statement.
_SCOPE_BREAK = re.compile(
    r"\b(?:is|are|was|were|has|have|had|shows?|demonstrates?|measur\w+|projects?|overlies|seen|noted|"
    r"identified|present)\b|,\s*(?:the|a|an|stable|unchanged|persistent|again|increased|decreased|heart|"
    r"cardiac|lungs?|calcified|old|healed|chronic|degenerative|status)\b")
_NEGATIVE_AFTER = re.compile(
    r"\b(?:(?:is|are|was|were|has been|have been) (?:not|no longer)\b|not (?:seen|identified|present|visualized|"
    r"appreciated|demonstrated|evident|noted|detected)|no longer\b|(?:(?:has|have|had) (?:since )?(?:been )?|"
    r"(?:is|are|was|were) (?:now )?)?(?:resolved|cleared|absent|removed|excluded|ruled out)\b)")
_UNCERTAIN_AFTER = re.compile(
    r"\b(?:(?:can ?not|could not|cant|can't|may not) (?:be )?(?:entirely |completely |totally )?"
    r"(?:excluded|ruled out|exclude)|not (?:be )?(?:entirely |completely )?(?:excluded|ruled out)|"
    r"(?:is|are|was|were) (?:possible|possibly|suspected|questioned|likely|favored|questionable|"
    r"not excluded|a consideration|considered)|versus|vs|may (?:be|represent)|could (?:be|represent)|"
    r"is (?:not )?(?:entirely )?excluded\?)\b|\?")
_OR_BEFORE = re.compile(r"\b(?:or|and/or)\s+(?:\w+\s+){0,2}$")
_OR_AFTER = re.compile(r"^\s*,?\s*(?:or|and/or)\b")
_AFTER_WINDOW = 6  # words between a mention and a cue after it ("effusion, pneumothorax or edema are not seen")


def canonical_observation(name: str) -> str | None:
    """The observation a label name means ("pleural_effusion", "Effusion", "nodule" ...), or None when the
    labeller has no rules for it."""
    key = " ".join(name.lower().replace("_", " ").split())
    for observation in OBSERVATIONS:
        if observation.lower() == key:
            return observation
    return ALIASES.get(key)


def unreadable(names: Iterable[str]) -> list[str]:
    """The names in ``names`` the labeller cannot read (no rules for them), in order."""
    return [name for name in names if canonical_observation(name) is None]


def _assertion(clause: str, start: int, end: int) -> int | None:
    """POSITIVE, NEGATIVE or UNCERTAIN for the mention ``clause[start:end]`` (NOT_MENTIONED when the clause only
    asks about it)."""
    before = _PSEUDO.sub(lambda match: " " * len(match.group()), clause[:start])
    cues = list(_CUE_BEFORE.finditer(before))
    last = cues[-1] if cues else None  # the nearest cue decides ("possible effusion, no pneumothorax")
    if last is not None and not _SCOPE_BREAK.search(before, last.end()):
        if last.group("ignore"):
            return NOT_MENTIONED  # "evaluation for pneumothorax is limited": asked about, not reported
        return UNCERTAIN if last.group("uncertain") else NEGATIVE
    after = clause[end:]
    for pattern, value in ((_UNCERTAIN_AFTER, UNCERTAIN), (_NEGATIVE_AFTER, NEGATIVE)):
        match = pattern.search(after)
        if match is not None:
            between = after[: match.start()]
            if len(between.split()) <= _AFTER_WINDOW and not _SCOPE_BREAK.search(between):
                return value
    if _OR_AFTER.match(after) or _OR_BEFORE.search(before):
        return UNCERTAIN  # "atelectasis or pneumonia": a hedged list
    return POSITIVE


def _clauses(text: str) -> list[str]:
    text = " ".join(text.lower().replace("?", " ? ").split())
    return [clause for sentence in _SENTENCE.split(text) for clause in _CLAUSE.split(sentence) if clause.strip()]


def _read(clauses: Sequence[str], observation: str) -> int | None:
    rules = RULES[observation]
    found: set[int] = set()
    for clause in clauses:
        for match in rules.mention.finditer(clause):
            found.add(_assertion(clause, match.start(), match.end()))
            found.discard(NOT_MENTIONED)
            if POSITIVE in found:
                return POSITIVE
        if rules.normal is not None and rules.normal.search(clause):
            found.add(NEGATIVE)
    if UNCERTAIN in found:
        return UNCERTAIN
    return NEGATIVE if found else NOT_MENTIONED


def label_observations(text: str, observations: Iterable[str] | None = None) -> dict[str, int | None]:
    """``{name: POSITIVE (1) | NEGATIVE (0) | UNCERTAIN (-1) | NOT_MENTIONED (None)}`` for each of ``observations``
    (default :data:`OBSERVATIONS`), keyed by the names given; a name the labeller cannot read is a ValueError."""
    names = list(OBSERVATIONS if observations is None else observations)
    canonical = {name: canonical_observation(name) for name in names}
    missing = [name for name, observation in canonical.items() if observation is None]
    if missing:
        raise ValueError(f"label_observations: no rules for {missing}; known: {list(OBSERVATIONS)} "
                         f"(and aliases {sorted(ALIASES)})")
    clauses = _clauses(text)
    wanted = set(canonical.values())
    if "No Finding" in wanted:
        wanted.update(_PATHOLOGIES)
    values = {observation: _read(clauses, observation) for observation in wanted if observation != "No Finding"}
    if "No Finding" in wanted:
        abnormal = any(values[name] in (POSITIVE, UNCERTAIN) for name in _PATHOLOGIES)
        values["No Finding"] = NOT_MENTIONED if abnormal else POSITIVE
    return {name: values[canonical[name]] for name in names}


# How the MeSH "major" terms of the IU X-ray reports (Open-I) map to observations, for checking the labeller on
# them (tests/evaluation/test_labeller.py, benchmarks/bench_labeller.py). A term is "Heading/modifier/...": an
# observation is present when a term starts with one of its headings (and, where given, carries one of its
# modifiers; IU indexes a nodular opacity or density as "Opacity/.../round", "Density/.../round"); No Finding is a
# report whose only term is "normal". MeSH indexers read the whole report, so a
# term is present for hedged findings too: compare with positive-or-uncertain labels.
IU_MESH_TERMS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "Enlarged Cardiomediastinum": (("mediastinum", ("prominent", "enlarged", "widened")),),
    "Cardiomegaly": (("cardiomegaly", ()), ("cardiac shadow", ("enlarged",))),
    "Lung Lesion": (("nodule", ()), ("mass", ()), ("opacity", ("round",)), ("density", ("round",))),
    "Lung Opacity": (("opacity", ()), ("airspace disease", ()), ("infiltrate", ()), ("density", ("lung",))),
    "Edema": (("pulmonary edema", ()), ("pulmonary congestion", ())),
    "Consolidation": (("consolidation", ()),),
    "Pneumonia": (("pneumonia", ()),),
    "Atelectasis": (("pulmonary atelectasis", ()),),
    "Pneumothorax": (("pneumothorax", ()), ("hydropneumothorax", ())),
    "Pleural Effusion": (("pleural effusion", ()), ("hydropneumothorax", ())),
    "Pleural Other": (("thickening", ("pleura",)),),
    "Fracture": (("fractures, bone", ()),),
    "Support Devices": (("catheters, indwelling", ()), ("implanted medical device", ()), ("tube, inserted", ()),
                        ("medical device", ()), ("stents", ())),
    "Emphysema": (("emphysema", ()), ("pulmonary emphysema", ()), ("bullous emphysema", ())),
    "Lung Nodule": (("nodule", ()), ("opacity", ("round",)), ("density", ("round",))),
}


def mesh_observations(terms: Iterable[str]) -> set[str]:
    """The observations that IU X-ray MeSH major ``terms`` name (see :data:`IU_MESH_TERMS`)."""
    parsed = [[part.strip().lower() for part in term.split("/")] for term in terms]
    found = {"No Finding"} if [parts[0] for parts in parsed] == ["normal"] else set()
    for observation, headings in IU_MESH_TERMS.items():
        for heading, modifiers in headings:
            if any(parts[0] == heading and (not modifiers or set(modifiers) & set(parts[1:])) for parts in parsed):
                found.add(observation)
    return found
