#!/usr/bin/env python3
"""Build the shipped text-domain data for mergelaws (``data/domains``).

Nine prompt/response domains, each a genuinely different kind of text, built
only from public-domain or freely licensed material that is installed locally
(Debian packages and this interpreter's own standard library) or generated
procedurally with a fixed seed.  Nothing is downloaded.

    code        CPython standard-library source  (def line + docstring -> body)
    scripture   King James Bible, Debian bible-kjv(-text)  (ref + previous verse -> verse)
    dictionary  GCIDE / Webster 1913, Debian dict-gcide  (headword -> definition)
    thesaurus   WordNet 3.0, Debian wordnet-base  (word + POS -> synonyms/gloss/hypernyms)
    jargon      The Jargon File 4.4.7, Debian dict-jargon  (term -> entry)
    quotes      fortune-mod cookie files, Debian fortunes/fortunes-min  (attribution + opening -> quote)
    manpages    Linux man-pages 6.03, Debian manpages/manpages-dev  (man <sec> <name> + section -> text)
    arithmetic  generated multi-step arithmetic with worked solutions
    algebra     generated linear equations / 2x2 systems with worked solutions

For every domain the script

1. builds candidate pairs (prompt <= 300 chars, response 40..500 chars, long
   responses cut at a sentence/line boundary, whitespace normalised, markup
   stripped);
2. drops duplicates by normalised prompt and by normalised response;
3. selects up to 2200 pairs by a seeded hash of the prompt (some domains rank
   preferred candidates first, e.g. DESCRIPTION sections of man pages);
4. splits them into eval (~200) and train (~2000) by a seeded hash of a
   *group* key (the prompt, or e.g. the man page / Bible chapter / headword),
   so no prompt, response or group is in both splits;
5. writes ``<out>/<domain>/{train,eval}.jsonl.gz`` (one ``{"prompt", "response"}``
   object per line, gzip with mtime=0 and no file name, so rebuilding gives
   identical bytes), then ``manifest.json`` (counts, sha256, source versions,
   seed) and ``SOURCES.md``.

Usage::

    apt-get install -y --no-install-recommends bible-kjv bible-kjv-text dict-gcide \
        dict-jargon wordnet-base fortunes fortunes-min manpages manpages-dev man-db groff-base
    python scripts/build_domains.py [--out data/domains] [--only code,algebra]

If a needed Debian file is missing the script prints the exact apt-get command
and exits with status 2.  Output depends only on the seed, the Debian package
versions and the CPython version (all recorded in manifest.json).
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
import sysconfig
import tokenize
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

SEED = 20240611
N_TRAIN = 2000
N_EVAL = 200
MAX_PROMPT = 300
MIN_RESPONSE = 40
MAX_RESPONSE = 500

DOMAINS = [
    "code", "scripture", "dictionary", "thesaurus", "jargon",
    "quotes", "manpages", "arithmetic", "algebra",
]
GENERATED = {"arithmetic", "algebra"}

# Debian packages each domain needs, and files whose presence is checked.
APT_PACKAGES = {
    "scripture": ["bible-kjv", "bible-kjv-text"],
    "dictionary": ["dict-gcide"],
    "thesaurus": ["wordnet-base"],
    "jargon": ["dict-jargon"],
    "quotes": ["fortunes", "fortunes-min"],
    "manpages": ["manpages", "manpages-dev", "man-db", "groff-base"],
}
REQUIRED_FILES = {
    "scripture": ["/usr/bin/bible", "/usr/lib/bible.data"],
    "dictionary": ["/usr/share/dictd/gcide.dict.dz", "/usr/share/dictd/gcide.index"],
    "thesaurus": [f"/usr/share/wordnet/{k}.{p}" for k in ("data", "index")
                  for p in ("noun", "verb", "adj", "adv")],
    "jargon": ["/usr/share/dictd/jargon.dict.dz", "/usr/share/dictd/jargon.index"],
    "quotes": ["/usr/share/games/fortunes/wisdom", "/usr/share/games/fortunes/literature"],
    "manpages": ["/usr/bin/man", "/usr/bin/groff", "/usr/share/man/man2/open.2.gz",
                 "/usr/share/man/man7/signal.7.gz"],
}

FORTUNE_FILES = ["art", "computers", "cookie", "education", "food", "fortunes", "goedel",
                 "humorists", "law", "literature", "love", "magic", "medicine", "miscellaneous",
                 "news", "paradoxum", "people", "pets", "platitudes", "politics", "science",
                 "sports", "wisdom", "work"]

SOURCE_INFO = {
    "code": {
        "upstream": "CPython standard library (Lib/ of the interpreter running this script)",
        "licence": "PSF License Agreement (Python Software Foundation License)",
        "construction": (
            "Every def/async def in the stdlib (skipping test/tests dirs, idlelib, lib2to3, "
            "turtledemo, encodings, site-packages; files with tabs), parsed with ast. Prompt = a comment naming the module "
            "(and class), the def line(s) and the docstring (first line only if the full one "
            "would exceed 300 chars). Response = the body without the docstring, dedented to the "
            "def; only bodies of 80-500 characters."),
    },
    "scripture": {
        "upstream": "King James Version (1611/1769) as distributed in the Bible Retrieval System "
                    "(Chip Chapin); text read with the `bible` program of Debian bible-kjv",
        "licence": "Public domain (KJV text); BRS data file: unrestricted use (see package copyright)",
        "construction": (
            "Whole Bible dumped with `bible -l5000 Genesis1:1-Revelation22:21`. Prompt = "
            "'<Book> <chapter>:<verse> (King James Version)' and 'Preceding verse: <text>' (the "
            "preceding verse is cut from the front to fit 300 chars). Response = the verse "
            "(verses under 40 chars dropped). Split grouped by book+chapter, so a verse used as "
            "context never sits in the other split's chapter."),
    },
    "dictionary": {
        "upstream": "GNU Collaborative International Dictionary of English 0.48 (Webster's "
                    "Revised Unabridged 1913 + supplements), ftp.gnu.org/gnu/gcide",
        "licence": "GPL-2.0-or-later",
        "construction": (
            "dictd index + dictzip data parsed with Python gzip. Only entries whose own headword "
            "is a single plain word; pronunciation, etymology, citations, quotations, source tags "
            "and WordNet-derived senses removed; character escapes ([ae], ['e], ...) turned into "
            "ASCII; cross-reference braces dropped. Prompt = 'Define: <word> (<part of speech>)', "
            "response = the (numbered) Webster 1913 senses up to the first phrase/synonym block; "
            "labels such as [Obs.] kept. Split grouped by headword."),
    },
    "thesaurus": {
        "upstream": "Princeton WordNet 3.0, wordnet.princeton.edu",
        "licence": "WordNet 3.0 license (permissive, BSD-like)",
        "construction": (
            "index.<pos>/data.<pos> parsed directly. Prompt = 'Thesaurus: <lemma> (<pos>)'. "
            "Response = up to the first four senses as a structured listing: synonyms, meaning "
            "(gloss without examples), broader terms (hypernyms), similar terms (adjectives), "
            "opposites (antonyms), one example; cut at a line boundary. Only lemmas with at "
            "least one synonym or antonym. Split grouped by lemma."),
    },
    "jargon": {
        "upstream": "The Jargon File 4.4.7 (Eric S. Raymond), catb.org/jargon",
        "licence": "Public domain",
        "construction": (
            "dictd jargon database parsed with Python gzip. Prompt = 'Hacker jargon: <term>', "
            "response = the entry text (pronunciation line removed, cross-reference braces "
            "dropped, typographic quotes made ASCII), cut at a sentence boundary; entries with "
            "box-drawn tables skipped. The source has only ~2150 usable entries, so this domain "
            "is slightly below the 2000/200 target."),
    },
    "quotes": {
        "upstream": "fortune-mod 1.99.1 cookie files (Ken Arnold et al.; the 'cookie' file from "
                    "Karl Lehenbauer's alt.sources postings)",
        "licence": ("Distributed in Debian main with fortune-mod under its BSD licence "
                    "(Regents of the University of California, advertising clause deleted; see "
                    "/usr/share/doc/fortunes/copyright). Individual entries are short quotations, many from "
                    "public-domain authors; third-party quotation rights are not separately "
                    "documented upstream. Files of song lyrics, TV/novel quotes (startrek, "
                    "pratchett, zippy, songs-poems), offensive-leaning, IRC-log and ASCII-art "
                    "files are excluded."),
        "construction": (
            "Cookie files used: " + ", ".join(FORTUNE_FILES) + ". Files split on '%'; overstrike "
            "sequences and the few entries with mojibake removed. Prompt = 'Fortune (<file>), "
            "<attribution>: \"<first four words> ...\"' (attribution only when the fortune has "
            "a '-- ...' line); response = the full fortune text without the attribution line; "
            "only fortunes of 40-500 chars (no truncation)."),
    },
    "manpages": {
        "upstream": "Linux man-pages project 6.03 (kernel.org/doc/man-pages)",
        "licence": ("Mixed free licences per page (Linux-man-pages-copyleft 'verbatim', "
                    "GPL-2+, BSD variants, MIT); see /usr/share/doc/manpages/copyright"),
        "construction": (
            "Real (non-.so, non-symlink) pages owned by manpages/manpages-dev rendered with "
            "`man --nh --nj -P cat` (MANWIDTH=2000, C.UTF-8), normalised to ASCII. Prompt = "
            "'man <section> <name> -- <SECTION>' plus the NAME line; response = the start of "
            "that section (DESCRIPTION preferred; also RETURN VALUE, ERRORS, NOTES, BUGS, "
            "VERSIONS, OPTIONS, CAVEATS, ENVIRONMENT to reach the target size). Split grouped "
            "by page."),
    },
    "arithmetic": {
        "upstream": "Procedurally generated by scripts/build_domains.py (seeded)",
        "licence": "Same as this repository",
        "construction": (
            "Random integer expressions (3-5 operators, exact division) reduced one operation per "
            "step, percentage problems, and templated multi-step word problems (shopping, "
            "travel, sharing, saving, stock), each with a step-by-step solution and the answer."),
    },
    "algebra": {
        "upstream": "Procedurally generated by scripts/build_domains.py (seeded)",
        "licence": "Same as this repository",
        "construction": (
            "Linear equations with integer solutions (two-step, variable on both sides, "
            "brackets, fractions) and 2x2 linear systems solved by elimination, each with "
            "worked steps and a check."),
    },
}


# --------------------------------------------------------------------------- #
# generic helpers
# --------------------------------------------------------------------------- #

PUNCT_MAP = {
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2033": '"',
    "\u2014": "--", "\u2013": "-", "\u2010": "-", "\u2011": "-", "\u2012": "-",
    "\u2212": "-", "\u2026": "...", "\u00a0": " ", "\u2022": "*", "\u00b7": "*",
    "\u00ad": "", "\u200b": "", "\ufeff": "", "\u2002": " ", "\u2003": " ",
    "\u2009": " ", "\u00d7": "x", "\u2192": "->", "\u2190": "<-", "\u2264": "<=",
    "\u2265": ">=", "\u2260": "!=", "\u00ab": '"', "\u00bb": '"', "\u27e8": "<",
    "\u27e9": ">", "\u00b4": "'", "\u25a1": "*", "\u25aa": "*", "\u25cf": "*",
}
_BOX = re.compile("[\u2500-\u257f]")
_PUNCT_RE = re.compile("|".join(map(re.escape, PUNCT_MAP)))


def ascii_punct(s: str) -> str:
    """Typographic punctuation -> ASCII; NFC; drop control characters except \\n."""
    s = unicodedata.normalize("NFC", s)
    s = _PUNCT_RE.sub(lambda m: PUNCT_MAP[m.group(0)], s)
    s = s.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    return "".join(ch for ch in s if ch == "\n" or unicodedata.category(ch)[0] != "C")


def squash(s: str) -> str:
    """Collapse all whitespace (including newlines) to single spaces."""
    return re.sub(r"\s+", " ", s).strip()


def tidy_lines(s: str) -> str:
    """Strip trailing spaces, collapse runs of spaces inside lines and blank lines."""
    lines = [re.sub(r"(?<=\S) {2,}", " ", ln.rstrip()) for ln in s.split("\n")]
    out: list[str] = []
    for ln in lines:
        if not ln.strip() and (not out or not out[-1].strip()):
            continue
        out.append(ln)
    while out and not out[-1].strip():
        out.pop()
    return "\n".join(out)


_SENT_END = re.compile(r"[.!?;:][\"')\]]*(?=\s)|\n")
_ABBREV = {"esp", "syn", "prob", "etc", "cf", "vs", "eg", "ie", "orig", "abbr", "fig", "obs",
           "adj", "adv", "vt", "vi", "usu", "approx", "ca", "mr", "mrs", "dr", "st", "no",
           "pl", "pp", "ch", "vol", "interj", "prep", "conj", "lit", "viz", "al"}


def _good_cut(s: str, end: int) -> bool:
    """Is s[:end] a sensible place to stop (not after '2.' or an abbreviation)?"""
    if s[end - 1] == "\n" or s[:end].endswith("\n"):
        prev = s[:end].rstrip("\n").rsplit("\n", 1)[-1].strip()
        return len(prev) >= 15
    m = re.search(r"([A-Za-z0-9.]+)[.!?;:][\"')\]]*$", s[:end])
    word = (m.group(1) if m else "").replace(".", "").lower()
    if s[end - 1] == "." or s[:end].rstrip("\"')]").endswith("."):
        if len(word) < 3 or word in _ABBREV or word.isdigit():
            return False
    line = s[:end].rsplit("\n", 1)[-1].strip()
    return len(line) >= 15


def truncate(s: str, limit: int = MAX_RESPONSE) -> str:
    """Cut ``s`` to at most ``limit`` chars at a sentence or line boundary."""
    s = s.strip()
    if len(s) <= limit:
        return s
    head = s[: limit + 1]
    cuts = [m.end() for m in _SENT_END.finditer(head) if m.end() <= limit]
    cuts = [c for c in cuts if c >= MIN_RESPONSE and _good_cut(s, c)]
    if cuts:
        return s[: cuts[-1]].rstrip()
    # fall back to a word boundary
    cut = head[: limit - 4].rsplit(" ", 1)[0]
    return cut.rstrip(" ,;:") + " ..."


def norm_key(s: str) -> str:
    """Normalisation used for de-duplication."""
    return re.sub(r"[^0-9a-z]+", "", s.lower())


def h(*parts: object) -> str:
    return hashlib.sha256(":".join(map(str, parts)).encode("utf-8")).hexdigest()


def sha256_file(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def pkg_version(pkg: str) -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg],
                             capture_output=True, text=True, check=True).stdout.strip()
        return out or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cand(prompt: str, response: str, group: str | None = None, priority: int = 0) -> dict:
    return {"prompt": prompt, "response": response, "group": group, "priority": priority}


# --------------------------------------------------------------------------- #
# dictd (.index + .dict.dz) reader
# --------------------------------------------------------------------------- #

_B64 = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _b64num(s: str) -> int:
    v = 0
    for c in s:
        v = v * 64 + _B64[c]
    return v


def read_dictd(name: str) -> list[tuple[str, str]]:
    """Return [(index headword, entry text)] for unique entries, in file order."""
    data = gzip.open(f"/usr/share/dictd/{name}.dict.dz").read()
    seen: set[tuple[int, int]] = set()
    out = []
    with open(f"/usr/share/dictd/{name}.index", encoding="utf-8") as fh:
        rows = [ln.rstrip("\n").split("\t") for ln in fh if ln.strip()]
    for row in rows:
        if len(row) < 3 or row[0].startswith("00-database") or row[0].startswith("00database"):
            continue
        off, ln = _b64num(row[1]), _b64num(row[2])
        if (off, ln) in seen:
            continue
        seen.add((off, ln))
        out.append((row[0], data[off: off + ln].decode("utf-8", "replace")))
    return out


# --------------------------------------------------------------------------- #
# 1. code
# --------------------------------------------------------------------------- #

CODE_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages",
                  "__pycache__", "turtledemo", "lib-dynload", "encodings"}


def build_code() -> list[dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in CODE_SKIP_DIRS and not d.startswith("config-"))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    files.sort()
    out = []
    for path in files:
        rel = path.relative_to(root)
        try:
            with tokenize.open(path) as fh:
                src = fh.read()
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if "\t" in src:
            continue
        lines = src.splitlines()
        module = ".".join(rel.with_suffix("").parts)
        if module.endswith(".__init__"):
            module = module[: -len(".__init__")]

        def visit(node, cls):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.ClassDef):
                    visit(child, child.name)
                elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    pair = code_pair(child, lines, src, module, cls)
                    if pair:
                        out.append(pair)
                    visit(child, cls)
                else:
                    visit(child, cls)

        visit(tree, None)
    return out


def code_pair(node, lines, src, module, cls):
    body = node.body
    if not body or body[0].lineno == node.lineno:
        return None
    col = node.col_offset

    def dedent(ls):
        res = []
        for ln in ls:
            strip = len(ln) - len(ln.lstrip(" "))
            res.append(ln[min(strip, col):].rstrip())
        return res

    header = dedent(lines[node.lineno - 1: body[0].lineno - 1])
    # the header must really be the def line(s) (no comments/decorators in between)
    if not header or not header[0].lstrip().startswith(("def ", "async def ")):
        return None
    doc = ast.get_docstring(node, clean=False)
    if doc is not None:
        dnode = body[0]
        rest = body[1:]
        if not rest or rest[0].lineno == dnode.end_lineno:
            return None
        doc_lines = dedent(lines[dnode.lineno - 1: dnode.end_lineno])
        body_lines = dedent(lines[dnode.end_lineno: node.end_lineno])
    else:
        doc_lines = []
        body_lines = dedent(lines[body[0].lineno - 1: node.end_lineno])
    while body_lines and not body_lines[0].strip():
        body_lines.pop(0)
    response = tidy_code("\n".join(body_lines))
    if not response.startswith("    ") or "\x0c" in response:
        return None
    if not (80 <= len(response) <= 500):
        return None
    where = f"# Python standard library: {module}" + (f", class {cls}" if cls else "")
    prompt = "\n".join([where] + header + doc_lines)
    if len(prompt) > MAX_PROMPT and doc is not None:
        first = doc.strip().split("\n")[0].strip().replace('"""', "'''")
        indent = doc_lines[0][: len(doc_lines[0]) - len(doc_lines[0].lstrip())]
        prompt = "\n".join([where] + header + [f'{indent}"""{first}"""'])
    if len(prompt) > MAX_PROMPT:
        return None
    name = f"{module}.{cls + '.' if cls else ''}{node.name}"
    return cand(prompt, response, group=name)


