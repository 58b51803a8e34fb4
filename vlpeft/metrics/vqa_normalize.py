"""Answer normalisation of the official VQA evaluation, re-implemented.

Reference behaviour: ``GT-Vision-Lab/VQA``, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` at commit
``a013f00`` (2021-03-11). The functions here reproduce that file's string processing exactly, including its
quirks, because published VQA numbers depend on them:

* :func:`process_punctuation`
  - For every character in :data:`VQA_PUNCTUATION`: if the *original* text contains ``p + " "`` or
    ``" " + p``, or contains a digit-comma-digit anywhere, every ``p`` is deleted; otherwise every ``p`` becomes a
    space. So ``"1,500-2,000"`` -> ``"15002000"`` and ``"a/c"`` -> ``"a c"``.
  - Then ``.`` characters that are not followed by a digit are deleted. The official regex has a mistyped
    look-behind (``(?!<=\\d)``, a look-ahead that always succeeds before a ``.``), so periods after digits are
    deleted too (``"5."`` -> ``"5"``). It also passes ``re.UNICODE`` (= 32) positionally as the ``count``
    argument, so at most 32 periods are deleted: ``"yes" + 33 * "."`` -> ``"yes."``.
  - ``:`` and ``'`` are not in the list and survive.
* :func:`process_digit_article`: lowercase, split on whitespace, map number words ``none``/``zero`` ... ``ten`` to
  digits, drop the articles ``a``/``an``/``the``, map words through the official contractions table, and join with
  single spaces. The table has capitalised keys (``Im``, ``Ive``, ``Id've``, ``I'dve``) that can never match
  after lowercasing, and a few entries that map "backwards" (``somebody'd`` -> ``somebodyd``); both are kept.
* :func:`normalize_answer`: newline/tab to space, strip, then both steps above. This is what the official
  evaluation applies to every answer of a question whose ground-truth answers are not all identical. It is also
  the usual training-side canonicalisation of answer strings.
"""

from __future__ import annotations

import re

__all__ = [
    "VQA_ARTICLES",
    "VQA_CONTRACTIONS",
    "VQA_NUMBER_WORDS",
    "VQA_PUNCTUATION",
    "normalize_answer",
    "process_digit_article",
    "process_punctuation",
    "strip_whitespace",
]

VQA_PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)
"""Characters handled by :func:`process_punctuation`, in the official order (``.``, ``:``, ``'`` excluded)."""

VQA_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

VQA_ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# The official contractions table, one "key value" pair per line. Kept verbatim (ASCII apostrophes), including
# the capitalised keys that cannot match after lowercasing and the entries that map "backwards".
_CONTRACTION_PAIRS = """
aint ain't
arent aren't
cant can't
couldve could've
couldnt couldn't
couldn'tve couldn't've
couldnt've couldn't've
didnt didn't
doesnt doesn't
dont don't
hadnt hadn't
hadnt've hadn't've
hadn'tve hadn't've
hasnt hasn't
havent haven't
hed he'd
hed've he'd've
he'dve he'd've
hes he's
howd how'd
howll how'll
hows how's
Id've I'd've
I'dve I'd've
Im I'm
Ive I've
isnt isn't
itd it'd
itd've it'd've
it'dve it'd've
itll it'll
let's let's
maam ma'am
mightnt mightn't
mightnt've mightn't've
mightn'tve mightn't've
mightve might've
mustnt mustn't
mustve must've
neednt needn't
notve not've
oclock o'clock
oughtnt oughtn't
ow's'at 'ow's'at
'ows'at 'ow's'at
'ow'sat 'ow's'at
shant shan't
shed've she'd've
she'dve she'd've
she's she's
shouldve should've
shouldnt shouldn't
shouldnt've shouldn't've
shouldn'tve shouldn't've
somebody'd somebodyd
somebodyd've somebody'd've
somebody'dve somebody'd've
somebodyll somebody'll
somebodys somebody's
someoned someone'd
someoned've someone'd've
someone'dve someone'd've
someonell someone'll
someones someone's
somethingd something'd
somethingd've something'd've
something'dve something'd've
somethingll something'll
thats that's
thered there'd
thered've there'd've
there'dve there'd've
therere there're
theres there's
theyd they'd
theyd've they'd've
they'dve they'd've
theyll they'll
theyre they're
theyve they've
twas 'twas
wasnt wasn't
wed've we'd've
we'dve we'd've
weve we've
werent weren't
whatll what'll
whatre what're
whats what's
whatve what've
whens when's
whered where'd
wheres where's
whereve where've
whod who'd
whod've who'd've
who'dve who'd've
wholl who'll
whos who's
whove who've
whyll why'll
whyre why're
whys why's
wont won't
wouldve would've
wouldnt wouldn't
wouldnt've wouldn't've
wouldn'tve wouldn't've
yall y'all
yall'll y'all'll
y'allll y'all'll
yall'd've y'all'd've
y'alld've y'all'd've
y'all'dve y'all'd've
youd you'd
youd've you'd've
you'dve you'd've
youll you'll
youre you're
youve you've
"""

VQA_CONTRACTIONS: dict[str, str] = dict(
    line.split(" ") for line in _CONTRACTION_PAIRS.strip().splitlines()  # type: ignore[misc]
)
"""The official contractions table (word -> replacement), applied word by word after lowercasing."""

_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# Equivalent to the official "(?!<=\d)(\.)(?!\d)": its "(?!<=\d)" is a look-ahead that never fails before ".".
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The official call is periodStrip.sub("", text, re.UNICODE): re.UNICODE lands in `count`, and its value is 32.
_MAX_PERIODS_DELETED = int(re.UNICODE)


def strip_whitespace(text: str) -> str:
    """Replace ``\\n`` and ``\\t`` with spaces, then strip leading/trailing whitespace (official first step)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """Official ``processPunctuation``: delete or space out punctuation, then delete up to 32 periods.

    Examples: ``"1,500-2,000"`` -> ``"15002000"``; ``"a/c"`` -> ``"a c"``; ``"x - y-z"`` -> ``"x  yz"`` (any
    ``"- "`` deletes every hyphen); ``"2.5"`` is kept; ``"yes."`` -> ``"yes"``.
    """
    delete_everywhere = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in VQA_PUNCTUATION:
        # The decision looks at the original text, while the edits accumulate in `out`.
        if delete_everywhere or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS_DELETED)


def process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lowercase, number words to digits, drop articles, map contractions."""
    words = []
    for word in text.lower().split():
        word = VQA_NUMBER_WORDS.get(word, word)
        if word not in VQA_ARTICLES:
            words.append(word)
    return " ".join(VQA_CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(text: str) -> str:
    """Full official normalisation of one answer: whitespace, punctuation, then digits/articles/contractions.

    Raises:
        TypeError: if ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize_answer expects a str answer, got {type(text).__name__}: {text!r}")
    return process_digit_article(process_punctuation(strip_whitespace(text)))
