"""Salient-span masking (REALM §3.4): mask a named entity, a date or a number, so the masked token needs world
knowledge rather than syntax. REALM found its spans with a trained NER tagger and a date regex; no model can be
downloaded here, so `SalientSpans` is a rule set, measured against hand-labelled Wikipedia sentences
(tests/fixtures/salient_spans*.json, which also state the labelling conventions). Sentences without a span fall
back to random-token masking.

The rules, in the order that settles overlaps (a longer span first, then a date before a number before a name):
- dates: "12 March 1843", "March 12, 1843", "March 1843", "12 March", "1950s", "20th century", "17th-century",
  "401 BC", "AD 79";
- numbers in digits with their separators, decimals, %/percent, scale word ("31.7 million") and ordinal suffix;
  never digits glued to letters ("3D", "km2");
- names: runs of capitalised words (accents, hyphens, apostrophes, initials, "U.S.") joined by single spaces and
  by lower-case connectors that stand between two capitalised words ("Bank of England", "Jan van Eyck",
  "Cyrus the Younger"). A run drops a leading article, a leading office ("King of Hanover" -> "Hanover"), a
  possessive ending, and, at a sentence start, leading function words ("In Paris" -> "Paris"). A one-word run that
  opens a sentence is a name unless it is a function word or, given a corpus lexicon, a word the corpus writes in
  lower case more often than capitalised mid-sentence ("Football is ..." is no name, "Kano is ..." is).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import regex

_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
_SP = r"[ \u00a0]"  # Wikipedia writes "42.8\u00a0million": a no-break space is a space
_NUM = r"(?<![\w.,])\d{1,3}(?:,\d{3})+(?:\.\d+)?|(?<![\w.,])\d+(?:\.\d+)?"
_ERA = r"(?:BC|BCE|AD|CE)\b"
_DATE = re.compile(
    rf"\b\d{{1,2}}{_SP}(?:{_MONTHS})(?:{_SP}\d{{3,4}})?\b"  # 12 March 1843, 12 March
    rf"|\b(?:{_MONTHS}){_SP}\d{{1,2}},{_SP}\d{{3,4}}\b"  # March 12, 1843
    rf"|\b(?:{_MONTHS}){_SP}\d{{1,4}}\b(?![.,]\d)"  # March 1843, March 12
    rf"|\b\d{{1,2}}(?:st|nd|rd|th)[ \u00a0-]century(?:{_SP}{_ERA})?"  # 20th century, 17th-century, 6th century BC
    rf"|(?<![\w.,])\d{{3}}0s\b"  # 1950s
    rf"|(?:{_NUM}){_SP}{_ERA}|\b(?:AD|CE){_SP}\d{{1,4}}\b"  # 401 BC, AD 79
)
_NUMBER = re.compile(
    rf"(?:US\$|[$£€¥])?(?:{_NUM})"
    rf"(?:(?:st|nd|rd|th)\b|{_SP}?%|{_SP}(?:percent|per cent|million|billion|trillion)\b)?(?![^\W_])"
)

# A capitalised word: an upper-case letter, then letters, marks, digits or inner apostrophes; hyphenated parts that
# are themselves capitalised ("Jean-Baptiste", "Al-Azhar"; not "Italian-born"); "d'Antonguolla"; or an initialism
# ("U.S.", "J.", "St.").
_WORD = r"[\p{L}\p{M}\p{N}]*(?:['’ʼ][\p{L}\p{M}]+)*"
_CAP = rf"(?:[dl]['’])?\p{{Lu}}{_WORD}"
_CAP_WORD = rf"(?:\p{{Lu}}\.){{2,}}|\p{{Lu}}\.(?=[ \u00a0]\p{{Lu}})|(?:St|Mt|Dr|Jr|Sr)\.|{_CAP}(?:-(?:[a-z]+-)?{_CAP})*"
_CONNECTORS = "of|of the|de|de la|da|di|del|della|der|den|du|des|la|le|van|von|van der|von der|y|the|bin|ibn|al"
_NAME = regex.compile(
    rf"(?<![\p{{L}}\p{{M}}\p{{N}}])(?:{_CAP_WORD})"
    rf"(?:(?:{_SP}(?:{_CONNECTORS}))?{_SP}(?:{_CAP_WORD}))*"
    rf"(?:{_SP}\d{{1,3}}(?![\w.,]))?"  # a small number right after a name belongs to it: "Apollo 17"
)
_ARTICLES = {"The", "A", "An", "BC", "BCE", "AD", "CE"}  # and eras: "6th century BC Neo-Babylonian Empire"
# Offices and ranks are not part of the name they stand before: "King of Hanover" -> "Hanover", "Captain Georg von
# Trapp" -> "Georg von Trapp". Before "of" any of them; before a name only those that do not often open a name
# themselves ("General Motors", "Grand Canyon", "Duke University"); "Grand" only before another office.
_PERSON_TITLES = {"King", "Queen", "Emperor", "Empress", "Prince", "Princess", "President", "Captain", "Admiral",
                  "Colonel", "Sir", "Dame", "Pope", "Chancellor", "Senator", "Mayor", "Archbishop", "Bishop",
                  "Cardinal", "Sultan", "Caliph", "Tsar", "Czar", "Shah", "Pharaoh", "Mr.", "Mrs.", "Ms.", "Dr."}
_OFFICES = _PERSON_TITLES | {"Duke", "Duchess", "General", "Governor", "Grand"}
# Closed-class words that open sentences: capitalised by position, never a name on their own.
_FUNCTION_WORDS = set("""
a about above according across after against all along also although among an and another any are around as at
because before behind being below beside besides between both but by can despite did do does down during each
either even every except few first following for from further had has have he her here hers him his how however
i if in including inside into is it its just later least less like many may meanwhile more moreover most much
must my near neither never nevertheless next no none nor not now of off on once one only onto or other others
otherwise our out outside over per perhaps several she should since so some such than that the their them then
there therefore these they this those though through throughout thus to today together too toward towards under
unlike until unto up upon us various was we were what whatever when where whereas whether which while who whom
whose why with within without yet you your
""".split())
_SENTENCE_START = re.compile(r"(?:^|[.!?][\"'”’)\]]*\s+)[\"'“‘(\[]*$")


def _opens_sentence(text: str, i: int) -> bool:
    """Whether text[i] starts a sentence: nothing but quotes or brackets before it since the text's start or a
    sentence end. A short window is enough and keeps the lexicon's pass over a corpus linear (`^` matches only
    at the text's real start)."""
    return bool(_SENTENCE_START.search(text, max(0, i - 12), i))