def tidy_code(s: str) -> str:
    lines = [ln.rstrip() for ln in s.split("\n")]
    out = []
    for ln in lines:  # at most one blank line in a row
        if not ln and out and not out[-1]:
            continue
        out.append(ln)
    return "\n".join(out).strip("\n")


# --------------------------------------------------------------------------- #
# 2. scripture
# --------------------------------------------------------------------------- #

def build_scripture() -> list[dict]:
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "COLUMNS": "5000"}
    txt = subprocess.run(["bible", "-l5000", "Genesis1:1-Revelation22:21"], env=env,
                         capture_output=True, check=True).stdout.decode("utf-8", "replace")
    verses = []  # (book, chapter, verse, text)
    book, chap = None, None
    for ln in txt.split("\n"):
        if not ln.strip():
            continue
        m = re.match(r"^\s+(\d+) (.*)$", ln)
        if m and book is not None:
            verses.append((book, chap, int(m.group(1)), squash(m.group(2))))
            continue
        m = re.match(r"^(\S.*) (\d+)$", ln.strip())
        if m and not ln.startswith(" "):
            book, chap = m.group(1), int(m.group(2))
            continue
        raise RuntimeError(f"unexpected line in bible output: {ln!r}")
    if len(verses) < 31000:
        raise RuntimeError(f"only {len(verses)} verses read from `bible`")
    out = []
    for i in range(1, len(verses)):
        book, chap, vno, text = verses[i]
        prev = verses[i - 1][3]
        head = f"{book} {chap}:{vno} (King James Version)\nPreceding verse: "
        room = MAX_PROMPT - len(head)
        if len(prev) > room:
            tail = prev[-(room - 4):]
            tail = tail[tail.find(" ") + 1:] if " " in tail else tail
            prev = "... " + tail
        out.append(cand(head + prev, truncate(ascii_punct(text)), group=f"{book} {chap}"))
    return out


