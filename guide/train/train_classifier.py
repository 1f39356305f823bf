"""Train a dlm guide: p(c | x_t, t) over the E2E semantic fields, on noisy latents made with a
generator checkpoint's frozen embedding and noise schedule, then export the gradient graph

    (latents FP32 [B, L, D], timesteps INT64 [B], targets INT64 [B, F])
        -> (log_prob FP32 [B], grad FP32 [B, L, D] = d log_prob / d latents)

to ONNX with jax.value_and_grad + jax2onnx, check ONNX Runtime against JAX, and write the guide card
(label space, embedding fingerprint, T, schedule) into the model's metadata_props and `card.json`.

    python guide/train/train_classifier.py --generator models/e2e-deep \
        --out models/guides/e2e-semantic/1
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
from safetensors.numpy import load_file
from tokenizers import Tokenizer

FIELDS = ["name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near"]
ABSENT = "absent"
CARD_KEY = "dlm.card"


# ---------------------------------------------------------------- generator side (must match Rust)

def alphas_cumprod(schedule: str, steps: int) -> np.ndarray:
    """The generator's discrete schedule (generator/src/diffusion/schedule.rs)."""
    if schedule == "linear":
        scale = 1000.0 / steps
        betas = np.linspace(scale * 1e-4, scale * 0.02, steps)
    else:
        if schedule == "sqrt":
            abar = lambda s: 1.0 - np.sqrt(s + 1e-4)
        elif schedule == "cosine":
            abar = lambda s: np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
        else:
            raise SystemExit(f"error: unknown schedule {schedule!r}")
        i = np.arange(steps, dtype=np.float64)
        betas = np.minimum(1.0 - abar((i + 1) / steps) / abar(i / steps), 0.999)
    return np.cumprod(1.0 - np.minimum(betas, 0.999))


def embedding_fingerprint(embedding: np.ndarray) -> str:
    """sha256 of the embedding table as little-endian f32, row-major (the generator computes the same)."""
    return hashlib.sha256(np.ascontiguousarray(embedding, dtype="<f4").tobytes()).hexdigest()


def parse_mr(mr: str) -> dict[str, str]:
    out = {}
    for part in mr.split("],"):
        part = part.strip().rstrip("]")
        if "[" in part:
            k, v = part.split("[", 1)
            out[k.strip()] = v.strip()
    return out


def read_split(path: pathlib.Path):
    with open(path, newline="", encoding="utf-8") as f:
        return [(parse_mr(r["mr"]), r["ref"].strip()) for r in csv.DictReader(f)]


MEASURE_PHRASES = pathlib.Path(__file__).resolve().parents[2] / "generator/src/eval/paraphrases.json"


class Realisation:
    """Whether a text says field = value: the generator's control measure (generator/src/eval/control.rs),
    on the same words and the same phrase table."""

    def __init__(self, tok: Tokenizer, table: dict):
        self.tok = tok
        self.table = table
        self.phrase_words: dict[str, list[str]] = {}
        self.names = [self.words(n) for n in table.get("restaurant_names", [])]
        self.masked: dict[tuple, list[str]] = {}

    def words(self, text: str) -> list[str]:
        return words_of(self.tok, text)

    def phrase(self, phrase: str) -> list[str]:
        if phrase not in self.phrase_words:
            self.phrase_words[phrase] = self.words(phrase)
        return self.phrase_words[phrase]

    def without_restaurant_names(self, text_words: list[str]) -> list[str]:
        """The words with each restaurant name's blanked: "near raja indian cuisine" says no food."""
        key = tuple(text_words)
        if key not in self.masked:
            out = list(text_words)
            for name in self.names:
                for i in range(len(text_words) - len(name) + 1):
                    if text_words[i:i + len(name)] == name:
                        out[i:i + len(name)] = [""] * len(name)
            self.masked[key] = out
        return self.masked[key]

    def realises(self, text_words: list[str], field: str, value: str) -> bool:
        if field not in ("name", "near"):
            text_words = self.without_restaurant_names(text_words)
        phrases = self.table["phrases"].get(field, {}).get(value, [value])
        said = any(contains_seq(text_words, self.phrase(p)) for p in phrases)
        other = self.table["unless"].get(field, {}).get(value)
        return said and not (other is not None and self.realises(text_words, field, other))


def words_of(tok: Tokenizer, text: str) -> list[str]:
    """The generator's words for a text: its tokenizer's normalizer and pre-tokenizer."""
    return [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text))]


def replace_seq(hay: list[str], needle: list[str], by: list[str]) -> list[str] | None:
    """hay with every occurrence of needle replaced by `by` (None when there is none)."""
    out, i, found = [], 0, False
    while i < len(hay):
        if needle and hay[i:i + len(needle)] == needle:
            out += by
            i += len(needle)
            found = True
        else:
            out.append(hay[i])
            i += 1
    return out if found else None


