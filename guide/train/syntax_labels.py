"""Syntax labels for texts as the generator writes them (its lower-cased words, space-separated):
a Penn Treebank part-of-speech tag per word and the labelled constituent spans of each sentence.

    POS:   Lingua::EN::Tagger (Debian liblingua-en-tagger-perl), an HMM tagger trained on the Penn Treebank
    spans: the link grammar parser's constituent trees (Debian python3-link-grammar, English dictionary)

Both run only where guides are trained and evaluated; a served guide never needs them. Texts are tagged
exactly as written (lower case, the generator's word split); the parser reads each sentence as a writer
would write it (see Parser) and its spans are mapped back onto the generator's words. Training labels
and the measure of generated texts come from the same pipeline. Run with the system Python, which has
the link grammar bindings:

    /usr/bin/python3 guide/train/syntax_labels.py --input texts.txt --output labels.jsonl

Each output line: {"words": [...], "pos": [tag per word], "spans": [[i, j, label], ...]} with word
indices i ≤ j inclusive, counting from 0; "spans" is null for a sentence the parser could not link
without dropping words (a text with an unparsable sentence keeps the spans of the others).
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import pathlib
import re
import subprocess
import sys

PERL_TAGGER = r"""
use strict; use warnings; use Lingua::EN::Tagger;
binmode STDIN, ':encoding(UTF-8)'; binmode STDOUT, ':encoding(UTF-8)'; $| = 1;
my $p = Lingua::EN::Tagger->new(longest_noun_phrase => 5);
while (my $line = <STDIN>) { chomp $line; print $p->add_tags($line), "\n"; }
"""

# Lingua's own names for the Penn Treebank tags it writes differently.
LINGUA_TO_PTB = {"det": "DT", "pp": ".", "ppc": ",", "ppd": "$", "ppl": "``", "ppr": "''",
                 "pps": ":", "lrb": "-LRB-", "rrb": "-RRB-", "prps": "PRP$", "wps": "WP$"}


def tool_versions() -> dict[str, str]:
    """The Debian package versions the labels come from (recorded beside every label file)."""
    out = {}
    for pkg in ("liblingua-en-tagger-perl", "python3-link-grammar", "link-grammar-dictionaries-en"):
        try:
            out[pkg] = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True,
                                      text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            out[pkg] = "missing"
    return out


class Tagger:
    """One long-lived perl process: a line in, the same line with <tag>word</tag> out."""

    def __init__(self):
        self.proc = subprocess.Popen(["perl", "-e", PERL_TAGGER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, encoding="utf-8", bufsize=1)

    def tags(self, words: list[str]) -> list[str]:
        line = " ".join(words)
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        tagged = re.findall(r"<([a-z$]+)>(.*?)</\1>", self.proc.stdout.readline())
        # Lingua may split or join our words (it splits "n't", keeps "20-25"): a word takes the tag of
        # the tagger token its first character falls in.
        owner = [None] * len(line)
        cursor = 0
        for tag, token in tagged:
            at = line.find(token, cursor)
            if at < 0:
                continue
            for c in range(at, at + len(token)):
                owner[c] = LINGUA_TO_PTB.get(tag, tag.upper())
            cursor = at + len(token)
        out, pos = [], 0
        for w in words:
            out.append(owner[pos] or "X")
            pos += len(w) + 1
        return out


def written_forms(references: pathlib.Path, min_count: int = 5) -> dict[str, str]:
    """A truecaser fitted on E2E's own (cased) train references: lower-case word -> the form it is
    written in most often there, for the words whose usual form is not lower case ("chinese" ->
    "Chinese", "zizzi" -> "Zizzi"); sentence-initial words are not counted."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    with open(references, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            tokens = re.findall(r"\w+|[^\w\s]", row["ref"])
            for i, t in enumerate(tokens):
                if i > 0 and tokens[i - 1] not in ".!?":
                    counts[t.lower()][t] += 1
    out = {}
    for word, forms in counts.items():
        form, n = forms.most_common(1)[0]
        if form != word and n >= min_count:
            out[word] = form
    return out


# Word pieces the generator's tokenizer splits off and writers join: "family - friendly",
# "it ' s", "£ 20".
CLITICS = {"s", "t", "re", "ll", "ve", "d", "m"}
# Compound adjectives the parser's dictionary lacks, written or not with a hyphen ("family friendly",
# "high priced", "low rated": the head after a noun or adjective, by the tagger's tags): the parser
# reads the head alone, which has the compound's syntax.
COMPOUND_HEADS = {"friendly", "priced", "rated"}


