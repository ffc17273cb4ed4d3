"""Text classification with a small Transformer encoder, IB-pruned and exported to TFLite.

The design notes' BERT case scaled down to a CPU: token + position Embedding, one
Transformer block (MultiHeadAttention and a feed-forward Dense pair, residuals and
LayerNormalization), average pooling and a Dense classifier. Only the attention
projections and the feed-forward kernels are pruned (`kib.prune(model, layers=[...])`),
with IB scores on a held-out split; the embeddings and the classifier stay dense.

Data. When the real **SMS Spam Collection** (5,574 messages, ham/spam, 13 % spam) is present
at `../shared/data/sms-spam/SMSSpamCollection` (next to the repository; or pass `--corpus`),
the example uses it: exact duplicate texts are dropped *before* splitting (403 copies: a random
split would put the same message in train and test), then a stratified 70/15/15
train/validation/test split with seed 0; the held-out batch for the IB statistics comes from
the validation split, and the test split reports accuracy and macro precision / recall / F1
(the classes are imbalanced: accuracy alone flatters a model that says "ham"). Without that
file (the package never needs it) it falls back to a **generated** sentiment task, and says
so in its output: sentences of filler words, positive and negative words, negators ("not",
"never") that flip the next sentiment word and intensifiers ("very") that double it; the
label is the sign of the total. `--data generated` forces the fallback; `--corpus FILE.tsv`
reads any `label<TAB>text` file. Token ids are int32 inputs (Embedding), in Keras and in
the exported `.tflite` file.

    python examples/text_classification.py
    python examples/text_classification.py --corpus reviews.tsv
    python examples/text_classification.py --quick    # (or KIB_QUICK=1) a small smoke run
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

import keras
import numpy as np

import keras_ibprune as kib

SEQ_LEN = 24  # generated sentences
SMS_SEQ_LEN = 40  # SMS messages: median 62 characters, a long tail to 910
SMS_PATH = (pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sms-spam"
            / "SMSSpamCollection")
POSITIVE = ("good great excellent superb lovely delightful pleasant enjoyable brilliant "
            "charming wonderful fun").split()
NEGATIVE = ("bad awful terrible poor boring dull dreadful weak annoying clumsy messy "
            "disappointing").split()
NEGATORS = ["not", "never", "hardly"]
INTENSIFIERS = ["very", "really", "truly"]
FILLER = ("the a movie film plot story actor actors scene scenes music ending it was is and "
          "but with this that of in on for its script cast director camera").split()


def generated_corpus(n, seed=0):
    """Generated sentiment sentences `(texts, labels)`; label 1 = positive total."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    while len(texts) < n:
        words, total = [], 0.0
        for _ in range(int(rng.integers(2, 5))):  # sentiment phrases
            words += list(rng.choice(FILLER, size=int(rng.integers(1, 3))))
            polarity = 1.0 if rng.random() < 0.5 else -1.0
            phrase = []
            if rng.random() < 0.3:  # "not good" counts as negative
                phrase.append(str(rng.choice(NEGATORS)))
            if rng.random() < 0.3:  # "very good" counts twice
                phrase.append(str(rng.choice(INTENSIFIERS)))
            phrase.append(str(rng.choice(POSITIVE if polarity > 0 else NEGATIVE)))
            sign = -1.0 if phrase[0] in NEGATORS else 1.0
            weight = 2.0 if any(w in INTENSIFIERS for w in phrase) else 1.0
            words += phrase
            total += sign * weight * polarity
        if total == 0:
            continue
        texts.append(" ".join(words[:SEQ_LEN]))
        labels.append(int(total > 0))
    return texts, np.asarray(labels, dtype="int64")


def deduplicate(texts, labels):
    """Keeps the first copy of every distinct text; returns `(texts, labels, dropped)`."""
    seen, keep = set(), []
    for i, text in enumerate(texts):
        if text not in seen:
            seen.add(text)
            keep.append(i)
    return [texts[i] for i in keep], np.asarray(labels)[keep], len(texts) - len(keep)