# --------------------------------------------------------------------------- #
# 3. dictionary (GCIDE)
# --------------------------------------------------------------------------- #

_GCIDE_NAMED = {
    "ae": "ae", "AE": "AE", "oe": "oe", "OE": "OE", "imac": "i", "asl": "a", "add": "a",
    "udd": "u", "eth": "th", "thorn": "th", "ng": "ng", "deg": " degrees", "root": "",
    "sect": "section ", "pounds": "pounds ", "yogh": "y", "dsdot": "d", "bar": "",
    "break": "", "crescent": "", "bprime": "", "prime": "'", "frac12": "1/2", "frac14": "1/4",
    "frac34": "3/4", "frac13": "1/3", "frac23": "2/3", "cre": "", "hand": "", "ldquo": '"',
    "rdquo": '"', "lsquo": "'", "rsquo": "'", "mdash": "--", "ndash": "-", "Sec": "section ",
}
_GREEK = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
          "pi rho sigma tau upsilon phi chi psi omega").split()


def _gcide_char(m: re.Match) -> str:
    tok = m.group(1)
    if tok in _GCIDE_NAMED:
        return _GCIDE_NAMED[tok]
    if tok.lower() in _GREEK:
        return tok
    mm = re.fullmatch(r"[=\-^'`\"~.,*]?([a-zA-Z]{1,2})\^?", tok)
    if mm:
        return mm.group(1)
    mm = re.fullmatch(r"([a-zA-Z])(?:um|uml|acute|grave|circ|tilde|cedil|ring|mac|sl|dd)",
                      tok)
    if mm:
        return mm.group(1)
    return m.group(0)


def gcide_chars(s: str) -> str:
    return re.sub(r"\[([^\[\]\s]{1,8})\]", _gcide_char, s)


_SOURCE_TAG = re.compile(r"\[(?:1913 Webster|Webster 1913 Suppl\.|PJC|RDH|RHUD|MI11|"
                         r"Century Dict\.|Chambers[^\]]*|Webster[^\]]*|[A-Z]{2,5}\.?)"
                         r"(?:\s*\+\s*[A-Z]+\.?)*\]")


def _strip_brackets(s: str) -> str:
    """Remove leading [...] groups (etymology / inflection), respecting nesting."""
    s = s.lstrip(" ,;")
    while s.startswith("["):
        depth = 0
        for i, ch in enumerate(s):
            depth += ch == "["
            depth -= ch == "]"
            if depth == 0:
                s = s[i + 1:].lstrip(" ,;")
                break
        else:
            return ""
    return s


