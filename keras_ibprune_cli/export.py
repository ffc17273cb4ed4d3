"""`keras-ibprune export`: a verified (sparse, optionally quantized) `.tflite` file."""

from __future__ import annotations

import time

from keras_ibprune_cli import _common as C

NAME = 'export'
HELP = "export a .keras model to a verified (sparse, optionally quantized) .tflite file"
EPILOG = (
    "examples:\n"
    "  keras-ibprune export pruned.keras pruned.tflite\n"
    "  keras-ibprune export pruned.keras pruned_int8.tflite --quantize int8 "
    "--data held_out.npz"
)


def configure(p):
    p.add_argument("model", help="a .keras model (wrapped or stripped)")
    p.add_argument("out", help="output .tflite file")
    p.add_argument("--quantize", default="none", choices=["none", "dynamic", "float16", "int8"],
                   help="weight/activation quantization (int8 needs --data)")
    p.add_argument("--data", metavar="DATA.npz",
                   help="inputs 'x' for int8 calibration and verification; with 'y' also "
                        "accuracy/precision/recall/F1 of Keras and TFLite")
    p.add_argument("--encoding", default="auto", choices=["auto", "sparse", "dense"],
                   help="weight encoding: TFLite's sparse tensors, dense, or 'auto' (default): "
                        "whichever is smaller once gzip-compressed")
    p.add_argument("--dense", action="store_true", help="same as --encoding dense")
    p.add_argument("--latency-runs", type=int, default=50,
                   help="timed interpreter runs (0 to skip)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max |Keras - TFLite| relative to max(1, max |Keras|) (default per "
                        "quantization: 1e-4 float, 1e-2 float16, 5e-2 dynamic, 0.2 int8)")
    p.add_argument("--min-agreement", type=float, default=None,
                   help="minimum top-1 agreement with Keras (default 0.995 float, 0.98 int8)")


def run(args):
    import keras_ibprune as kib

    start = time.perf_counter()
    quantize = None if args.quantize == "none" else args.quantize
    C.check_out(args.out, ".tflite")
    if quantize == "int8" and args.data is None:
        raise C.CLIError("--quantize int8 needs calibration inputs: pass --data FILE.npz with "
                       "an array 'x'. Received: no --data")
    model = C.load_model(args.model)
    x = y = None
    if args.data is not None:
        x, y = C.load_npz(args.data, "--data", model, need_y=False)
    C.step(1, 3, f"loaded '{model.name}'" + (f" and {len(x)} samples" if x is not None else ""),
          start)
    encoding = "dense" if args.dense else args.encoding
    sparse = {"auto": "auto", "sparse": True, "dense": False}[encoding]
    print(f"      converting (quantize={quantize or 'none'}, encoding={encoding}), "
          "verifying against Keras, timing ...", flush=True)
    try:
        report = kib.export_tflite(model, args.out, sparse=sparse, quantize=quantize,
                               representative_data=x, verify_data=x,
                               latency_runs=args.latency_runs, tolerance=args.tolerance,
                               min_agreement=args.min_agreement)
    except kib.ExportVerificationError as err:
        raise C.CLIError(f"the exported file does not match the Keras model (pass --tolerance "
                       f"/ --min-agreement to accept a larger difference): {err}",
                       status=1) from err
    except (ValueError, OSError) as err:
        raise C.CLIError(str(err)) from err
    C.step(2, 3, f"wrote {args.out}", start)
    print(report)
    if y is not None and C.is_classifier(model, x, y):
        plain = kib.strip_pruning(model) if kib.stats.find_wrappers(model) else model
        for name, target in (("keras", plain), ("tflite", args.out)):
            m = kib.evaluate(target, x, y)
            print(f"{name:<7} " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
    C.step(3, 3, f"done: {report.file_bytes:,} bytes", start)
    return 0