def contains_seq(hay: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return n > 0 and any(hay[i:i + n] == needle for i in range(len(hay) - n + 1))


def text_aligned(mr: dict[str, str], ref: str, values: dict[str, list[str]], said: Realisation) -> dict[str, str]:
    """The fields' values as the text says them, which is what guidance must steer: a field the
    reference leaves out is `absent` whatever the MR says (about 45% of priceRange, customer rating and
    familyFriendly labels), and a value the text says that the MR does not give is taken (eatType
    `restaurant` in most references whose MR has no eatType). The MR's value wins when the text says
    several; `name` and `near` (restaurant names, easily confused) keep the MR's value only if said."""
    text = said.words(ref)
    out = {}
    for f in FIELDS:
        if f in mr and said.realises(text, f, mr[f]):
            out[f] = mr[f]
        elif f not in ("name", "near"):
            hits = [v for v in values[f] if v != ABSENT and said.realises(text, f, v)]
            if hits:
                out[f] = hits[0]
    return out


def encode(tok: Tokenizer, text: str, seq_len: int) -> list[int] | None:
    """START words END PAD... exactly as the generator pads (None if it does not fit)."""
    ids = tok.encode(text, add_special_tokens=False).ids
    if len(ids) + 2 > seq_len:
        return None
    start, end, pad = (tok.token_to_id(t) for t in ("[START]", "[END]", "[PAD]"))
    return ([start] + ids + [end] + [pad] * seq_len)[:seq_len]


# ---------------------------------------------------------------- classifier

def init_params(key, d, h, layers, seq_len, n_out, task="semantic"):
    def dense(key, i, o):
        return {"w": jax.random.normal(key, (i, o)) * (1.0 / math.sqrt(i)), "b": jnp.zeros(o)}
    keys = iter(jax.random.split(key, 8 + 8 * layers))
    p = {
        "inp": dense(next(keys), d, h),
        "t1": dense(next(keys), h, h),
        "t2": dense(next(keys), h, h),
        "pos": jax.random.normal(next(keys), (seq_len, h)) * 0.02,
        "ln_f": {"g": jnp.ones(h), "b": jnp.zeros(h)},
        "head": dense(next(keys), h, n_out),
        "layers": [],
    }
    if task == "span":
        # [mean over the span, its first word, its last word] -> H
        p["span"] = dense(next(keys), 3 * h, h)
    for _ in range(layers):
        p["layers"].append({
            "ln1": {"g": jnp.ones(h), "b": jnp.zeros(h)},
            "q": dense(next(keys), h, h), "k": dense(next(keys), h, h),
            "v": dense(next(keys), h, h), "o": dense(next(keys), h, h),
            "ln2": {"g": jnp.ones(h), "b": jnp.zeros(h)},
            "f1": dense(next(keys), h, 2 * h), "f2": dense(next(keys), 2 * h, h),
        })
    return p


def layer_norm(x, p):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, -1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + 1e-5) * p["g"] + p["b"]


def hidden_fn(p, latents, timesteps, heads):
    """The encoder's last hidden states [B, L, H]. Dense layers run on flattened [B·L, H] rows and
    attention is a 4-D dot_general: the shapes ONNX Runtime runs fastest (FINDINGS)."""
    b, l, d = latents.shape
    h = p["inp"]["w"].shape[1]
    x = latents.reshape(b * l, d) @ p["inp"]["w"] + p["inp"]["b"]
    half = h // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half) / half)
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    temb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], -1)
    temb = jax.nn.silu(temb @ p["t1"]["w"] + p["t1"]["b"]) @ p["t2"]["w"] + p["t2"]["b"]
    x = (x.reshape(b, l, h) + p["pos"][None, :l] + temb[:, None, :]).reshape(b * l, h)
    nh = heads
    hd = h // nh
    for lp in p["layers"]:
        y = layer_norm(x, lp["ln1"])
        q = (y @ lp["q"]["w"] + lp["q"]["b"]).reshape(b, l, nh, hd).transpose(0, 2, 1, 3)
        k = (y @ lp["k"]["w"] + lp["k"]["b"]).reshape(b, l, nh, hd).transpose(0, 2, 1, 3)
        v = (y @ lp["v"]["w"] + lp["v"]["b"]).reshape(b, l, nh, hd).transpose(0, 2, 1, 3)
        s = jax.lax.dot_general(q, k, (((3,), (3,)), ((0, 1), (0, 1)))) / math.sqrt(hd)
        a = jax.nn.softmax(s, axis=-1)
        c = jax.lax.dot_general(a, v, (((3,), (2,)), ((0, 1), (0, 1))))
        c = c.transpose(0, 2, 1, 3).reshape(b * l, h)
        x = x + c @ lp["o"]["w"] + lp["o"]["b"]
        y = layer_norm(x, lp["ln2"])
        x = x + jax.nn.gelu(y @ lp["f1"]["w"] + lp["f1"]["b"], approximate=False) @ lp["f2"]["w"] + lp["f2"]["b"]
    return layer_norm(x, p["ln_f"]).reshape(b, l, h)


