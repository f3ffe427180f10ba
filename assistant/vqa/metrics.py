"""VQA metrics: the official VQAv2 accuracy (normalisation reproduced from the reference
evaluation, GT-Vision-Lab/VQA vqaEval.py), exact match, and POPE-style yes/no scores.

Used by `python -m assistant.vqa score`, by batch VQA runs and by training-time evaluation.
"""

from __future__ import annotations

import re
from collections import defaultdict

# ---- the reference normalisation, rule for rule -----------------------------------------------
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
# The reference pattern, quirk included: "(?!<=\d)" is a look-ahead, not a look-behind, so a period
# is removed unless a digit follows it.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def process_punctuation(text: str) -> str:
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The reference passes re.UNICODE (32) as `count`: at most 32 periods go. Kept for equality.
    return PERIOD_STRIP.sub("", out, re.UNICODE)


def process_digit_article(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2 accuracy of one prediction against the human answers (0..1).

    With several answers (VQAv2: 10): min(1, matches/3) averaged over the leave-one-out subsets, as
    the reference. With a single answer (synthetic sets such as easy-VQA) the leave-one-out rule
    would always give 0, so it is normalised exact match.
    """
    pred = normalize_answer(prediction)
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    if len(answers) == 1:
        return float(pred == normalize_answer(answers[0]))
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        scores.append(min(1.0, sum(a == pred for a in others) / 3))
    return sum(scores) / len(scores)


def exact_match(prediction: str, answers: list[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def yes_no(text: str) -> str | None:
    """'Yes, there is.' -> 'yes'; anything that is neither -> None."""
    words = normalize_answer(text).split()
    if not words:
        return None
    return words[0] if words[0] in ("yes", "no") else None


def pope_scores(predictions: list[str], labels: list[str]) -> dict:
    """POPE-style yes/no metrics; 'yes' is the positive class. Unparseable answers count as wrong."""
    tp = fp = tn = fn = 0
    unparsed = 0
    yes_answers = 0
    for pred, label in zip(predictions, labels):
        p, gold = yes_no(pred), yes_no(label)
        if p is None:
            unparsed += 1
            p = "no" if gold == "yes" else "yes"  # wrong either way
        yes_answers += p == "yes"
        if gold == "yes":
            tp += p == "yes"
            fn += p == "no"
        else:
            fp += p == "yes"
            tn += p == "no"
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"count": n, "accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall,
            "f1": f1, "yes_ratio": yes_answers / n if n else 0.0, "unparsed": unparsed}


def score_items(items: list[dict]) -> dict:
    """Items: {"prediction", "answers": [..], optional "question_type", "answer_type"} -> metrics dict."""
    if not items:
        return {"count": 0}
    acc = [vqa_accuracy(it["prediction"], it["answers"]) for it in items]
    em = [exact_match(it["prediction"], it["answers"]) for it in items]
    out = {"count": len(items), "vqa_accuracy": 100 * sum(acc) / len(acc), "exact_match": 100 * sum(em) / len(em)}
    for key in ("question_type", "answer_type"):
        groups = defaultdict(list)
        for it, a in zip(items, acc):
            if it.get(key) is not None:
                groups[it[key]].append(a)
        if groups:
            out[f"by_{key}"] = {k: {"count": len(v), "vqa_accuracy": 100 * sum(v) / len(v)}
                                for k, v in sorted(groups.items())}
    yn = [it for it in items if yes_no(it["answers"][0]) is not None and len(set(
        normalize_answer(a) for a in it["answers"])) == 1]
    if yn:
        out["yes_no"] = pope_scores([it["prediction"] for it in yn], [it["answers"][0] for it in yn])
    return out
