"""The benchmark-specific metrics of the paper's benchmarks, as published.

- `vqa_accuracy` (TextVQA; Antol et al. 2015, EvalAI): answers go through the
  official VQA normalisation (`EvalAIAnswerProcessor`: lower case, punctuation,
  number words to digits, articles dropped, contractions), then the
  prediction's accuracy is `min(#matching humans / 3, 1)` averaged over the 10
  subsets of 9 of the 10 human answers.
- `choice_letter` / `multiple_choice` (AI2D): the option letter a prediction
  names ("B", "(B)", "B. ...", "Answer: B", or an option's exact text),
  matched against the gold letter.
- `exact_match` (GQA, as lmms-eval): equality after lower-casing and removing
  every punctuation character.

Design decisions:
- ANLS (DocVQA, InfographicVQA) and relaxed correctness (ChartQA) are shared
  with the synthetic tasks, so they live once in `casa.data.metrics` (with the
  one answer normalisation and the one number parser); this module holds
  only the rules that exist for one benchmark.
- Each rule reproduces its reference implementation, quirks included (the
  VQA period pattern keeps the official typo), so scores compare with
  published ones.
"""

from __future__ import annotations

import re
import string

__all__ = ["ARTICLES", "CONTRACTIONS", "NUMBER_WORDS", "EvalAIAnswerProcessor", "choice_letter", "exact_match",
           "multiple_choice", "vqa_accuracy"]

# ----------------------------------------------------------------------------- VQA accuracy

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern, typo included
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


class EvalAIAnswerProcessor:
    """The answer normalisation of the VQA / TextVQA evaluation (EvalAI)."""

    def word_tokenize(self, word: str) -> str:
        return word.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()

    def process_punctuation(self, text: str) -> str:
        out = text
        for p in _PUNCT:
            if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
                out = out.replace(p, "")
            else:
                out = out.replace(p, " ")
        return _PERIOD_STRIP.sub("", out)

    def process_digit_article(self, text: str) -> str:
        words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
        words = [w for w in words if w not in ARTICLES]
        return " ".join(CONTRACTIONS.get(w, w) for w in words)

    def __call__(self, answer: str) -> str:
        answer = self.word_tokenize(answer).replace("\n", " ").replace("\t", " ").strip()
        return self.process_digit_article(self.process_punctuation(answer))


_EVALAI = EvalAIAnswerProcessor()


def vqa_accuracy(prediction: str, answers) -> float:
    """min(#humans / 3, 1) averaged over the leave-one-out subsets of the human answers."""
    pred = _EVALAI(prediction)
    gold = [_EVALAI(a) for a in answers]
    if not gold:
        return 0.0
    accs = []
    for i in range(len(gold)):
        others = gold[:i] + gold[i + 1:]
        accs.append(min(1.0, sum(a == pred for a in others) / 3))
    return sum(accs) / len(accs)


# ----------------------------------------------------------------------------- multiple choice

_LEADING = re.compile(r"^\s*(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)\s*(?:is)?\s*[:\-]?\s*", re.I)


def choice_letter(prediction: str, options) -> str | None:
    """The option letter named by `prediction` (A = options[0]), or None."""
    letters = [chr(65 + i) for i in range(len(options))]
    text = _LEADING.sub("", prediction.strip())
    m = (re.match(r"^\(?([A-Z])\)?(?=$|[\s.:)\],])", text) or re.match(r"^\(?([a-z])(?:[.)]|$)", text))
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    found = {x.upper() for x in re.findall(r"(?:^|[\s(])([A-Z])(?=[.):]|$)", text)} & set(letters)
    if len(found) == 1:
        return found.pop()
    norm = _strip_punct(text)
    named = [letters[i] for i, o in enumerate(options) if norm and _strip_punct(o) == norm]
    return named[0] if len(named) == 1 else None


def multiple_choice(prediction: str, options, gold_letter: str) -> float:
    return float(choice_letter(prediction, options) == gold_letter)


# ----------------------------------------------------------------------------- exact match


def _strip_punct(s: str) -> str:
    return s.strip().lower().translate(str.maketrans("", "", string.punctuation)).strip()


def exact_match(prediction: str, answer: str) -> float:
    return float(_strip_punct(prediction) == _strip_punct(answer))