def gcide_entry(word: str, text: str):
    first = text.split("\n", 1)[0]
    m = re.match(r"^([A-Za-z][A-Za-z'-]*) \\", first)
    if not m or m.group(1).lower() != word.lower():
        return None
    headword = gcide_chars(m.group(1))
    blocks = re.split(r"\n\s*\n", text.strip("\n"))
    # ---- header: first lines of block 0 until brackets are balanced
    lines0 = blocks[0].split("\n")
    depth, hdr_end = 0, len(lines0)
    for i, ln in enumerate(lines0):
        if i > 0 and depth == 0 and not ln.lstrip().startswith(("[", "(")):
            hdr_end = i
            break
        depth += ln.count("[") - ln.count("]")
    header = " ".join(x.strip() for x in lines0[:hdr_end])
    first_def = "\n".join(lines0[hdr_end:])
    # grammar: text after the last pronunciation backslash, before the first '['
    after = header.rsplit("\\", 1)[-1] if header.count("\\") >= 2 else ""
    after = re.sub(r"^\s*\([^)]*\)", "", after)  # respelled pronunciation
    gram = squash(after.split("[", 1)[0]).strip(" ,;")
    gram = re.sub(r"[{}]", "", gcide_chars(gram))
    label = ""
    lm = re.search(r"\s*\(([A-Z][A-Za-z. &]*)\)\s*$", gram)
    if lm:  # field label such as (Anat.) written before the etymology
        label, gram = f"({lm.group(1)}) ", gram[: lm.start()].strip(" ,;")
    if "\\" in gram or len(gram) > 60 or "?" in gram:
        gram = ""
    tail = _strip_brackets(after.split("[", 1)[1] if "[" in after else "")
    lm = re.match(r"^\(([A-Z][A-Za-z. &]*)\)", tail.strip())
    if lm and not label:
        label = f"({lm.group(1)}) "
    blocks = ([first_def] if first_def.strip() else []) + blocks[1:]
    senses = []
    for b in blocks:
        bl = b.split("\n")
        lead = len(bl[0]) - len(bl[0].lstrip())
        s = bl[0].strip()
        if lead > 6:  # quotation block
            continue
        if s.startswith(("{", "Syn.", "Syn:", "Note:", "--", "[")):
            if s.startswith(("{", "Syn")):
                break  # phrase sub-entries / synonym discussion follow
            continue
        if "[WordNet" in b or not re.search(r"\[(?:1913 Webster|Webster 1913 Suppl)", b):
            continue  # keep Webster senses only (WordNet glosses belong to the thesaurus)
        body = squash(" ".join(x.strip() for x in bl))
        body = _SOURCE_TAG.sub("", body)
        body = re.sub(r"\s--\s?[A-Z][^;]*$", "", body)  # trailing citation (--Shak.)
        body = re.sub(r"\s--\s?[A-Z][\w. ,&']{0,40}$", "", body)
        body = gcide_chars(body)
        body = re.sub(r"\{([^{}]*)\}", r"\1", body)
        body = re.sub(r"\{([^{}]*)\}", r"\1", body)
        body = squash(body)
        if not body or "?" * 2 in body or "\\" in body or "{" in body or "}" in body:
            continue
        if re.search(r"\[[a-z=\-^'`\"~.*]{1,6}\]", body):  # unknown char escape
            continue
        senses.append(body)
    if not senses:
        return None
    resp = label + "\n".join(senses)
    resp = ascii_punct(resp)
    if len(resp) < MIN_RESPONSE or "[" in resp.replace("[Obs.]", "").replace("[R.]", "") \
            and re.search(r"\[[^\]]*\d", resp):
        return None
    prompt = f"Define: {headword}" + (f" ({gram})" if gram else "")
    return cand(prompt, truncate(resp), group=headword.lower())


def build_dictionary() -> list[dict]:
    out = []
    for word, text in read_dictd("gcide"):
        if not re.fullmatch(r"[A-Za-z][a-z]+(?:['-][a-z]+)*", word):
            continue
        c = gcide_entry(word, text)
        if c:
            out.append(c)
    return out


# --------------------------------------------------------------------------- #
# 4. thesaurus (WordNet)
# --------------------------------------------------------------------------- #

WN_POS = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
WN_NAME = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


def _wn_word(w: str) -> str:
    return re.sub(r"\([a-z]+\)$", "", w).replace("_", " ")


def load_wordnet():
    synsets = {}  # (pos, offset) -> dict
    for fname, pos in WN_POS.items():
        with open(f"/usr/share/wordnet/data.{fname}", encoding="utf-8", errors="replace") as fh:
            for ln in fh:
                if ln.startswith("  "):
                    continue
                left, _, gloss = ln.partition(" | ")
                f = left.split()
                off, ss_type, wcnt = f[0], f[2], int(f[3], 16)
                words = [_wn_word(f[4 + 2 * i]) for i in range(wcnt)]
                i = 4 + 2 * wcnt
                pcnt = int(f[i])
                ptrs = []
                for k in range(pcnt):
                    sym, toff, tpos, st = f[i + 1 + 4 * k: i + 5 + 4 * k]
                    ptrs.append((sym, toff, "a" if tpos == "s" else tpos, int(st[:2], 16),
                                 int(st[2:], 16)))
                synsets[(pos, off)] = {"words": words, "ptrs": ptrs, "gloss": gloss.strip(),
                                       "type": ss_type}
    index = []
    for fname, pos in WN_POS.items():
        with open(f"/usr/share/wordnet/index.{fname}", encoding="utf-8", errors="replace") as fh:
            for ln in fh:
                if ln.startswith("  "):
                    continue
                f = ln.split()
                lemma, scnt, pcnt = f[0], int(f[2]), int(f[3])
                tagged = int(f[4 + pcnt + 1])
                offs = f[4 + pcnt + 2:][:scnt]
                index.append((lemma, pos, offs, tagged))
    return synsets, index


def build_thesaurus() -> list[dict]:
    synsets, index = load_wordnet()
    out = []
    for lemma, pos, offs, tagged in index:
        if not re.fullmatch(r"[a-z]+(?:[_-][a-z]+)?", lemma):
            continue
        word = lemma.replace("_", " ")
        lines, any_syn = [], False
        for n, off in enumerate(offs[:4], 1):
            ss = synsets[(pos, off)]
            syn = [w for w in ss["words"] if w.lower() != word]
            try:
                widx = [w.lower() for w in ss["words"]].index(word) + 1
            except ValueError:
                widx = 0
            gloss = ss["gloss"]
            defn, _, examples = gloss.partition('; "')
            defn = defn.strip().rstrip(";")
            example = examples.split('"')[0].strip() if examples else ""
            broader, similar, opposite = [], [], []
            for sym, toff, tpos, src, tgt in ss["ptrs"]:
                target = synsets.get((tpos, toff))
                if target is None:
                    continue
                if sym in ("@", "@i"):
                    broader.append(target["words"][0])
                elif sym == "&":
                    similar.append(target["words"][0])
                elif sym == "!" and (src == 0 or src == widx):
                    opposite.append(target["words"][tgt - 1] if tgt else target["words"][0])
            any_syn |= bool(syn or opposite)
            block = [f"{n}. synonyms: {', '.join(syn[:6]) if syn else '(none)'}",
                     f"   meaning: {defn}"]
            if broader:
                block.append(f"   broader: {', '.join(broader[:3])}")
            if similar:
                block.append(f"   similar: {', '.join(similar[:4])}")
            if opposite:
                block.append(f"   opposite: {', '.join(opposite[:3])}")
            if example and n == 1:
                block.append(f"   example: {example}")
            lines.extend(block)
        if not any_syn:
            continue
        text = ascii_punct("\n".join(lines))
        if len(text) > MAX_RESPONSE:  # cut at a line boundary
            keep = []
            for ln in text.split("\n"):
                if len("\n".join(keep + [ln])) > MAX_RESPONSE:
                    break
                keep.append(ln)
            text = "\n".join(keep)
        if len(text) < MIN_RESPONSE:
            continue
        # lemmas attested in the sense-tagged corpus (common words) are preferred
        out.append(cand(f"Thesaurus: {word} ({WN_NAME[pos]})", text, group=word,
                        priority=0 if tagged > 0 else 1))
    return out