def picked(lsm, target):
    """lsm[..., target] (0 where target < 0) by a one-hot mask: take_along_axis does not export (its
    backward is a scatter)."""
    onehot = (target[..., None] == jnp.arange(lsm.shape[-1])).astype(lsm.dtype)
    return jnp.sum(lsm * onehot, axis=-1) * (target >= 0).astype(lsm.dtype)


def logits_fn(p, hidden, targets, task, n_fields):
    """The task's logits from the hidden states:
    semantic [B, sum(n_f)] (mean-pooled); pos [B, F, tags] (word k sits at canvas position k + 1, after
    [START]); span [B, labels] for the span targets[:, 0]..targets[:, 1] (inclusive word indices)."""
    b, l, h = hidden.shape
    if task == "semantic":
        return jnp.mean(hidden, axis=1) @ p["head"]["w"] + p["head"]["b"]
    if task == "pos":
        words = hidden[:, 1:1 + n_fields].reshape(b * n_fields, h)
        return (words @ p["head"]["w"] + p["head"]["b"]).reshape(b, n_fields, -1)
    canvas = jnp.arange(l)[None, :]
    first, last = targets[:, 0:1] + 1, targets[:, 1:2] + 1
    inside = ((canvas >= first) & (canvas <= last)).astype(hidden.dtype)[:, :, None]
    mean = jnp.sum(hidden * inside, axis=1) / jnp.maximum(jnp.sum(inside, axis=1), 1.0)
    at_first = jnp.sum(hidden * (canvas == first).astype(hidden.dtype)[:, :, None], axis=1)
    at_last = jnp.sum(hidden * (canvas == last).astype(hidden.dtype)[:, :, None], axis=1)
    rep = jax.nn.gelu(jnp.concatenate([mean, at_first, at_last], -1) @ p["span"]["w"] + p["span"]["b"], approximate=False)
    return rep @ p["head"]["w"] + p["head"]["b"]


def task_log_probs(p, latents, timesteps, targets, heads, task, sizes):
    """log p(c | x_t, t) per constrained field [B, F'] (0 where a target is -1 = free)."""
    logits = logits_fn(p, hidden_fn(p, latents, timesteps, heads), targets, task, len(sizes))
    if task == "semantic":
        return field_log_probs(logits, targets, sizes)
    if task == "pos":
        return picked(jax.nn.log_softmax(logits, axis=-1), targets)
    # span: the label's log p, for a span whose three targets are all given
    given = (targets[:, 0] >= 0) & (targets[:, 1] >= targets[:, 0])
    return picked(jax.nn.log_softmax(logits, axis=-1), jnp.where(given, targets[:, 2], -1))[:, None]


def field_log_probs(logits, targets, sizes):
    """log p(c_f = targets_f | x) per field [B, F], 0 where targets_f < 0 (unconstrained)."""
    out, start = [], 0
    for f, n in enumerate(sizes):
        out.append(picked(jax.nn.log_softmax(logits[:, start:start + n], axis=-1), targets[:, f]))
        start += n
    return jnp.stack(out, axis=1)


# ---------------------------------------------------------------- syntax tasks

SYNTAX_LABELER = pathlib.Path(__file__).resolve().parent / "syntax_labels.py"
SYSTEM_PYTHON = "/usr/bin/python3"  # the link grammar bindings are Debian's
NONE_LABEL = "none"  # a span that is no constituent