def stratified_split(n_labels, seed=0, fractions=(0.7, 0.15, 0.15)):
    """Index arrays `(train, val, test)`, each with the class proportions of `n_labels`."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(n_labels))
    train, rest = train_test_split(idx, train_size=fractions[0], stratify=n_labels,
                                   random_state=seed)
    val, test = train_test_split(rest, test_size=fractions[2] / (1 - fractions[0]),
                                 stratify=n_labels[rest], random_state=seed)
    return train, val, test


def read_corpus(path):
    """`(texts, labels)` from a `label<TAB>text` file; labels become ids 0..k-1."""
    texts, names = [], []
    for i, line in enumerate(pathlib.Path(path).read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        if "\t" not in line:
            raise ValueError(f"Each line must be 'label<TAB>text'. Received: line {i + 1}: "
                             f"{line[:60]!r}")
        label, text = line.split("\t", 1)
        names.append(label.strip())
        texts.append(text)
    classes = sorted(set(names))
    return texts, np.asarray([classes.index(c) for c in names], dtype="int64")


@keras.saving.register_keras_serializable(package="examples")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned embedding of each position to a `(batch, length, dim)` input."""

    def build(self, input_shape):
        self.positions = self.add_weight(
            shape=tuple(input_shape[1:]), initializer="glorot_uniform", name="positions")

    def call(self, x):
        return x + self.positions