@dataclass(frozen=True)
class SalientSpans:
    """The span finder. `lowercase` holds the words a corpus writes in lower case at least as often as capitalised
    mid-sentence: with it, a sentence-opening word is a name only when the corpus mostly capitalises it elsewhere."""
    lowercase: frozenset[str] | None = None

    @classmethod
    def from_texts(cls, texts: Iterable[str], max_texts: int = 200_000) -> SalientSpans:
        """The lexicon of a corpus. The first `max_texts` texts settle it: word case statistics converge long
        before a 21M-passage corpus ends."""
        low, cap = Counter(), Counter()
        for n, text in enumerate(texts):
            if n == max_texts:
                break
            for m in regex.finditer(r"[\p{L}\p{M}]+", text):
                w = m.group(0)
                if w.islower():
                    low[w] += 1
                elif w[0].isupper() and not _opens_sentence(text, m.start()):
                    cap[w.lower()] += 1
        return cls(frozenset(w for w, c in low.items() if c >= cap[w]))

    def __call__(self, text: str) -> list[tuple[int, int]]:
        """Character spans [start, end) of the salient spans of `text`, ordered and disjoint."""
        found = [(m.start(), m.end(), 0) for m in _DATE.finditer(text)]
        found += [(m.start(), m.end(), 1) for m in _NUMBER.finditer(text)]
        found += [(*s, 2) for m in _NAME.finditer(text) if (s := self._name(text, m.start(), m.end()))]
        spans: list[tuple[int, int]] = []
        for a, b, _ in sorted(found, key=lambda f: (-(f[1] - f[0]), f[2], f[0])):
            if all(b <= c or d <= a for c, d in spans):
                spans.append((a, b))
        return sorted(spans)

    def _name(self, text: str, start: int, end: int) -> tuple[int, int] | None:
        words = [(m.start() + start, m.end() + start, m.group(0))
                 for m in re.finditer(r"[^ \u00a0]+", text[start:end])]
        opens = _opens_sentence(text, start)
        # A sentence's leading function words ("In Paris"), a leading article or era anywhere.
        while words and (opens and words[0][2].lower() in _FUNCTION_WORDS or words[0][2] in _ARTICLES):
            words.pop(0)
        # Offices: "King of Hanover", "Grand Prince of Vladimir", "Captain Georg von Trapp".
        while len(words) > 1 and words[0][2] == "Grand" and words[1][2] in _OFFICES:
            words.pop(0)
        if len(words) > 2 and words[0][2] in _OFFICES and words[1][2] == "of":
            words = words[2:]
        while len(words) > 1 and words[0][2] in _PERSON_TITLES and words[1][2] != "of":
            words.pop(0)
        while words and words[-1][2].islower():  # a connector left dangling by the cuts above
            words.pop()
        if not words:
            return None
        a, b = words[0][0], words[-1][1]
        if re.search(r"['’]s$", text[a:b]):  # "France's" -> "France" (inside a name it stays: "Hudson's Bay")
            b -= 2
        # Capitalised by its position alone, perhaps: only the first word of a sentence.
        if len(words) == 1 and a == start and opens and self._common(text[a:b]):
            return None
        return a, b

    def _common(self, word: str) -> bool:
        if word.lower() in _FUNCTION_WORDS:
            return True
        if self.lowercase is None or not word[1:].islower():  # "NASA", "McDonald": never a lower-case word
            return False
        return word.lower() in self.lowercase