# --------------------------------------------------------------------------- #
# 5. jargon
# --------------------------------------------------------------------------- #

def jargon_text(s: str) -> str:
    s = unicodedata.normalize("NFC", s)
    s = re.sub(r"([\u201c\u2018])\s+", r"\1", s)      # opening quote split from its word
    s = re.sub(r"\s+([\u201d\u2019])", r"\1", s)
    s = re.sub(r"\{\s*([^{}]*?)\s*\}", lambda m: squash(m.group(1)), s)
    return ascii_punct(s)


def build_jargon() -> list[dict]:
    out = []
    for word, text in read_dictd("jargon"):
        lines = text.split("\n")
        term = lines[0].strip()
        if term.lower() != word.lower():
            continue
        rest = lines[1:]
        if rest and re.match(r"^\s*/.*/\s*(?:,.*)?$", rest[0]):  # pronunciation
            rest = rest[1:]
        paras = [squash(p) for p in re.split(r"\n\s*\n", "\n".join(rest)) if p.strip()]
        paras = [p for p in paras if not re.fullmatch(r"\[[^\]]*\]", p)]  # usage tags only
        merged: list[str] = []
        for p in paras:  # a lone part-of-speech paragraph ('n.', 'adj.') joins the next one
            if merged and re.fullmatch(r"(?:\d+\. )?[a-z]{1,6}\.(?:,? (?:[a-z]{1,6}\.|also))*",
                                       merged[-1]):
                merged[-1] = merged[-1] + " " + p
            else:
                merged.append(p)
        paras = merged
        if any(_BOX.search(p) for p in paras):  # box-drawn tables do not survive as text
            continue
        body = jargon_text("\n".join(paras))
        body = "\n".join(squash(p) for p in body.split("\n"))
        if len(body) < MIN_RESPONSE:
            continue
        prompt = f"Hacker jargon: {jargon_text(term)}"
        out.append(cand(prompt, truncate(body)))
    return out


# --------------------------------------------------------------------------- #
# 6. quotes (fortunes)
# --------------------------------------------------------------------------- #


def build_quotes() -> list[dict]:
    out = []
    for name in FORTUNE_FILES:
        raw = Path(f"/usr/share/games/fortunes/{name}").read_bytes().decode("utf-8", "replace")
        raw = re.sub(r".\x08", "", raw)  # overstrike
        for chunk in re.split(r"^%\s*$", raw, flags=re.M):
            if re.search("[\u00c2\u00c3\u00e2][\u0080-\u00bf\u00e2]|\ufffd", chunk):
                continue  # mojibake (double-encoded UTF-8) in a few cookie files
            text = ascii_punct(chunk)
            lines = [ln.rstrip() for ln in text.split("\n")]
            while lines and not lines[0].strip():
                lines.pop(0)
            while lines and not lines[-1].strip():
                lines.pop()
            if not lines:
                continue
            author = ""
            # attribution: trailing line(s) starting with '--'
            for k in range(len(lines) - 1, max(len(lines) - 4, 0), -1):
                if re.match(r"^\s*--+\s*\S", lines[k]):
                    author = squash(" ".join(lines[k:]).lstrip(" -"))
                    lines = lines[:k]
                    break
            while lines and not lines[-1].strip():
                lines.pop()
            if not lines:
                continue
            ind = min(len(x) - len(x.lstrip()) for x in lines if x.strip())
            body = tidy_lines("\n".join(x[ind:] for x in lines))
            if not (MIN_RESPONSE <= len(body) <= MAX_RESPONSE):
                continue
            if len(author) > 80:
                author = author[:80].rsplit(" ", 1)[0] + " ..."
            words = squash(body).split(" ")
            opening = " ".join(words[:4]) + (" ..." if len(words) > 4 else "")
            prompt = f"Fortune ({name})" + (f", {author}" if author else "") + f': "{opening}"'
            if len(prompt) > MAX_PROMPT:
                continue
            out.append(cand(prompt, body))
    return out


# --------------------------------------------------------------------------- #
# 7. manpages
# --------------------------------------------------------------------------- #

MAN_SECTIONS = ["DESCRIPTION", "RETURN VALUE", "ERRORS", "NOTES", "BUGS", "VERSIONS",
                "OPTIONS", "CAVEATS", "ENVIRONMENT"]


def _man_files() -> list[Path]:
    files = set()
    for pkg in ("manpages", "manpages-dev"):
        out = subprocess.run(["dpkg-query", "-L", pkg], capture_output=True, text=True,
                             check=True).stdout
        for ln in out.split("\n"):
            if re.fullmatch(r"/usr/share/man/man\d/[^/]+\.gz", ln):
                p = Path(ln)
                if p.is_symlink() or not p.exists():
                    continue
                with gzip.open(p, "rt", encoding="utf-8", errors="replace") as fh:
                    head = fh.read(4000)
                if re.search(r"^\.so\s", head, re.M) and len(head.strip().split("\n")) < 5:
                    continue
                files.add(p)
    return sorted(files)


def _render_man(p: Path) -> str:
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "MANWIDTH": "2000",
           "MAN_DISABLE_SECCOMP": "1", "HOME": "/nonexistent"}
    r = subprocess.run(["man", "--nh", "--nj", "-P", "cat", "-l", str(p)], env=env,
                       capture_output=True)
    return r.stdout.decode("utf-8", "replace")


def build_manpages() -> list[dict]:
    files = _man_files()
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as ex:
        rendered = list(ex.map(_render_man, files))
    out = []
    for p, txt in zip(files, rendered):
        m = re.fullmatch(r"(.+)\.(\d\w*)\.gz", p.name)
        if not m or not txt.strip():
            continue
        name, sec = m.group(1), m.group(2)
        sections: dict[str, list[str]] = {}
        cur = None
        for ln in ascii_punct(txt).split("\n")[1:]:
            if re.fullmatch(r"[A-Z][A-Z0-9 ,/()-]*", ln.rstrip()) and not ln.startswith(" "):
                cur = ln.strip()
                sections.setdefault(cur, [])
                continue
            if re.match(r"^ {3}\S", ln):  # sub-section heading: not part of the prose
                continue
            if cur is not None and ln.strip() and not re.match(r"^\S.*\s{5,}\S+\(\d\w*\)$", ln):
                sections[cur].append(ln.strip())
        name_line = squash(" ".join(sections.get("NAME", [])))
        if not name_line:
            continue
        if len(name_line) > 160:
            name_line = name_line[:160].rsplit(" ", 1)[0] + " ..."
        for rank, secname in enumerate(MAN_SECTIONS):
            body = sections.get(secname)
            if not body:
                continue
            for k, b in enumerate(body):  # stop before box-drawn tables
                if _BOX.search(b):
                    body = body[:k]
                    if body and not re.search(r"[.:;!?)]$", body[-1]):
                        body = body[:-1]  # the table's header row
                    break
            if not body:
                continue
            text = "\n".join(re.sub(r" {2,}", " ", b) for b in body)
            text = text.replace("*", "-") if text.startswith("*") else text
            if len(text) < MIN_RESPONSE:
                continue
            prompt = f"man {sec} {name} -- {secname}\nNAME: {name_line}"
            out.append(cand(prompt, truncate(text), group=f"{name}.{sec}",
                            priority=0 if rank == 0 else 2 if secname == "VERSIONS" else 1))
    return out


