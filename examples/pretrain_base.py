"""Make the base model shipped in tinypeft/assets/base: pretrain on the prose corpus, then copy it in.

    python examples/pretrain_base.py            # 10-25 minutes on 2 CPU cores (see provenance.json)

It runs `tinypeft pretrain` with the settings below (seeded: the same machine and thread count give
the same weights), copies the model into the package, and writes provenance.json beside it (the
command, the time it took, the validation loss, the machine).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ASSET = os.path.join(HERE, "..", "tinypeft", "assets", "base")
SETTINGS = [
    "--corpus", "prose",
    "--n_layer", "4", "--n_embd", "128", "--n_head", "4", "--n_positions", "256",
    "--steps", "2000", "--warmup_steps", "100", "--batch_size", "8", "--seq_len", "256",
    "--learning_rate", "3e-3", "--eval_every", "250", "--checkpoint_every", "500", "--seed", "0",
]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/base", help="run folder for the pretraining")
    parser.add_argument("--no_install", action="store_true", help="train only; do not copy into the package")
    args, extra = parser.parse_known_args()
    from tinypeft.cli import main as tinypeft
    from tinypeft.io import atomic_write_bytes, load_json, save_json

    command = ["pretrain", *SETTINGS, "--out", args.out, *extra]
    t0 = time.perf_counter()
    status = tinypeft(command)
    if status:
        return status
    minutes = (time.perf_counter() - t0) / 60
    summary = load_json(os.path.join(args.out, "summary.json"))
    if args.no_install:
        return 0
    os.makedirs(ASSET, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        with open(os.path.join(args.out, "model", name), "rb") as f:
            atomic_write_bytes(os.path.join(ASSET, name), f.read())
    provenance = {
        "command": "tinypeft " + " ".join(command),
        "minutes": round(minutes, 1),
        "tokens_per_second": summary.get("tokens_per_second"),
        "val_loss_nats_per_byte": round(summary["val_loss"], 4),
        "val_bits_per_byte": round(summary["val_bits_per_byte"], 4),
        "evals": summary["evals"],
        "corpus": summary["corpus"],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
    }
    save_json(os.path.join(ASSET, "provenance.json"), provenance)
    print(f"installed into {os.path.normpath(ASSET)}: val loss {summary['val_loss']:.4f} nats/byte, {minutes:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