class SyntaxData:
    """Targets for the pos and span tasks: the references' words labelled by syntax_labels.py (POS tags,
    constituent spans), cached under `cache` by the texts and the tools' versions."""

    def __init__(self, task: str, tok: Tokenizer, seq_len: int, cache: pathlib.Path, written_forms: pathlib.Path,
                 min_label_count: int = 20):
        self.task, self.tok, self.seq_len, self.cache = task, tok, seq_len, cache
        self.written_forms = written_forms  # the cased references the parser's truecaser is fitted on
        self.max_words = seq_len - 2  # [START] words [END]
        self.min_label_count = min_label_count
        self.tags: list[str] = []
        self.span_labels: list[str] = []
        versions = json.loads(subprocess.run([SYSTEM_PYTHON, str(SYNTAX_LABELER), "--versions"], check=True,
                                             capture_output=True, text=True).stdout)
        if "missing" in versions.values():
            raise SystemExit(f"error: the syntax labellers are not installed ({versions}); run deploy/setup.sh --train")
        self.provenance = {"labeller": "guide/train/syntax_labels.py", "debian_packages": versions}

    def labels(self, texts: list[list[str]]) -> list[dict]:
        lines = "".join(" ".join(w) + "\n" for w in texts)
        # Keyed by the texts, the tools' versions and the labeller's own code.
        key = hashlib.sha256((self.task + json.dumps(self.provenance) + SYNTAX_LABELER.read_text() + lines).encode()).hexdigest()[:16]
        path = self.cache / f"{self.task}-{key}.jsonl"
        if not path.exists():
            self.cache.mkdir(parents=True, exist_ok=True)
            (self.cache / f"{key}.txt").write_text(lines, encoding="utf-8")
            print(f"labelling {len(texts)} texts into {path}", file=sys.stderr)
            cmd = [SYSTEM_PYTHON, str(SYNTAX_LABELER), "--input", str(self.cache / f"{key}.txt"), "--output", f"{path}.part",
                   "--written-forms", str(self.written_forms)]
            subprocess.run(cmd + (["--no-spans"] if self.task == "pos" else []), check=True)
            pathlib.Path(f"{path}.part").rename(path)
        return [json.loads(line) for line in path.open(encoding="utf-8")]

    def dataset(self, refs: list[str], fit: bool = False):
        """(ids [N, L], targets): tag ids [N, max_words] (-1 past the text) for pos; for span, per text
        (its word count, its constituents {(i, j): label id}). `fit` fixes the label sets from these texts."""
        kept = [(e, words_of(self.tok, r)) for r in refs if (e := encode(self.tok, r, self.seq_len)) is not None]
        rows = self.labels([w for _, w in kept])
        if self.task == "pos":
            if fit:
                self.tags = sorted({t for r in rows for t in r["pos"]})
            y = np.full((len(rows), self.max_words), -1, np.int32)
            for i, r in enumerate(rows):
                for k, tag in enumerate(r["pos"]):
                    y[i, k] = self.tags.index(tag) if tag in self.tags else -1
            return np.array([e for e, _ in kept], np.int32), y
        keep = [i for i, r in enumerate(rows) if r["spans"]]
        if fit:
            counts = {}
            for i in keep:
                for *_, label in rows[i]["spans"]:
                    counts[label] = counts.get(label, 0) + 1
            self.span_labels = sorted(k for k, c in counts.items() if c >= self.min_label_count) + [NONE_LABEL]
        y = []
        for i in keep:
            # Same-extent constituents (S over VP, NP over NP): the outermost, listed last, wins.
            spans = {(a, b): self.span_labels.index(lab) for a, b, lab in rows[i]["spans"] if lab in self.span_labels}
            y.append((len(rows[i]["words"]), spans))
        return np.array([kept[i][0] for i in keep], np.int32), y

    def draw_spans(self, idx, y, rng) -> np.ndarray:
        """One (i, j, label) per row: half the time one of its constituents, else a span drawn uniformly
        (labelled `none` unless it is a constituent)."""
        out = np.zeros((len(idx), 3), np.int32)
        none = self.span_labels.index(NONE_LABEL)
        for r, k in enumerate(idx):
            n, spans = y[k]
            if spans and rng.random() < 0.5:
                (i, j), label = list(spans.items())[rng.integers(len(spans))]
            else:
                i = int(rng.integers(n))
                j = int(rng.integers(i, n))
                label = spans.get((i, j), none)
            out[r] = (i, j, label)
        return out

    def card_fields(self) -> list[dict]:
        if self.task == "pos":
            return [{"name": f"pos.{k}", "values": self.tags} for k in range(self.max_words)]
        positions = [str(k) for k in range(self.max_words)]
        return [{"name": "span.start", "values": positions}, {"name": "span.end", "values": positions},
                {"name": "span.label", "values": self.span_labels}]


def accuracy_counts(task, logits, y, fields, sizes, syntax) -> dict[str, tuple[int, int]]:
    """(correct, total) per reported accuracy for one dev batch."""
    if task == "semantic":
        out, start = {}, 0
        for f, size in enumerate(sizes):
            out[fields[f]] = (int(np.sum(np.argmax(logits[:, start:start + size], -1) == y[:, f])), len(y))
            start += size
        return out
    if task == "pos":
        pred, given = np.argmax(logits, -1), y >= 0
        right = (pred == y) & given
        return {"tag (per word)": (int(right.sum()), int(given.sum())),
                "whole sequence": (int(np.all(right | ~given, axis=1).sum()), len(y))}
    pred = np.argmax(logits, -1)
    constituent = y[:, 2] != syntax.span_labels.index(NONE_LABEL)
    return {"label of a drawn span (incl. none)": (int(np.sum(pred == y[:, 2])), len(y)),
            "label of a constituent": (int(np.sum((pred == y[:, 2]) & constituent)), int(constituent.sum()))}