# --------------------------------------------------------------------------- #
# 8. arithmetic (generated)
# --------------------------------------------------------------------------- #

class Num:
    def __init__(self, v):
        self.v = v


class Op:
    PREC = {"+": 1, "-": 1, "*": 2, "/": 2}

    def __init__(self, op, a, b):
        self.op, self.a, self.b = op, a, b


def ev(n):
    if isinstance(n, Num):
        return n.v
    a, b = ev(n.a), ev(n.b)
    return {"+": a + b, "-": a - b, "*": a * b, "/": Fraction(a) / b if b else None}[n.op]


def show(n, parent_prec=0, right=False):
    if isinstance(n, Num):
        return str(n.v) if n.v >= 0 else f"({n.v})"
    p = Op.PREC[n.op]
    s = f"{show(n.a, p)} {n.op} {show(n.b, p, True)}"
    if p < parent_prec or (right and p == parent_prec):
        s = f"({s})"
    return s


def reduce_once(n):
    """Evaluate the first reducible operation in post-order; return (tree, description)."""
    if isinstance(n, Num):
        return n, None
    if isinstance(n.a, Num) and isinstance(n.b, Num):
        v = ev(n)
        return Num(int(v)), f"{show(n.a)} {n.op} {show(n.b)} = {int(v)}"
    if not isinstance(n.a, Num):
        a, d = reduce_once(n.a)
        return Op(n.op, a, n.b), d
    b, d = reduce_once(n.b)
    return Op(n.op, n.a, b), d


def rand_expr(rng, n_ops):
    if n_ops == 0:
        return Num(rng.randint(2, 30))
    left = rng.randint(0, n_ops - 1)
    op = rng.choice("+-*/")
    node = Op(op, rand_expr(rng, left), rand_expr(rng, n_ops - 1 - left))
    return node


def exact_ok(n):
    """All intermediate values integers with |v| <= 5000 and no division by zero/one."""
    if isinstance(n, Num):
        return True
    if not (exact_ok(n.a) and exact_ok(n.b)):
        return False
    v = ev(n)
    if v is None or Fraction(v).denominator != 1 or abs(v) > 5000:
        return False
    if n.op == "/" and ev(n.b) in (1, -1):
        return False
    if n.op == "*" and 1 in (ev(n.a), ev(n.b)):
        return False
    return True


def gen_expression(rng):
    for _ in range(200):
        e = rand_expr(rng, rng.randint(3, 5))
        if exact_ok(e):
            break
    else:
        return None
    prompt = f"Evaluate step by step: {show(e)}"
    steps, cur, k = [], e, 1
    while not isinstance(cur, Num):
        cur, d = reduce_once(cur)
        line = f"Step {k}: {d}"
        if not isinstance(cur, Num):
            line += f", giving {show(cur)}"
        steps.append(line)
        k += 1
    steps.append(f"Answer: {cur.v}")
    return prompt, "\n".join(steps)


NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Farah", "Gus", "Hana", "Ivan", "Jade", "Kofi",
         "Lena", "Mateo", "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tariq", "Uma",
         "Vera", "Wei", "Yusuf", "Zoe"]
ITEMS = [("notebook", "notebooks"), ("pen", "pens"), ("apple", "apples"), ("ticket", "tickets"),
         ("book", "books"), ("plant", "plants"), ("mug", "mugs"), ("candle", "candles"),
         ("scarf", "scarves"), ("box of tea", "boxes of tea"), ("loaf", "loaves"),
         ("battery", "batteries")]


def gen_word(rng):
    kind = rng.randrange(6)
    who = rng.choice(NAMES)
    if kind == 0:  # shopping with change
        (s1, p1n), (s2, p2n) = rng.sample(ITEMS, 2)
        a, pa, b, pb = rng.randint(2, 9), rng.randint(2, 15), rng.randint(2, 9), rng.randint(2, 15)
        total = a * pa + b * pb
        if total > 200:
            return None
        bill = next(x for x in (20, 50, 100, 200) if x >= total)
        q = (f"{who} buys {a} {p1n} at ${pa} each and {b} {p2n} at ${pb} each, and pays with a "
             f"${bill} bill. How much change does {who} get?")
        s = (f"Step 1: {p1n} cost {a} x {pa} = {a * pa} dollars.\n"
             f"Step 2: {p2n} cost {b} x {pb} = {b * pb} dollars.\n"
             f"Step 3: total = {a * pa} + {b * pb} = {total} dollars.\n"
             f"Step 4: change = {bill} - {total} = {bill - total} dollars.\n"
             f"Answer: ${bill - total}")
    elif kind == 1:  # travel
        v1, t1 = rng.randint(3, 12) * 5, rng.randint(1, 5)
        v2, t2 = rng.randint(3, 12) * 5, rng.randint(1, 4)
        d1, d2 = v1 * t1, v2 * t2
        q = (f"A train travels at {v1} km/h for {t1} hours, then at {v2} km/h for {t2} hours. "
             f"What is the total distance, and what was the average speed?")
        tot_t = t1 + t2
        avg = Fraction(d1 + d2, tot_t)
        avg_s = str(avg.numerator) if avg.denominator == 1 else f"{float(avg):.2f}"
        s = (f"Step 1: first part = {v1} x {t1} = {d1} km.\n"
             f"Step 2: second part = {v2} x {t2} = {d2} km.\n"
             f"Step 3: total distance = {d1} + {d2} = {d1 + d2} km.\n"
             f"Step 4: total time = {t1} + {t2} = {tot_t} h; average speed = {d1 + d2} / {tot_t} "
             f"= {avg_s} km/h.\n"
             f"Answer: {d1 + d2} km at an average of {avg_s} km/h")
    elif kind == 2:  # sharing with remainder
        boxes, per, kids = rng.randint(3, 12), rng.randint(6, 24), rng.randint(3, 9)
        tot = boxes * per
        q = (f"{who} has {boxes} boxes with {per} marbles in each and shares all the marbles "
             f"equally among {kids} friends. How many does each friend get, and how many are left?")
        s = (f"Step 1: total marbles = {boxes} x {per} = {tot}.\n"
             f"Step 2: {tot} / {kids} = {tot // kids} remainder {tot % kids}.\n"
             f"Step 3: check: {kids} x {tot // kids} + {tot % kids} = {tot}.\n"
             f"Answer: {tot // kids} each, {tot % kids} left over")
    elif kind == 3:  # saving
        start, weekly = rng.randint(0, 60), rng.randint(5, 40)
        weeks, spend = rng.randint(3, 15), rng.randint(10, 90)
        saved = weekly * weeks
        end = start + saved - spend
        q = (f"{who} starts with ${start}, saves ${weekly} every week for {weeks} weeks, and then "
             f"spends ${spend} on a gift. How much money is left?")
        s = (f"Step 1: saved = {weekly} x {weeks} = {saved} dollars.\n"
             f"Step 2: after saving = {start} + {saved} = {start + saved} dollars.\n"
             f"Step 3: after the gift = {start + saved} - {spend} = {end} dollars.\n"
             f"Answer: ${end}")
    elif kind == 4:  # stock keeping
        crates, per = rng.randint(4, 20), rng.randint(10, 30)
        sold_days, per_day = rng.randint(2, 6), rng.randint(5, 25)
        stock = crates * per
        sold = sold_days * per_day
        if sold > stock:
            return None
        item = rng.choice(ITEMS)[1]
        q = (f"A shop receives {crates} crates of {per} {item}. It sells {per_day} {item} a day "
             f"for {sold_days} days. How many {item} are left?")
        s = (f"Step 1: received = {crates} x {per} = {stock}.\n"
             f"Step 2: sold = {per_day} x {sold_days} = {sold}.\n"
             f"Step 3: left = {stock} - {sold} = {stock - sold}.\n"
             f"Answer: {stock - sold} {item}")
    else:  # percentages
        base = rng.randint(2, 60) * 20
        pct = rng.choice([5, 10, 15, 20, 25, 30, 40, 50, 60, 75])
        part = base * pct // 100
        up = rng.random() < 0.5
        q = (f"A jacket costs ${base}. Its price is {'raised' if up else 'cut'} by {pct}%. "
             f"What is the new price?")
        s = (f"Step 1: {pct}% of {base} = {base} x {pct} / 100 = {part}.\n"
             f"Step 2: new price = {base} {'+' if up else '-'} {part} = "
             f"{base + part if up else base - part}.\n"
             f"Answer: ${base + part if up else base - part}")
    return q, s


