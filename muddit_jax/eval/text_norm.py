"""Caption normalisation approximating the COCO caption pipeline (PTB tokenizer) without Java.

pycocoevalcap runs Stanford CoreNLP 3.4.1's ``PTBTokenizer -preserveLines -lowerCase`` and
then drops every output token listed in its ``PUNCTUATIONS``. :func:`normalize_caption`
reproduces that effect for the text captions actually contain:

Handled (checked against the real tokenizer):
  * lower-casing; newlines/tabs are plain whitespace;
  * removal of quotes (``"`` ``'`` `````), ``. , ; : ? !``, ``-``/``--`` and ellipses; commas
    and colons between digits stay (``1,000``, ``5:30``); runs like ``?!``/``!!`` stay, as in PTB;
  * a sentence-final period is split off (and dropped) except on abbreviations: dotted
    initials (``u.s.``, ``p.m.``, ``a.``) and a short list (``mr.``, ``st.``, ``etc.`` ...);
  * clitics: ``n't 's 're 've 'll 'd 'm`` split off (``can't`` -> ``ca n't``), plus
    ``cannot gonna gotta wanna lemme gimme 'tis 'twas``;
  * ``$ % # &`` become separate tokens; word-internal hyphens and slashes stay;
  * brackets become ``-lrb- -rrb- -lsb- -rsb- -lcb- -rcb-`` and are KEPT: pycocoevalcap filters
    the upper-case ``-LRB-`` forms but ``-lowerCase`` emits lower-case ones;
  * curly quotes and en/em dashes are mapped to their ASCII forms first.

Not handled (PTB differs): ``y'all`` -> ``y' all``, ``rock'n'roll``, ``12:00pm`` -> ``12:00 pm``,
context-dependent abbreviations (``no. 5`` vs ``in.``), emoticons, ``a...`` -> ``a.``, URLs and
e-mail addresses with trailing periods, and other rare PTB rules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS (tokens dropped after tokenisation).
PTB_PUNCTUATIONS: frozenset[str] = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
     ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_UNICODE = {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
            "\u2013": " -- ", "\u2014": " -- ", "\t": " ", "\n": " ", "\r": " "}
# Whole tokens PTB splits into several.
_SPECIAL = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na",
            "lemme": "lem me", "gimme": "gim me", "'tis": "'t is", "'twas": "'t was"}
# Tokens with a leading apostrophe that PTB keeps whole.
_KEEP_LEADING_QUOTE = re.compile(r"^'(?:em|n'|\d+s?)$")
_ABBREVIATIONS = frozenset(
    ["mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "prof.", "etc.", "vs.", "mt.", "inc.",
     "ltd.", "co.", "corp.", "ft.", "ave."]
)
_INITIALS = re.compile(r"^(?:[a-z]\.)+$")
_BRACKET_TOKENS = frozenset(_BRACKETS.values())
_BARE_CLITICS = frozenset(["'s", "'re", "'ve", "'ll", "'d", "'m"])
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")

_PRE = [  # (pattern, replacement) applied to the whole lower-cased string, in order
    (re.compile(r"\.{2,}"), " ... "),
    (re.compile(r"[?!]+"), r" \g<0> "),
    (re.compile(r"(?<!\d),|,(?!\d)"), " , "),
    (re.compile(r"(?<!\d):|:(?!\d)"), " : "),
    (re.compile(r"-{2,}"), " -- "),
    (re.compile(r"[;$%#&`\"]"), r" \g<0> "),
]


def _split_token(tok: str) -> list[str]:
    """Split one whitespace token into PTB-like tokens (punctuation kept as tokens)."""
    if tok in _SPECIAL:
        return _SPECIAL[tok].split()
    if tok in _BRACKET_TOKENS or tok in _BARE_CLITICS:
        return [tok]
    head: list[str] = []
    tail: list[str] = []
    while tok:  # peel leading hyphens / quotes
        if tok[0] == "-" and len(tok) > 1:
            head.append("-")
            tok = tok[1:]
        elif tok[0] == "'" and len(tok) > 1 and not _KEEP_LEADING_QUOTE.match(tok) \
                and tok not in _SPECIAL:
            head.append("'")
            tok = tok[1:]
        else:
            break
    while len(tok) > 1:  # peel trailing periods / quotes / hyphens
        if tok[-1] == "." and not (_INITIALS.match(tok) or tok in _ABBREVIATIONS):
            tail.insert(0, ".")
            tok = tok[:-1]
        elif tok[-1] in "'-" and not _KEEP_LEADING_QUOTE.match(tok):
            tail.insert(0, tok[-1])
            tok = tok[:-1]
        else:
            break
    if tok in _SPECIAL:
        body = _SPECIAL[tok].split()
    else:
        m = _CLITIC.match(tok)
        body = [m.group(1), m.group(2)] if m else [tok]
    return head + body + tail


def ptb_tokens(text: str) -> list[str]:
    """PTB-style lower-cased tokens of ``text``, punctuation tokens included."""
    s = text.lower()
    for src, dst in _UNICODE.items():
        s = s.replace(src, dst)
    for src, dst in _BRACKETS.items():
        s = s.replace(src, f" {dst} ")
    for pattern, repl in _PRE:
        s = pattern.sub(repl, s)
    out: list[str] = []
    for tok in s.split():
        out.extend(_split_token(tok))
    return out


def normalize_caption(text: str) -> str:
    """Tokenise like the COCO PTB tokenizer and drop its punctuation tokens; space-joined."""
    return " ".join(t for t in ptb_tokens(text) if t not in PTB_PUNCTUATIONS and t != '"')


def normalize_captions(captions: Mapping[object, Sequence[str]]) -> dict[object, list[str]]:
    """Apply :func:`normalize_caption` to every caption of every id."""
    return {k: [normalize_caption(c) for c in v] for k, v in captions.items()}