# ---------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    env = lambda name, default: __import__("os").environ.get(name, default)
    ap.add_argument("--generator", default=env("DLM_GENERATOR", "models/e2e-deep"), help="generator model directory [DLM_GENERATOR]")
    ap.add_argument("--data-dir", default=env("DLM_DATA_DIR", "../shared/data/e2e"), help="E2E CSV directory [DLM_DATA_DIR]")
    ap.add_argument("--out", default=env("DLM_OUT", "models/guides/e2e-semantic/1"), help="version directory to write [DLM_OUT]")
    ap.add_argument("--steps", type=int, default=int(env("DLM_STEPS", "3000")), help="training steps [DLM_STEPS]")
    ap.add_argument("--batch-size", type=int, default=int(env("DLM_BATCH_SIZE", "64")), help="[DLM_BATCH_SIZE]")
    ap.add_argument("--lr", type=float, default=float(env("DLM_LR", "1e-3")), help="Adam learning rate [DLM_LR]")
    ap.add_argument("--hidden", type=int, default=int(env("DLM_HIDDEN", "128")), help="[DLM_HIDDEN]")
    ap.add_argument("--layers", type=int, default=int(env("DLM_LAYERS", "2")), help="[DLM_LAYERS]")
    ap.add_argument("--heads", type=int, default=int(env("DLM_HEADS", "4")), help="[DLM_HEADS]")
    ap.add_argument("--t-power", type=float, default=float(env("DLM_T_POWER", "2.0")),
                    help="timesteps drawn as T·u^p, u uniform: p > 1 spends more of training at low noise, "
                         "where guidance decides the words (p = 1: uniform) [DLM_T_POWER]")
    ap.add_argument("--labels", choices=["text", "mr"], default=env("DLM_LABELS", "text"),
                    help="text: field values as the reference says them (see text_aligned); mr: the meaning "
                         "representation's values as given [DLM_LABELS]")
    ap.add_argument("--swap-names", type=float, default=float(env("DLM_SWAP_NAMES", "0.0")),
                    help="per training reference, the chance of adding a copy with its restaurant names (name, "
                         "near) replaced by other values of the same field: without it the guide reads a name "
                         "from its usual context (coffee shop + Indian -> near Raja Indian Cuisine) and steers "
                         "toward the context instead of the name; 0 = off, as e2e-semantic was trained; e2e-names uses 1.0, "
                         "which lifts near's dev accuracy from 80 to 99%% but, trained into an all-field guide, cost the "
                         "other fields' control: see the README) [DLM_SWAP_NAMES]")
    ap.add_argument("--swap-fields", default=env("DLM_SWAP_FIELDS", "name,near"),
                    help="the fields --swap-names swaps, comma-separated [DLM_SWAP_FIELDS]")
    ap.add_argument("--partial-names", type=float, default=float(env("DLM_PARTIAL_NAMES", "0.0")),
                    help="per training reference, the chance of adding a copy with one of its said restaurant "
                         "names of two or more words (the --swap-fields) cut short or mixed with another name's "
                         "words (\"raja\", \"raja bar\" for Raja Indian Cuisine), labelled as the text then says "
                         "it: not that name. Without it a name's first word settles the guide, which then stops "
                         "pulling while the text says half a name; 0 = off [DLM_PARTIAL_NAMES]")
    ap.add_argument("--fields", default=env("DLM_FIELDS", ",".join(FIELDS)),
                    help="the fields this guide reads, comma-separated (default: all 8) [DLM_FIELDS]")
    ap.add_argument("--phrases", default=env("DLM_PHRASES", str(MEASURE_PHRASES)),
                    help="phrase table that decides what a text says (default: the control measure's) [DLM_PHRASES]")
    ap.add_argument("--task", choices=["semantic", "pos", "span"], default=env("DLM_TASK", "semantic"),
                    help="semantic: the MR fields a text says; pos: a Penn Treebank tag per word (fields pos.0, "
                         "pos.1, ...); span: the constituent label of a word span (fields span.start, span.end, "
                         "span.label). pos and span labels come from guide/train/syntax_labels.py [DLM_TASK]")
    ap.add_argument("--labels-cache", default=env("DLM_LABELS_CACHE", ".cache/syntax-labels"),
                    help="where the syntax labels of the references are kept between runs [DLM_LABELS_CACHE]")
    ap.add_argument("--opset", type=int, default=int(env("DLM_OPSET", "21")), help="ONNX opset [DLM_OPSET]")
    ap.add_argument("--seed", type=int, default=int(env("DLM_SEED", "0")), help="[DLM_SEED]")
    args = ap.parse_args()
    fields = args.fields.split(",")
    unknown = [f for f in fields if f not in FIELDS]
    if unknown or not fields:
        print(f"error: --fields: unknown field(s) {unknown}; the E2E fields are {FIELDS}", file=sys.stderr)
        return 1

    gen = pathlib.Path(args.generator)
    data = pathlib.Path(args.data_dir)
    for path in (gen / "config.json", gen / "model.safetensors", gen / "tokenizer.json", data / "trainset.csv"):
        if not path.exists():
            print(f"error: {path} not found", file=sys.stderr)
            return 1
    cfg = json.loads((gen / "config.json").read_text())
    embedding = load_file(str(gen / "model.safetensors"))["embedding.weight"].astype(np.float32)
    tok = Tokenizer.from_file(str(gen / "tokenizer.json"))
    seq_len, d, steps_t = cfg["seq_len"], cfg["embed_dim"], cfg["diffusion_steps"]
    abar = alphas_cumprod(cfg["schedule"], steps_t).astype(np.float32)

    train = read_split(data / "trainset.csv")
    dev = read_split(data / "devset.csv")
    values = {f: sorted({mr[f] for mr, _ in train if f in mr}) + [ABSENT] for f in FIELDS}
    sizes = [len(values[f]) for f in fields]

    said = Realisation(tok, json.loads(pathlib.Path(args.phrases).read_text()))

    swap_rng = np.random.default_rng(args.seed + 1)

    def with_names_swapped(mr, ref):
        """(mr, ref) with each said restaurant name replaced by another value of its field, or None."""
        words, mr = said.words(ref), dict(mr)
        changed = False
        for f in args.swap_fields.split(","):
            if f not in mr:
                continue
            others = [v for v in values[f] if v not in (mr[f], ABSENT)]
            other = others[swap_rng.integers(len(others))]
            replaced = replace_seq(words, said.phrase(mr[f]), said.phrase(other))
            if replaced is not None:
                words, mr[f], changed = replaced, other, True
        return (mr, " ".join(words)) if changed else None

    def with_partial_name(mr, ref):
        """(mr, ref) with one said name of 2+ words cut to a proper part of it, at times followed by a word
        of another name of its field; None when the reference says no such name."""
        words = said.words(ref)
        said_names = [f for f in args.swap_fields.split(",") if f in mr and len(said.phrase(mr[f])) > 1
                      and contains_seq(words, said.phrase(mr[f]))]
        if not said_names:
            return None
        f = said_names[swap_rng.integers(len(said_names))]
        name = said.phrase(mr[f])
        while True:
            keep = swap_rng.random(len(name)) < 0.5
            if 0 < keep.sum() < len(name):
                break
        part = [w for w, k in zip(name, keep) if k]
        if swap_rng.random() < 0.5:
            others = [w for v in values[f] if v not in (mr[f], ABSENT) for w in said.phrase(v) if w not in name]
            part.insert(int(swap_rng.integers(len(part) + 1)), others[swap_rng.integers(len(others))])
        words = replace_seq(words, name, part)
        if any(said.realises(words, f, v) for v in values[f] if v != ABSENT):
            return None  # the cut made another name: its label would be wrong
        return mr, " ".join(words)

    def dataset(rows, swap=0.0, partial=0.0):
        extra = []
        if swap > 0:
            extra += [with_names_swapped(mr, ref) for mr, ref in rows if swap_rng.random() < swap]
        if partial > 0:
            partials = [r for mr, ref in rows if swap_rng.random() < partial and (r := with_partial_name(mr, ref))]
            print(f"{len(partials)} copies with a partial name, e.g. {[ref for _, ref in partials[:3]]}", file=sys.stderr)
            extra += partials
        rows = rows + [r for r in extra if r is not None]
        ids, labels = [], []
        for mr, ref in rows:
            e = encode(tok, ref, seq_len)
            if e is None:
                continue
            if args.labels == "text":
                mr = text_aligned(mr, ref, values, said)
            ids.append(e)
            labels.append([values[f].index(mr[f]) if mr.get(f) in values[f] else values[f].index(ABSENT) for f in fields])
        return np.array(ids, np.int32), np.array(labels, np.int32)

    if args.task == "semantic":
        train_ids, train_y = dataset(train, args.swap_names, args.partial_names)
        dev_ids, dev_y = dataset(dev)
        card_fields = [{"name": f, "values": values[f]} for f in fields]
    else:
        syntax = SyntaxData(args.task, tok, seq_len, pathlib.Path(args.labels_cache), data / "trainset.csv")
        train_ids, train_y = syntax.dataset([ref for _, ref in train], fit=True)
        dev_ids, dev_y = syntax.dataset([ref for _, ref in dev])
        card_fields = syntax.card_fields()
        sizes = [len(f["values"]) for f in card_fields]
        fields = [f["name"] for f in card_fields]
    print(f"train {len(train_ids)} / dev {len(dev_ids)} sequences, L={seq_len}, D={d}, T={steps_t}", file=sys.stderr)

    rng = np.random.default_rng(args.seed)
    std0 = math.sqrt(1.0 - abar[0])

    def noisy(ids, t):
        x0 = embedding[ids] + std0 * rng.standard_normal((*ids.shape, d), dtype=np.float32)
        a = abar[t][:, None, None]
        return np.sqrt(a) * x0 + np.sqrt(1 - a) * rng.standard_normal(x0.shape, dtype=np.float32)

    n_out = {"semantic": sum(sizes), "pos": sizes[0], "span": sizes[-1]}[args.task]
    params = init_params(jax.random.PRNGKey(args.seed), d, args.hidden, args.layers, seq_len, n_out, args.task)
    heads, task = args.heads, args.task

    def loss_fn(p, x, t, y):
        return -jnp.mean(jnp.sum(task_log_probs(p, x, t, y, heads, task, sizes), axis=1))

    @jax.jit
    def train_step(p, m, v, i, x, t, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, t, y)
        # Warm-up over 200 steps, then linear decay to zero at the last step.
        lr = args.lr * jnp.minimum(1.0, (i + 1) / 200.0) * (1.0 - i / args.steps)
        m = jax.tree.map(lambda a, b: 0.9 * a + 0.1 * b, m, g)
        v = jax.tree.map(lambda a, b: 0.999 * a + 0.001 * b * b, v, g)
        bc1, bc2 = 1 - 0.9 ** (i + 1), 1 - 0.999 ** (i + 1)
        p = jax.tree.map(lambda w, a, b: w - lr * (a / bc1) / (jnp.sqrt(b / bc2) + 1e-8), p, m, v)
        return p, m, v, loss

    def targets_for(y, idx, draw_rng):
        """The targets of rows idx (a span task draws one span per row: a constituent or not)."""
        return y[idx] if task != "span" else syntax.draw_spans(idx, y, draw_rng)

    m = jax.tree.map(jnp.zeros_like, params)
    v = jax.tree.map(jnp.zeros_like, params)
    started = time.time()
    for i in range(args.steps):
        idx = rng.integers(0, len(train_ids), args.batch_size)
        t = np.minimum((steps_t * rng.random(args.batch_size) ** args.t_power).astype(np.int64), steps_t - 1)
        y = targets_for(train_y, idx, rng)
        params, m, v, loss = train_step(params, m, v, i, noisy(train_ids[idx], t), t.astype(np.int32), y)
        if (i + 1) % 100 == 0 or i + 1 == args.steps:
            rate = (i + 1) / (time.time() - started)
            eta = (args.steps - i - 1) / rate
            print(f"\rstep {i + 1}/{args.steps} loss {float(loss):.4f} {rate:.1f} steps/s eta {eta:.0f}s", end="", file=sys.stderr)
    print(file=sys.stderr)

    # Dev accuracy per timestep range: per field (semantic), per word and per whole tag sequence (pos),
    # per drawn span and per constituent (span).
    predict = jax.jit(lambda x, t, y: logits_fn(params, hidden_fn(params, x, t, heads), y, task, len(sizes)))
    bins = [(0, steps_t // 20), (0, steps_t // 4), (steps_t // 4, steps_t // 2), (steps_t // 2, 3 * steps_t // 4), (3 * steps_t // 4, steps_t)]
    accuracy = {}
    dev_rng = np.random.default_rng(args.seed + 2)
    dev_targets = targets_for(dev_y, np.arange(len(dev_ids)), dev_rng)
    for lo, hi in bins:
        correct, n = {}, {}
        for s in range(0, len(dev_ids), 256):
            ids, y = dev_ids[s:s + 256], dev_targets[s:s + 256]
            t = rng.integers(lo, hi, len(ids))
            logits = np.asarray(predict(noisy(ids, t), t.astype(np.int32), y))
            for name, (c, k) in accuracy_counts(task, logits, y, fields, sizes, syntax if task != "semantic" else None).items():
                correct[name] = correct.get(name, 0) + c
                n[name] = n.get(name, 0) + k
        accuracy[f"{lo}-{hi - 1}"] = {name: float(correct[name] / max(n[name], 1)) for name in correct}

    # Export (latents, timesteps, targets) -> (log_prob, grad).
    def guide_fn(latents, timesteps, targets):
        def total(x):
            lp = jnp.sum(task_log_probs(params, x, timesteps, targets, heads, task, sizes), axis=1)
            return jnp.sum(lp), lp
        (_, lp), grad = jax.value_and_grad(total, has_aux=True)(latents)
        return lp, grad

    (b,) = jax.export.symbolic_shape("B")
    specs = [
        jax.ShapeDtypeStruct((b, seq_len, d), jnp.float32),
        jax.ShapeDtypeStruct((b,), jnp.int32),
        jax.ShapeDtypeStruct((b, len(fields)), jnp.int32),
    ]
    model = jax2onnx.to_onnx(guide_fn, specs, model_name="dlm_guide", opset=args.opset,
                             input_names=["latents", "timesteps_i32", "targets_i32"],
                             output_names=["log_prob", "grad"])
    model = int64_inputs(model, {"timesteps_i32": "timesteps", "targets_i32": "targets"})
    card = {
        "fields": card_fields,
        "embedding_sha256": embedding_fingerprint(embedding),
        "diffusion_steps": steps_t,
        "schedule": cfg["schedule"],
        "seq_len": seq_len,
        "embed_dim": d,
    }
    entry = model.metadata_props.add()
    entry.key, entry.value = CARD_KEY, json.dumps(card)
    onnx.checker.check_model(model)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out / "model.onnx"))
    (out / "card.json").write_text(json.dumps(card, indent=1) + "\n")

    # ONNX Runtime against JAX, at several batch sizes.
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    worst = 0.0
    for bs in (1, 3, 16):
        ids = dev_ids[:bs]
        t = rng.integers(0, steps_t, bs)
        x = noisy(ids, t).astype(np.float32)
        tg = dev_targets[:bs].astype(np.int64)
        if task != "span":
            tg[:, ::2] = -1  # half the fields unconstrained
        else:
            tg[0, 2] = -1  # one span free
        lp_ort, g_ort = sess.run(["log_prob", "grad"], {"latents": x, "timesteps": t.astype(np.int64), "targets": tg})
        lp_jax, g_jax = guide_fn(x, t.astype(np.int32), tg.astype(np.int32))
        rel = float(np.linalg.norm(g_ort - np.asarray(g_jax)) / max(np.linalg.norm(np.asarray(g_jax)), 1e-12))
        worst = max(worst, rel, float(np.max(np.abs(lp_ort - np.asarray(lp_jax)))))
    print(f"ONNX Runtime vs JAX: worst relative L2 / abs difference {worst:.2e}", file=sys.stderr)
    if worst > 1e-3:
        print("error: ONNX Runtime disagrees with JAX", file=sys.stderr)
        return 1

    report = {"task": task, "accuracy_by_timestep": accuracy, "labels": args.labels, "swap_names": args.swap_names, "swap_fields": args.swap_fields,
              "partial_names": args.partial_names,
              "ort_vs_jax": worst, "steps": args.steps,
              "generator": str(gen), "command": " ".join(sys.argv)}
    if task != "semantic":
        report["labels"] = syntax.provenance
    (out / "metrics.json").write_text(json.dumps(report, indent=1) + "\n")
    write_readme(out, report, card)
    print(json.dumps(report, indent=1))
    return 0


