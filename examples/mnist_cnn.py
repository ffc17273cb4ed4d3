"""MNIST CNN case study: train, IB-prune with the callback, strip, export to TFLite.

The design notes' model, Conv2D(32, 3) - MaxPool - Conv2D(64, 3) - MaxPool - Flatten -
Dense(10), is trained densely, pruned to `--sparsity` with `kib.IBPruning` (IB scores on a
held-out split, polynomial schedule), stripped to a plain Keras model and exported to a
sparse float32 and an int8 TFLite file. Accuracy, precision, recall, F1 (macro), non-zero
parameters and file sizes are printed before and after.

Data: the MNIST IDX files (`t10k-images-idx3-ubyte.gz`, `t10k-labels-idx1-ubyte.gz`) in
`--data-dir` (default: `$KIB_MNIST_DIR`, else `../shared/data/mnist-t10k` next to the
repository). `--data mnist` requires them (an error names the folder when they are
missing); `--data digits` uses scikit-learn's 8x8 digits; `--data auto` (default) falls
back to digits with a warning on stderr.

    python examples/mnist_cnn.py --data-dir ../shared/data/mnist-t10k
    python examples/mnist_cnn.py --quick          # (or KIB_QUICK=1) a small smoke run
"""

from __future__ import annotations

import argparse
import gzip
import os
import pathlib
import sys
import tempfile
import time

import keras
import numpy as np

import keras_ibprune as kib

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_MNIST = os.environ.get("KIB_MNIST_DIR", str(REPO.parent / "shared/data/mnist-t10k"))