def build_model(vocab_size, num_classes, dim=32, heads=2, ff=64, seq_len=SEQ_LEN):
    """Int token ids -> token+position embedding -> one Transformer block -> mean pooling
    -> Dense."""
    L = keras.layers
    tokens = keras.Input((seq_len,), dtype="int32", name="tokens")
    x = L.Embedding(vocab_size, dim, name="token_embedding")(tokens)
    x = PositionEmbedding(name="position_embedding")(x)
    attn = L.MultiHeadAttention(heads, dim // heads, name="attention")(x, x)
    x = L.LayerNormalization(name="norm1")(L.Add()([x, attn]))
    h = L.Dense(ff, activation="relu", name="ff_in")(x)
    h = L.Dense(dim, name="ff_out")(h)
    x = L.LayerNormalization(name="norm2")(L.Add()([x, h]))
    x = L.GlobalAveragePooling1D(name="pool")(x)
    out = L.Dense(num_classes, name="logits")(x)
    return keras.Model(tokens, out, name="tiny_transformer")


def main(argv=None):
    quick_env = os.environ.get("KIB_QUICK") == "1"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", help="label<TAB>text file (default: the SMS Spam Collection "
                   "when present, else the generated task)")
    p.add_argument("--data", choices=("auto", "generated"), default="auto",
                   help="'generated' forces the synthetic task")
    p.add_argument("--samples", type=int, default=None, help="generated sentences")
    p.add_argument("--sparsity", type=float, default=0.8, help="target sparsity")
    p.add_argument("--score", default="ib", help="pruning score (default: ib)")
    p.add_argument("--epochs", type=int, default=None, help="dense training epochs")
    p.add_argument("--prune-epochs", type=int, default=None, help="pruning epochs")
    p.add_argument("--out-dir", default=None, help="where to write the files (default: temp)")
    p.add_argument("--quick", action="store_true", default=quick_env,
                   help="small smoke run (also KIB_QUICK=1)")
    args = p.parse_args(argv)
    epochs = args.epochs or (3 if args.quick else 8)
    prune_epochs = args.prune_epochs or (2 if args.quick else 4)
    out_dir = pathlib.Path(args.out_dir or tempfile.mkdtemp(prefix="kib-text-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    keras.utils.set_random_seed(0)

    corpus = args.corpus or (SMS_PATH if args.data == "auto" and SMS_PATH.is_file() else None)
    if corpus:
        texts, labels = read_corpus(corpus)
        texts, labels, dropped = deduplicate(texts, labels)
        if args.quick:  # a smoke run: a stratified subset
            keep, _, _ = stratified_split(labels, fractions=(0.3, 0.35, 0.35))
            texts, labels = [texts[i] for i in sorted(keep)], labels[sorted(keep)]
        name = "SMS Spam Collection (real data)" if pathlib.Path(corpus) == SMS_PATH else (
            f"corpus {corpus}")
        source = f"{name}, {dropped} duplicate texts dropped before splitting"
        seq_len = SMS_SEQ_LEN
        split = stratified_split(labels)
    else:
        texts, labels = generated_corpus(args.samples or (1500 if args.quick else 6000))
        source = "GENERATED sentiment task (synthetic sentences, see the module docstring)"
        seq_len = SEQ_LEN
        split = stratified_split(labels)
    vectorize = keras.layers.TextVectorization(max_tokens=5000, output_sequence_length=seq_len)
    vectorize.adapt([texts[i] for i in split[0]])  # the vocabulary of the training split
    x = np.asarray(vectorize(np.asarray(texts)), dtype="int32")  # token ids
    (xtr, ytr), (xval, yval), (xte, yte) = ((x[i], labels[i]) for i in split)
    num_classes = int(labels.max()) + 1
    print(f"data: {source}: {len(xtr)} train / {len(xval)} validation (held-out batch) / "
          f"{len(xte)} test, stratified, seed 0; {num_classes} classes with counts "
          f"{np.bincount(labels).tolist()}, vocabulary {vectorize.vocabulary_size()}")
    print(f"example: {texts[split[0][0]][:80]!r} -> label {ytr[0]}")

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    dense = build_model(vectorize.vocabulary_size(), num_classes, seq_len=seq_len)
    dense.compile(keras.optimizers.Adam(4e-3), loss, metrics=["accuracy"])
    dense.fit(xtr, ytr, batch_size=64, epochs=epochs, validation_data=(xval, yval), verbose=2)

    # Prune only the attention and feed-forward kernels (the "BERT" part).
    pruned = kib.prune(dense, layers=["attention", "ff_in", "ff_out"])
    pruned.compile(keras.optimizers.Adam(1e-3), loss, metrics=["accuracy"])
    schedule = kib.PolynomialDecay(0.0, args.sparsity, 0, max(1, prune_epochs // 2))
    pruned.fit(xtr, ytr, batch_size=64, epochs=prune_epochs, verbose=2,
               callbacks=[kib.IBPruning(schedule, score=args.score, held_out=(xval, yval),
                                        verbose=1)])
    final = kib.strip_pruning(pruned)
    print(kib.sparsity_summary(final))

    before, after = kib.evaluate(dense, xte, yte), kib.evaluate(final, xte, yte)
    report = kib.export_tflite(final, out_dir / "text.tflite", verify_data=xte, latency_runs=20)
    on_device = kib.evaluate(str(out_dir / "text.tflite"), xte, yte)
    print(f"\ntest split ({len(xte)} samples; precision / recall / f1 are macro averages)")
    print(f"{'metric':<12} {'dense':>8} {'pruned':>8} {'tflite':>8}")
    for k in before:
        print(f"{k:<12} {before[k]:>8.4f} {after[k]:>8.4f} {on_device[k]:>8.4f}")
    print(f"TFLite input: {report.inputs[0]['dtype']} token ids {report.inputs[0]['shape']}")
    print(f"TFLite: {report.file_bytes:,} bytes sparse vs {report.dense_bytes:,} dense "
          f"(top-1 agreement with Keras {report.top1_agreement:.4f}, "
          f"{report.latency_ms:.3f} ms per sentence)")
    print(f"data was: {source}")
    print(f"files in {out_dir}; done in {time.perf_counter() - start:.0f}s")
    return {"dense": before, "pruned": after, "tflite": on_device}


if __name__ == "__main__":
    main()