class Parser:
    """Constituent spans per sentence from the link grammar parser (null links not allowed: a sentence
    it cannot link whole gets no spans rather than a guessed tree). The parser reads each sentence as
    a writer would write it: proper names and nationalities cased as in E2E's references, the first
    word capitalised, hyphens, apostrophes and "£" joined to their words, compound adjectives read as
    their head. Spans still index the generator's words."""

    def __init__(self, cased: dict[str, str], max_parse_time: int = 2):
        self.cased = cased
        from linkgrammar import Dictionary, ParseOptions  # Debian's bindings (system Python)
        # The library writes its locale notes to stdout, where the labels go: send them to stderr.
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(2, 1)
        try:
            self.dictionary = Dictionary("en")
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        self.options = ParseOptions(verbosity=0, linkage_limit=1, max_parse_time=max_parse_time,
                                    min_null_count=0, max_null_count=0)

    def written(self, words: list[str], tags: list[str]) -> tuple[str, list[int]]:
        """The sentence as the parser reads it, and the character offset of each of our words in it."""
        text, offsets, join_next = "", [], False
        for i, w in enumerate(words):
            prev = words[i - 1] if i else ""
            nxt = words[i + 1] if i + 1 < len(words) else ""
            joiner = (w == "-" and prev.isalnum() and nxt.isalnum()) or (w == "'" and prev.isalnum() and nxt in CLITICS)
            hyphenated = join_next and prev == "-"  # "family - friendly": the hyphen was joined
            if w in COMPOUND_HEADS and (hyphenated or (i > 0 and tags[i - 1] in ("NN", "NNS", "JJ"))):
                # The compound is read as its head: its words share the head's offset.
                first = len(offsets) - (2 if hyphenated else 1)
                text = text[:offsets[first]]
                offsets[first:] = [len(text)] * (len(offsets) - first)
                offsets.append(len(text))
                text += w
                join_next = False
                continue
            glued = joiner or join_next or (prev == "£" and w[:1].isdigit())
            form = self.cased.get(w, w)
            if i == 0:
                form = form[:1].upper() + form[1:]
            if text and not glued:
                text += " "
            offsets.append(len(text))
            text += form
            join_next = joiner
        return text, offsets

    def sentence_spans(self, words: list[str], tags: list[str]) -> list[tuple[int, int, str]] | None:
        from linkgrammar import Sentence
        text, offsets = self.written(words, tags)
        linkages = Sentence(text, self.dictionary, self.options).parse()
        linkage = next(iter(linkages), None)
        if linkage is None or linkage.unused_word_cost() > 0:
            return None
        # Linkage word (walls have none) -> the first and last of our words it covers, by character
        # offset (the parser may split a written word, "it's" -> "it" "'s", or join ours).
        def first_at(at: int) -> int:
            start = max(p for p in offsets if p <= at)
            return offsets.index(start)

        def last_at(at: int) -> int:
            return max(i for i, p in enumerate(offsets) if p <= at)
        linkage_words = range(1, linkage.num_of_words() - 1)
        leaf_words = [first_at(linkage.word_char_start(k)) for k in linkage_words]
        ends = {k - 1: last_at(linkage.word_char_end(k) - 1) for k in linkage_words}
        tokens = re.findall(r"\(|\)|[^\s()]+", linkage.constituent_tree(1))
        spans, leaf = [], 0

        def node(i: int) -> tuple[int, int, int]:
            """Parse the constituent opened at tokens[i]: (first leaf, last leaf, next token)."""
            nonlocal leaf
            label, i = tokens[i + 1], i + 2
            first = last = None
            while tokens[i] != ")":
                if tokens[i] == "(":
                    a, b, i = node(i)
                else:
                    a = b = leaf
                    leaf, i = leaf + 1, i + 1
                first = a if first is None else first
                last = b
            if first is not None:
                spans.append((first, last, label))
            return first, last, i + 1

        node(0)
        if leaf != len(leaf_words):
            return None
        spans = [(leaf_words[a], ends[b], label) for a, b, label in spans]
        return sorted(set(spans))

    def spans(self, words: list[str], tags: list[str]) -> list[tuple[int, int, str]] | None:
        """All sentences' spans, split at the sentence-final "." words; None if no sentence parsed."""
        out, start, parsed = [], 0, False
        for i, w in enumerate(words + ["."]):
            if w == "." and i > start:
                sent = words[start:i + 1] if i < len(words) else words[start:]
                got = self.sentence_spans(sent, tags[start:start + len(sent)])
                if got is not None:
                    parsed = True
                    out += [(a + start, b + start, lab) for a, b, lab in got]
                start = i + 1
        return out if parsed else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    env = os.environ.get
    ap.add_argument("--input", default=env("DLM_INPUT", "-"),
                    help="texts, one per line, words space-separated as the generator writes them (- = stdin) [DLM_INPUT]")
    ap.add_argument("--output", default=env("DLM_OUTPUT", "-"), help="JSONL labels (- = stdout) [DLM_OUTPUT]")
    ap.add_argument("--no-spans", action="store_true", default=bool(env("DLM_NO_SPANS")),
                    help="tags only (the parser is the slow part) [DLM_NO_SPANS]")
    ap.add_argument("--written-forms", type=pathlib.Path,
                    default=env("DLM_WRITTEN_FORMS", str(pathlib.Path(__file__).resolve().parents[3] / "shared/data/e2e/trainset.csv")),
                    help="the cased E2E references the parser's truecaser is fitted on [DLM_WRITTEN_FORMS]")
    ap.add_argument("--versions", action="store_true", help="print the tools' Debian versions as JSON and exit")
    args = ap.parse_args()
    if args.versions:
        print(json.dumps(tool_versions()))
        return 0
    lines = (sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")).read().splitlines()
    tagger = Tagger()
    parser = None if args.no_spans else Parser(written_forms(args.written_forms))
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    for n, line in enumerate(lines):
        words = line.split()
        tags = tagger.tags(words) if words else []
        row = {"words": words, "pos": tags, "spans": None if parser is None or not words else parser.spans(words, tags)}
        out.write(json.dumps(row) + "\n")
        if (n + 1) % 1000 == 0:
            print(f"\r{n + 1}/{len(lines)} texts", end="", file=sys.stderr)
    print(file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