def read_idx(path):
    """Reads a (gzipped) IDX file into a uint8 array of the shape its header gives."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"Not an unsigned-byte IDX file. Received: {path}")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_data(data_dir, n_train, seed=0, data="auto"):
    """`(train, held_out, test)` splits of MNIST (from IDX files) or of sklearn digits."""
    d = pathlib.Path(data_dir) if data_dir else None
    images = d / "t10k-images-idx3-ubyte.gz" if d else None
    found = images is not None and images.exists()
    if data == "mnist" and not found:
        raise SystemExit(f"mnist_cnn.py: error: MNIST IDX files not found. Expected "
                         f"t10k-images-idx3-ubyte.gz in --data-dir. Received: {data_dir}")
    if data == "auto" and not found:
        print(f"warning: MNIST IDX files not found in {data_dir}; using scikit-learn's 8x8 "
              "digits instead (pass --data-dir DIR, or --data digits to silence this)",
              file=sys.stderr)
    if found and data != "digits":
        x = read_idx(images)[..., None].astype("float32") / 255.0
        y = read_idx(d / "t10k-labels-idx1-ubyte.gz").astype("int64")
        name = f"MNIST ({d})"
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = (digits.images / 16.0).astype("float32")[..., None]
        y = digits.target.astype("int64")
        name = "scikit-learn digits"
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_eval = min(1000, len(x) // 5)
    n_train = min(n_train, len(x) - 2 * n_eval)
    held = slice(n_train, n_train + n_eval)
    test = slice(len(x) - n_eval, len(x))
    return name, (x[:n_train], y[:n_train]), (x[held], y[held]), (x[test], y[test])


def build_model(input_shape):
    """Conv2D(32,3)-MaxPool-Conv2D(64,3)-MaxPool-Flatten-Dense(10) ('same' padding on 8x8)."""
    pad = "valid" if input_shape[0] >= 28 else "same"
    L = keras.layers
    return keras.Sequential(
        [
            keras.Input(input_shape),
            L.Conv2D(32, 3, padding=pad, activation="relu", name="conv1"),
            L.MaxPooling2D(name="pool1"),
            L.Conv2D(64, 3, padding=pad, activation="relu", name="conv2"),
            L.MaxPooling2D(name="pool2"),
            L.Flatten(name="flatten"),
            L.Dense(10, name="logits"),
        ],
        name="mnist_cnn",
    )


def main(argv=None):
    quick_env = os.environ.get("KIB_QUICK") == "1"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=DEFAULT_MNIST, help="folder with the MNIST IDX files")
    p.add_argument("--data", choices=["auto", "mnist", "digits"], default="auto",
                   help="mnist (files required), digits, or auto (mnist if found, with a "
                        "warning otherwise)")
    p.add_argument("--sparsity", type=float, default=0.9, help="target sparsity")
    p.add_argument("--epochs", type=int, default=None, help="dense training epochs")
    p.add_argument("--prune-epochs", type=int, default=None, help="pruning + fine-tuning epochs")
    p.add_argument("--n-train", type=int, default=None, help="training images")
    p.add_argument("--out-dir", default=None, help="where to write the files (default: temp)")
    p.add_argument("--quick", action="store_true", default=quick_env,
                   help="small smoke run (also KIB_QUICK=1)")
    args = p.parse_args(argv)
    epochs = args.epochs or (1 if args.quick else 3)
    prune_epochs = args.prune_epochs or (2 if args.quick else 4)
    n_train = args.n_train or (1000 if args.quick else 8000)
    out_dir = pathlib.Path(args.out_dir or tempfile.mkdtemp(prefix="kib-mnist-"))
    out_dir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    keras.utils.set_random_seed(0)
    name, (xtr, ytr), (xval, yval), (xte, yte) = load_data(args.data_dir, n_train, data=args.data)
    print(f"data: {name}: {len(xtr)} train / {len(xval)} held-out / {len(xte)} test")

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    dense = build_model(xtr.shape[1:])
    dense.compile(keras.optimizers.Adam(2e-3), loss, metrics=["accuracy"])
    dense.fit(xtr, ytr, batch_size=64, epochs=epochs, verbose=2)
    print(f"dense model trained ({time.perf_counter() - start:.0f}s)")

    # Prune: wrap, then fit with the IBPruning callback (IB scores on the held-out split).
    pruned = kib.prune(dense)
    pruned.compile(keras.optimizers.Adam(1e-3), loss, metrics=["accuracy"])
    ramp = max(1, prune_epochs // 2)
    callback = kib.IBPruning(
        kib.PolynomialDecay(0.0, args.sparsity, begin_epoch=0, end_epoch=ramp),
        held_out=(xval, yval),
        verbose=1,
    )
    pruned.fit(xtr, ytr, batch_size=64, epochs=prune_epochs, callbacks=[callback], verbose=2)
    final = kib.strip_pruning(pruned)  # plain Keras model, masks baked into the weights
    print(kib.sparsity_summary(final))

    # Files: .keras, and TFLite (float32 sparse, int8 sparse) verified against Keras.
    rows = {}
    for tag, model in (("dense", dense), ("pruned", final)):
        path = out_dir / f"{tag}.keras"
        model.save(path)
        f32 = kib.export_tflite(model, out_dir / f"{tag}.tflite", sparse=tag == "pruned",
                            verify_data=xte, compare_dense=False, latency_runs=0)
        i8 = kib.export_tflite(model, out_dir / f"{tag}_int8.tflite", quantize="int8",
                           sparse=tag == "pruned", representative_data=xval, verify_data=xte,
                           compare_dense=False, latency_runs=0, min_agreement=0.95)
        rows[tag] = {
            **kib.evaluate(model, xte, yte),
            "nonzero params": int(sum(np.count_nonzero(w) for w in model.get_weights())),
            ".keras bytes": path.stat().st_size,
            ".keras gzip bytes": len(gzip.compress(path.read_bytes())),
            ".tflite bytes": f32.file_bytes,
            "int8 .tflite bytes": i8.file_bytes,
            "int8 accuracy": kib.evaluate(out_dir / f"{tag}_int8.tflite", xte, yte)["accuracy"],
        }
    print(f"\n{'test split':<20} {'dense':>12} {'pruned':>12}")
    for key in rows["dense"]:
        a, b = rows["dense"][key], rows["pruned"][key]
        fmt = "{:>12.4f}" if isinstance(a, float) else "{:>12,}"
        print(f"{key:<20} {fmt.format(a)} {fmt.format(b)}")
    print(f"files in {out_dir}; done in {time.perf_counter() - start:.0f}s")
    return rows


if __name__ == "__main__":
    main()