def write_readme(out: pathlib.Path, report: dict, card: dict) -> None:
    """README.md beside the model: dev-set accuracy per field and timestep range, and the command."""
    acc = report["accuracy_by_timestep"]
    ranges = list(acc)
    sha = card["embedding_sha256"]
    trained_for = (f"on noisy latents of the generator embedding with sha256 `{sha}` (T = {card['diffusion_steps']}, "
                   f"{card['schedule']} schedule, L = {card['seq_len']}, D = {card['embed_dim']}).")
    task = report.get("task", "semantic")
    if task == "semantic":
        intro = [f"p(field = value | x_t, t) for the {len(card['fields'])} E2E meaning-representation fields (each a",
                 f"categorical over its values plus `absent`), {trained_for}", "",
                 "Dev-set accuracy (E2E devset.csv references, timesteps drawn uniformly within each range; labels:",
                 "the values the text says)" if report.get("labels") == "text" else "the meaning representation's values):"]
        rows = [(f["name"], len(f["values"])) for f in card["fields"]]
    else:
        what = ("p(tag of word k | x_t, t), a Penn Treebank tag per word (fields pos.0 … pos.N)" if task == "pos" else
                "p(label | x_t, t, span), the constituent label (or `none`) of the word span span.start … span.end")
        labels = card["fields"][0 if task == "pos" else 2]["values"]
        tools = ", ".join(f"{k} {v}" for k, v in report["labels"]["debian_packages"].items())
        intro = [f"{what}, {trained_for}", "", f"Labels ({len(labels)}): {' '.join(labels)}.",
                 f"Labelled by guide/train/syntax_labels.py with Debian {tools}.", "",
                 "Dev-set accuracy (E2E devset.csv references, timesteps drawn uniformly within each range):"]
        rows = [(name, len(labels)) for name in acc[ranges[0]]]
    lines = [f"# Guide `{out.parent.name}` version {out.name}", "", *intro, "",
             "| measure | classes | " + " | ".join(f"t ∈ [{r}]" for r in ranges) + " |",
             "|---|---:|" + "---:|" * len(ranges)]
    for name, classes in rows:
        cells = " | ".join(f"{100 * acc[r][name]:.1f}%" for r in ranges)
        lines.append(f"| {name} | {classes} | {cells} |")
    lines += [
        "",
        f"ONNX Runtime vs JAX (log p and gradient, B = 1, 3, 16): worst difference {report['ort_vs_jax']:.1e}.",
        "",
        "Made with (after `deploy/setup.sh --train`):",
        "",
        "```",
        f".venv/bin/python {report['command']}",
        "```",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def int64_inputs(model: onnx.ModelProto, renames: dict[str, str]) -> onnx.ModelProto:
    """JAX exports integer inputs as int32; the contract is INT64. Each renamed input becomes an
    INT64 graph input followed by a Cast to the int32 the graph uses."""
    graph = model.graph
    casts = []
    for inp in graph.input:
        if inp.name in renames:
            new = renames[inp.name]
            casts.append(onnx.helper.make_node("Cast", [new], [inp.name], to=onnx.TensorProto.INT32, name=f"cast_{new}"))
            inp.name = new
            inp.type.tensor_type.elem_type = onnx.TensorProto.INT64
    for node in reversed(casts):
        graph.node.insert(0, node)
    return model


import jax2onnx  # noqa: E402  (imported late: it is slow to import and only needed for export)

if __name__ == "__main__":
    sys.exit(main())