_DEFAULT = SalientSpans()


def salient_spans(text: str, finder: SalientSpans = _DEFAULT) -> list[tuple[int, int]]:
    """Character spans of salient candidates (see `SalientSpans`; without a corpus lexicon a sentence-opening word
    is a name unless it is a function word)."""
    return finder(text)


@dataclass
class TokenizedSentence:
    ids: np.ndarray  # int32 token ids, no special tokens
    offsets: np.ndarray  # [n, 2] character offsets of each token
    spans: list[tuple[int, int]]  # salient spans as token ranges [start, end)


def char_to_token_span(offsets: np.ndarray, start: int, end: int) -> tuple[int, int] | None:
    """Tokens that overlap the character span [start, end)."""
    hit = np.nonzero((offsets[:, 0] < end) & (offsets[:, 1] > start))[0]
    if len(hit) == 0:
        return None
    return int(hit[0]), int(hit[-1]) + 1


def tokenize_sentences(tokenizer, texts: list[str], max_len: int,
                       finder: SalientSpans = _DEFAULT) -> list[TokenizedSentence]:
    if not texts:  # a fast tokenizer raises IndexError on an empty batch (no held-out sentences, data.eval_examples=0)
        return []
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                    max_length=max_len - 2)
    out = []
    for text, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"]):
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        spans = [s for s in (char_to_token_span(offsets, a, b) for a, b in finder(text)) if s]
        out.append(TokenizedSentence(np.asarray(ids, dtype=np.int32), offsets, spans))
    return out


def mask_sentence(sent: TokenizedSentence, mask_id: int, rng: np.random.Generator,
                  span: tuple[int, int] | None = None, max_span_tokens: int = 8,
                  random_rate: float = 0.15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (masked ids, masked positions, target ids). With `span` given (token range), masks exactly it;
    otherwise a random salient span, or random tokens when the sentence has none."""
    ids = sent.ids.copy()
    n = len(ids)
    if span is None:
        candidates = [s for s in sent.spans if s[1] - s[0] <= max_span_tokens and s[1] - s[0] < n]
        if candidates:
            span = candidates[rng.integers(len(candidates))]
    if span is not None:
        positions = np.arange(span[0], span[1])
    else:
        count = max(1, int(round(random_rate * n)))
        positions = np.sort(rng.choice(n, size=min(count, n), replace=False))
    targets = ids[positions].copy()
    ids[positions] = mask_id
    return ids, positions, targets
