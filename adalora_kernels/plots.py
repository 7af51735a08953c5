"""Plots drawn from result rows (never from hand-written numbers)."""

from __future__ import annotations


def plot_rows(rows: list[dict], command: str, path: str, title: str = "") -> None:
    """bench: fwd+bwd slowdown vs the frozen nn.Linear per case and variant; memory: saved bytes per rank budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    if command == "bench":
        timed = [r for r in rows if r["op"] in ("fwd_bwd", "fwd", "bwd") and "slowdown_vs_linear" in r]
        op = "fwd_bwd" if any(r["op"] == "fwd_bwd" for r in timed) else (timed[0]["op"] if timed else "fwd_bwd")
        timed = [r for r in timed if r["op"] == op]
        cases = sorted({(r["tokens"], r["in"], r["out"], r["r"], r["dropout"]) for r in timed})
        variants = sorted({r["variant"] for r in timed}, key=lambda v: (v != "linear", v))
        width = 0.8 / max(len(variants), 1)
        by_key = {(r["variant"], r["tokens"], r["in"], r["out"], r["r"], r["dropout"]): r for r in timed}
        for j, variant in enumerate(variants):
            values = [by_key.get((variant, *c), {}).get("slowdown_vs_linear", 0.0) for c in cases]
            ax.bar([i + j * width for i in range(len(cases))], values, width, label=variant)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels([f"{t}×{i}×{o}\nr={r} p={p}" for t, i, o, r, p in cases], fontsize=7)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_ylabel(f"{op} time / frozen nn.Linear")
    else:
        saved = [r for r in rows if r["op"] == "saved_bytes" and r.get("scope") != "llama_block"]
        saved = [r for r in saved if r["budget_r"] == r["r"]]  # unpruned
        for variant in sorted({r["variant"] for r in saved}):
            for p in sorted({r["dropout"] for r in saved}):
                pts = sorted(
                    (r["r"], r["bytes"] / 2**20) for r in saved if r["variant"] == variant and r["dropout"] == p
                )
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{variant}, dropout {p}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("init_r")
        ax.set_ylabel("MiB saved for backward (one layer)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
