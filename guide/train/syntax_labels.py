"""Syntax labels for texts as the generator writes them (its lower-cased words, space-separated):
a Penn Treebank part-of-speech tag per word and the labelled constituent spans of each sentence.

    POS:   Lingua::EN::Tagger (Debian liblingua-en-tagger-perl), an HMM tagger trained on the Penn Treebank
    spans: the link grammar parser's constituent trees (Debian python3-link-grammar, English dictionary)

Both run only where guides are trained and evaluated; a served guide never needs them. Texts are tagged
exactly as written (lower case, the generator's word split), so training labels and the measure of
generated texts come from the same pipeline. Run with the system Python, which has the link grammar
bindings:

    /usr/bin/python3 guide/train/syntax_labels.py --input texts.txt --output labels.jsonl

Each output line: {"words": [...], "pos": [tag per word], "spans": [[i, j, label], ...]} with word
indices i ≤ j inclusive, counting from 0; "spans" is null for a sentence the parser could not link
without dropping words (a text with an unparsable sentence keeps the spans of the others).
"""

from __future__ import annotations

import argparse
import json
import os
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


class Parser:
    """Constituent spans per sentence from the link grammar parser (null links not allowed: a sentence
    it cannot link whole gets no spans rather than a guessed tree)."""

    def __init__(self, max_parse_time: int = 2):
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

    def sentence_spans(self, words: list[str]) -> list[tuple[int, int, str]] | None:
        from linkgrammar import Sentence
        linkages = Sentence(" ".join(words), self.dictionary, self.options).parse()
        linkage = next(iter(linkages), None)
        if linkage is None or linkage.unused_word_cost() > 0:
            return None
        # Linkage word -> our word index by character offset (walls have none).
        starts, pos = {}, 0
        for i, w in enumerate(words):
            starts[pos] = i
            pos += len(w) + 1
        leaf_words = [starts.get(linkage.word_char_start(k)) for k in range(1, linkage.num_of_words() - 1)]
        ends = {}
        for k in range(1, linkage.num_of_words() - 1):
            # The last of our words this linkage word covers.
            end_char = linkage.word_char_end(k)
            ends[k - 1] = max(i for p, i in starts.items() if p < end_char)
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
        if leaf != len(leaf_words) or any(w is None for w in leaf_words):
            return None
        spans = [(leaf_words[a], ends[b], label) for a, b, label in spans]
        return sorted(set(spans))

    def spans(self, words: list[str]) -> list[tuple[int, int, str]] | None:
        """All sentences' spans, split at the sentence-final "." words; None if no sentence parsed."""
        out, start, parsed = [], 0, False
        for i, w in enumerate(words + ["."]):
            if w == "." and i > start:
                sent = words[start:i + 1] if i < len(words) else words[start:]
                got = self.sentence_spans(sent)
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
    ap.add_argument("--versions", action="store_true", help="print the tools' Debian versions as JSON and exit")
    args = ap.parse_args()
    if args.versions:
        print(json.dumps(tool_versions()))
        return 0
    lines = (sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")).read().splitlines()
    tagger = Tagger()
    parser = None if args.no_spans else Parser()
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    for n, line in enumerate(lines):
        words = line.split()
        row = {"words": words, "pos": tagger.tags(words) if words else [],
               "spans": None if parser is None or not words else parser.spans(words)}
        out.write(json.dumps(row) + "\n")
        if (n + 1) % 1000 == 0:
            print(f"\r{n + 1}/{len(lines)} texts", end="", file=sys.stderr)
    print(file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
