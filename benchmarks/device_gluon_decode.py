"""The Gluon decode kernel (kivi_gluon.py) against the Triton one, on the GPU: checked, timed.

    python benchmarks/device_gluon_decode.py --out gluon.json --variants '[[64, 4, 0, 128]]'
Each variant ([waves, min pages a split, register cap (0: none), most splits(, programs up to which HOIST(, 1: also the short path))])
is first checked
against reference_attention (ragged batch of 3000 / 65 / 700 tokens, 8 kv heads), then timed on
decode with 32 q / 8 kv heads (--head-dim 128 or 64, --bits 2 or 4) at the given shapes, with the tuned Triton kernel and SDPA
timed in the same run (rows alternate: Triton, then each Gluon variant, `--rounds` times).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import device_kivi_variants  # noqa: E402
from device_kivi_variants import _histogram, _sass, case, rel_err  # noqa: E402

from hack_kernels import HackConfig  # noqa: E402
from hack_kernels.triton import launch  # noqa: E402
from hack_kernels.triton.decode import decode_attention  # noqa: E402


def _time(shapes: dict) -> dict:
    row = {}
    for (b, c), (q, cache, pages, sdpa) in shapes.items():
        us = 1e3 * do_bench_cudagraph(
            lambda q=q, cache=cache, pages=pages: decode_attention(q, cache, max_pages=pages),
            rep=100,
        )
        row[f"b{b}_{c}_us"] = round(us, 2)
        row[f"b{b}_{c}_x_sdpa"] = round(sdpa / us, 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="16x32768,1x32768,1x16384,1x131072,64x4096")
    ap.add_argument("--variants", default="[[64, 4, 0, 128]]")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--commit", default="")
    ap.add_argument("--head-dim", type=int, default=128, choices=[64, 128])
    ap.add_argument("--bits", type=int, default=2, choices=[2, 4])
    args = ap.parse_args()
    d = args.head_dim
    cfg = HackConfig(layout="kivi", bits=args.bits)
    device_kivi_variants.CFG = cfg  # the pages case() builds
    pairs = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    shapes = {(b, c): case(b, c, d) for b, c in pairs}
    key = ("decode_kivi", d, 64)
    base = dict(launch.TUNED.get(key, {}))
    rows = []
    for rnd in range(args.rounds):
        confs = [("triton", {**base, "GLUON": False})]
        for waves, minp, maxnreg, most, *more in json.loads(args.variants):
            g = {"waves": waves, "min_pages": minp, "maxnreg": maxnreg, "max_splits": most}
            g["hoist_below"] = more[0] if more else 0
            g["short"] = bool(more[1]) if len(more) > 1 else False
            name = f"gluon w{waves} m{minp} r{maxnreg} s{most} h{g['hoist_below']}"
            name += " short" if g["short"] else ""
            confs.append((name, {**base, "GLUON": True, "gluon": g}))
        for name, conf in confs:
            launch.TUNED[key] = conf
            row = {"round": rnd, "kernel": name}
            try:
                row["rel_err"] = rel_err(cfg, d)
                row.update(_time(shapes))
                ck = launch.LAST_COMPILED.get(
                    ("decode_kivi_gluon" if "gluon" in name else "decode_kivi", d, 64)
                )
                row["n_regs"] = getattr(ck, "n_regs", None)
                row["n_spills"] = getattr(ck, "n_spills", None)
                sass = _sass(ck) if rnd == 0 else None
                if sass:
                    safe = name.replace(" ", "_")
                    (Path(args.out).parent / f"sass_{safe}.txt").write_text(sass)
                    row["sass_opcodes"] = _histogram(sass)
            except Exception as e:  # noqa: BLE001 - record the failing variant, go on
                row["error"] = f"{type(e).__name__}: {str(e)[:600]}"
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "sass_opcodes"}), flush=True)
    launch.TUNED[key] = base
    meta = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": args.commit
        or subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "head_dim": d,
        "bits": args.bits,
    }
    Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
