"""Plot and tabulate benchmarks/attention.py's JSON (runs on the CPU; needs matplotlib).

    python benchmarks/attention_plot.py benchmarks/results/attention_h100.json
writes attention_h100.png beside the JSON and prints a markdown table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(rows: list[dict]) -> str:
    out = ["| kind | layout | model | batch / seq | context | hack-kv us | SDPA us | deq+SDPA us | x SDPA | TB/s (compressed) | L2 flushed: x SDPA (hack-kv / SDPA us) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        lay = r.get("layout", "paper")
        if r["kind"] == "decode":
            deq = f"{r['dequant_sdpa_us']:.1f}" if r["dequant_sdpa_us"] else "n/a"
            cold = ""
            if r.get("hack_us_cold_l2"):
                cold = (f"{r['speedup_vs_sdpa_cold_l2']:.2f} ({r['hack_us_cold_l2']:.1f} /"
                        f" {r['sdpa_us_cold_l2']:.1f})")  # fmt: skip
            out.append(
                f"| decode | {lay} | {r['model']} | b{r['batch']} | {r['context']} | {r['hack_us']:.1f} |"
                f" {r['sdpa_us']:.1f} | {deq} | {r['speedup_vs_sdpa']:.2f} | {r['hack_tbps_compressed']:.2f} | {cold} |"
            )
        elif r["kind"] == "prefill":
            out.append(
                f"| prefill hack (fp16 mode) | {lay} | {r['model']} | S{r['seq']} | causal | {r['hack_us']:.0f}"
                f" ({r['fp16_mode_us']:.0f}) | {r['sdpa_us']:.0f} | | {r['speedup_hack_vs_sdpa']:.2f}"
                f" ({r['speedup_fp16_mode_vs_sdpa']:.2f}) | | |"
            )
        elif r["kind"] == "quantize":
            out.append(
                f"| quantize-and-pack | {lay} | K+V d128 | 8 heads | {r['tokens']} | {r['us']:.1f} | | |"
                f" {r['fraction_of_copy']:.2f} of copy | {r['tbps_read_plus_written']:.2f} | |"
            )
    return "\n".join(out)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    ax = axes[0]
    dec = [r for r in rows if r["kind"] == "decode"]
    series = sorted({(r.get("layout", "paper"), r["model"], r["batch"]) for r in dec})
    for lay, model, b in series:
        rs = [
            r for r in dec if (r.get("layout", "paper"), r["model"], r["batch"]) == (lay, model, b)
        ]
        rs.sort(key=lambda r: r["context"])
        (line,) = ax.plot(
            [r["context"] for r in rs],
            [r["speedup_vs_sdpa"] for r in rs],
            "o-" if lay == "kivi" else "x--",
            label=f"{lay} {model} b{b}",
        )
        cold = [r for r in rs if r.get("speedup_vs_sdpa_cold_l2")]
        if cold:  # same series with L2 flushed before every call: dotted, same colour
            ax.plot(
                [r["context"] for r in cold],
                [r["speedup_vs_sdpa_cold_l2"] for r in cold],
                ":",
                marker=".",
                color=line.get_color(),
            )
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(4.0, color="g", ls="--", lw=0.8, label="target b16@32K (4x)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("speedup vs torch SDPA fp16")
    ax.set_title("decode: hack-kv paged 2-bit vs SDPA (dotted: L2 flushed)")
    ax.legend(fontsize=7)
    ax = axes[1]
    pre = [r for r in rows if r["kind"] == "prefill"]
    labels = [f"{r.get('layout', 'paper')}\n{r['model']}\nS{r['seq']}" for r in pre]
    x = range(len(pre))
    ax.bar(
        [i - 0.2 for i in x],
        [r["speedup_hack_vs_sdpa"] for r in pre],
        0.4,
        label="hack (int8 codes)",
    )
    ax.bar(
        [i + 0.2 for i in x],
        [r["speedup_fp16_mode_vs_sdpa"] for r in pre],
        0.4,
        label="fp16 attend + store codes",
    )
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.3, color="g", ls="--", lw=0.8, label="target 1.3x")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("speedup vs SDPA causal (quantization included)")
    ax.set_title("prefill")
    ax.legend(fontsize=7)
    m = data["meta"]
    fig.suptitle(
        f"{m['device']}, torch {m['torch']}, triton {m['triton']}, commit {m['commit']}, {m['date']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    src = Path(sys.argv[1])
    data = json.loads(src.read_text())
    print(table(data["rows"]))
    plot(data, src.with_suffix(".png"))
    print(f"wrote {src.with_suffix('.png')}")


if __name__ == "__main__":
    main()