def build_arithmetic() -> list[dict]:
    rng = random.Random(f"{SEED}-arithmetic")
    out, seen = [], set()
    target = (N_TRAIN + N_EVAL) * 2
    tries = 0
    while len(out) < target and tries < 100 * target:
        tries += 1
        r = gen_expression(rng) if rng.random() < 0.5 else gen_word(rng)
        if not r or r[0] in seen:
            continue
        seen.add(r[0])
        out.append(cand(r[0], r[1]))
    return out


# --------------------------------------------------------------------------- #
# 9. algebra (generated)
# --------------------------------------------------------------------------- #

def lin(a, b, v):
    """Format a*v + b."""
    parts = []
    if a:
        parts.append(("" if a == 1 else "-" if a == -1 else str(a)) + v)
    if b or not parts:
        if parts:
            parts.append(f"+ {b}" if b > 0 else f"- {-b}")
        else:
            parts.append(str(b))
    return " ".join(parts)


def term(a, v):
    return ("" if a == 1 else "-" if a == -1 else str(a)) + v


def nz(rng, lo, hi):
    while True:
        x = rng.randint(lo, hi)
        if x:
            return x


def fmt_int(x):
    return str(x) if x >= 0 else f"({x})"


def xy(a, b, rhs):
    """Format a*x + b*y = rhs."""
    return f"{term(a, 'x')} {'+' if b > 0 else '-'} {term(abs(b), 'y')} = {rhs}"


def signed(b):
    return f"+ {b}" if b >= 0 else f"- {-b}"


def gen_algebra(rng):
    kind = rng.randrange(5)
    v = rng.choice("xyznatkm")
    if kind == 0:  # a v + b = c
        a, x, b = nz(rng, -12, 12), rng.randint(-20, 20), nz(rng, -40, 40)
        if abs(a) == 1:
            return None
        c = a * x + b
        q = f"Solve for {v}: {lin(a, b, v)} = {c}"
        s = (f"Step 1: {'subtract ' + str(b) + ' from' if b > 0 else 'add ' + str(-b) + ' to'} "
             f"both sides: {term(a, v)} = {c - b}.\n"
             f"Step 2: divide both sides by {a}: {v} = {x}.\n"
             f"Check: {a}*{fmt_int(x)} {signed(b)} = {c}.\n"
             f"Answer: {v} = {x}")
    elif kind == 1:  # a v + b = c v + d
        a, c = nz(rng, -12, 12), nz(rng, -12, 12)
        if abs(a - c) <= 1:
            return None
        x, b = rng.randint(-15, 15), nz(rng, -30, 30)
        d = a * x + b - c * x
        q = f"Solve for {v}: {lin(a, b, v)} = {lin(c, d, v)}"
        move = f"subtract {term(c, v)} from" if c > 0 else f"add {term(-c, v)} to"
        s = (f"Step 1: {move} both sides: {lin(a - c, b, v)} = {d}.\n"
             f"Step 2: {'subtract ' + str(b) + ' from' if b > 0 else 'add ' + str(-b) + ' to'} "
             f"both sides: {term(a - c, v)} = {d - b}.\n"
             f"Step 3: divide both sides by {a - c}: {v} = {x}.\n"
             f"Check: left side = {a * x + b}, right side = {c * x + d}.\n"
             f"Answer: {v} = {x}")
    elif kind == 2:  # a (v + b) + e = c
        a = rng.randint(2, 9) * rng.choice([1, -1])
        b, x, e = nz(rng, -12, 12), rng.randint(-12, 12), nz(rng, -20, 20)
        c = a * (x + b) + e
        q = f"Solve for {v}: {a}({lin(1, b, v)}) {signed(e)} = {c}"
        s = (f"Step 1: expand the bracket: {lin(a, a * b, v)} {signed(e)} = {c}.\n"
             f"Step 2: combine the constants ({a * b} {signed(e)} = {a * b + e}): "
             f"{lin(a, a * b + e, v)} = {c}.\n"
             f"Step 3: move the constant to the right: {term(a, v)} = {c - a * b - e}.\n"
             f"Step 4: divide both sides by {a}: {v} = {x}.\n"
             f"Check: {a}*({x} {signed(b)}) {signed(e)} = {c}.\n"
             f"Answer: {v} = {x}")
    elif kind == 3:  # v/a + b = c
        a = rng.randint(2, 9)
        x = a * rng.randint(-12, 12)
        b = nz(rng, -20, 20)
        c = x // a + b
        q = f"Solve for {v}: {v}/{a} {signed(b)} = {c}"
        s = (f"Step 1: {'subtract ' + str(b) + ' from' if b > 0 else 'add ' + str(-b) + ' to'} "
             f"both sides: {v}/{a} = {c - b}.\n"
             f"Step 2: multiply both sides by {a}: {v} = {a}*{fmt_int(c - b)} = {x}.\n"
             f"Check: {x}/{a} = {x // a}, and {x // a} {signed(b)} = {c}.\n"
             f"Answer: {v} = {x}")
    else:  # 2x2 system by elimination of y
        x, y = rng.randint(-9, 9), rng.randint(-9, 9)
        a1, b1, a2, b2 = (nz(rng, -7, 7) for _ in range(4))
        det = a1 * b2 - a2 * b1
        if det == 0 or abs(b1) == abs(b2):
            return None
        c1, c2 = a1 * x + b1 * y, a2 * x + b2 * y
        q = f"Solve the system of equations:\n(1) {xy(a1, b1, c1)}\n(2) {xy(a2, b2, c2)}"
        s = (f"Step 1: multiply (1) by {b2} and (2) by {b1} so the y terms match: "
             f"{xy(a1 * b2, b1 * b2, c1 * b2)} and {xy(a2 * b1, b1 * b2, c2 * b1)}.\n"
             f"Step 2: subtract the second from the first: {term(det, 'x')} = "
             f"{c1 * b2 - c2 * b1}, so x = {x}.\n"
             f"Step 3: substitute x = {x} into (1): {a1}*{fmt_int(x)} {signed(b1)[0]} "
             f"{term(abs(b1), 'y')} = {c1}, so {term(b1, 'y')} = {c1 - a1 * x} and y = {y}.\n"
             f"Check (2): {a2}*{fmt_int(x)} {signed(b2)[0]} {abs(b2)}*{fmt_int(y)} = {c2}.\n"
             f"Answer: x = {x}, y = {y}")
    return q, s


def build_algebra() -> list[dict]:
    rng = random.Random(f"{SEED}-algebra")
    out, seen = [], set()
    target = (N_TRAIN + N_EVAL) * 2
    tries = 0
    while len(out) < target and tries < 100 * target:
        tries += 1
        r = gen_algebra(rng)
        if not r or r[0] in seen:
            continue
        seen.add(r[0])
        out.append(cand(r[0], r[1]))
    return out


# --------------------------------------------------------------------------- #
# selection, splitting, writing
# --------------------------------------------------------------------------- #

BUILDERS = {
    "code": build_code, "scripture": build_scripture, "dictionary": build_dictionary,
    "thesaurus": build_thesaurus, "jargon": build_jargon, "quotes": build_quotes,
    "manpages": build_manpages, "arithmetic": build_arithmetic, "algebra": build_algebra,
}


def clean_pair(c: dict) -> dict | None:
    # responses keep leading spaces (code bodies are indented like the def's body)
    p, r = c["prompt"].strip(), c["response"].rstrip().lstrip("\n")
    if "\x00" in p + r or not p or not r:
        return None
    if len(p) > MAX_PROMPT or not (MIN_RESPONSE <= len(r) <= MAX_RESPONSE):
        return None
    return {**c, "prompt": p, "response": r}


def select_and_split(domain: str, cands: list[dict]):
    pairs = [x for x in map(clean_pair, cands) if x]
    # de-duplicate in a seeded order so the survivor does not depend on source order
    pairs.sort(key=lambda c: (c["priority"], h(SEED, domain, "select", c["prompt"])))
    seen_p, seen_r, uniq = set(), set(), []
    for c in pairs:
        kp, kr = norm_key(c["prompt"]), norm_key(c["response"])
        if kp in seen_p or kr in seen_r or not kp or not kr:
            continue
        seen_p.add(kp)
        seen_r.add(kr)
        uniq.append(c)
    n_pool = len(uniq)
    chosen = uniq[: N_TRAIN + N_EVAL]
    n_eval_target = N_EVAL if len(chosen) >= N_TRAIN + N_EVAL else \
        max(1, round(len(chosen) * N_EVAL / (N_TRAIN + N_EVAL)))
    # split by group hash: whole groups go to eval until the target is reached
    groups: dict[str, list[dict]] = {}
    for c in chosen:
        groups.setdefault(c["group"] or c["prompt"], []).append(c)
    order = sorted(groups, key=lambda g: h(SEED, domain, "split", g))
    eval_set, train_set = [], []
    for g in order:
        (eval_set if len(eval_set) < n_eval_target else train_set).extend(groups[g])
    key = lambda c: h(SEED, domain, "order", c["prompt"])  # noqa: E731
    eval_set.sort(key=key)
    train_set.sort(key=key)
    return train_set, eval_set, n_pool


def write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        for r in rows:
            line = json.dumps({"prompt": r["prompt"], "response": r["response"]},
                              ensure_ascii=False)
            gz.write((line + "\n").encode("utf-8"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


def check_requirements(domains: list[str]) -> None:
    missing_pkgs = []
    for d in domains:
        if any(not os.path.exists(f) for f in REQUIRED_FILES.get(d, [])):
            missing_pkgs += [p for p in APT_PACKAGES[d] if p not in missing_pkgs]
    if missing_pkgs:
        all_pkgs = []
        for d in domains:
            all_pkgs += [p for p in APT_PACKAGES.get(d, []) if p not in all_pkgs]
        print("Missing Debian source files for: " + ", ".join(missing_pkgs), file=sys.stderr)
        print("Install them with:\n  apt-get install -y --no-install-recommends "
              + " ".join(all_pkgs), file=sys.stderr)
        sys.exit(2)


def source_versions(domain: str) -> dict:
    if domain == "code":
        return {"cpython": sys.version.split()[0]}
    if domain in GENERATED:
        return {"generator": "scripts/build_domains.py"}
    return {p: pkg_version(p) for p in APT_PACKAGES[domain]}


def write_sources_md(out: Path, manifest: dict) -> None:
    lines = [
        "# Text domains: sources and construction",
        "",
        "Built by `scripts/build_domains.py` (seed "
        f"{manifest['seed']}); rebuild with `python scripts/build_domains.py --out data/domains`.",
        "Every file is `<domain>/{train,eval}.jsonl.gz`, one JSON object per line with string "
        "fields `prompt` and `response`.",
        f"Prompts are at most {MAX_PROMPT} characters, responses {MIN_RESPONSE}-{MAX_RESPONSE}. "
        "Before splitting, pairs are de-duplicated by normalised prompt and normalised response; "
        "the split assigns whole groups (see each domain) by a seeded hash, so train and eval "
        "share no prompt and no response.",
        "",
        "| domain | generated | train | eval | source versions | licence |",
        "|---|---|---|---|---|---|",
    ]
    for d, info in manifest["domains"].items():
        vers = ", ".join(f"{k} {v}" for k, v in info["source_versions"].items())
        lic = SOURCE_INFO[d]["licence"].split(" (")[0].split(". ")[0]
        lines.append(f"| {d} | {'yes' if info['generated'] else 'no'} | "
                     f"{info['counts']['train']} | {info['counts']['eval']} | {vers} | {lic} |")
    lines.append("")
    for d, info in manifest["domains"].items():
        src = SOURCE_INFO[d]
        vers = ", ".join(f"`{k}` {v}" for k, v in info["source_versions"].items())
        lines += [
            f"## {d}",
            "",
            f"- Source: {vers}"
            + ("" if d in GENERATED or d == "code" else " (Debian 12 bookworm)"),
            f"- Upstream: {src['upstream']}",
            f"- Licence: {src['licence']}",
            f"- Pairs: {src['construction']}",
            f"- Counts: train {info['counts']['train']}, eval {info['counts']['eval']} "
            f"(candidate pool after de-duplication: {info['pool']})",
            "",
        ]
    (out / "SOURCES.md").write_text("\n".join(lines), encoding="utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/domains", help="output directory (default %(default)s)")
    ap.add_argument("--only", default="", help="comma-separated subset of domains to (re)build")
    args = ap.parse_args(argv)
    out = Path(args.out)
    domains = [d for d in args.only.split(",") if d] or DOMAINS
    unknown = set(domains) - set(DOMAINS)
    if unknown:
        ap.error(f"unknown domain(s): {sorted(unknown)}")
    check_requirements(domains)

    man_path = out / "manifest.json"
    manifest = json.loads(man_path.read_text()) if man_path.exists() and args.only else {}
    manifest.update({
        "seed": SEED,
        "script": "scripts/build_domains.py",
        "format": "jsonl.gz, one {\"prompt\": str, \"response\": str} per line",
        "limits": {"max_prompt_chars": MAX_PROMPT, "min_response_chars": MIN_RESPONSE,
                   "max_response_chars": MAX_RESPONSE, "target_train": N_TRAIN,
                   "target_eval": N_EVAL},
    })
    manifest.setdefault("domains", {})
    for d in domains:
        cands = BUILDERS[d]()
        train, ev_, pool = select_and_split(d, cands)
        entry = {"generated": d in GENERATED, "source_versions": source_versions(d),
                 "licence": SOURCE_INFO[d]["licence"], "pool": pool,
                 "counts": {}, "sha256": {}, "bytes": {}, "files": {}}
        for split, rows in (("train", train), ("eval", ev_)):
            p = out / d / f"{split}.jsonl.gz"
            write_jsonl_gz(p, rows)
            entry["counts"][split] = len(rows)
            entry["sha256"][split] = sha256_file(p)
            entry["bytes"][split] = p.stat().st_size
            entry["files"][split] = f"{d}/{split}.jsonl.gz"
        manifest["domains"][d] = entry
        print(f"{d:11s} candidates={len(cands):6d} pool={pool:6d} "
              f"train={len(train):5d} eval={len(ev_):4d}", flush=True)
    manifest["domains"] = {d: manifest["domains"][d] for d in DOMAINS if d in manifest["domains"]}
    man_path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    write_sources_md(out, manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
