"""The book's figures, each drawn from the code and data of this checkout (matplotlib, no screen).

A chapter shows figure NAME with `![caption](figures/NAME.png)`; the build fails on a name that is not
registered here. Figures that need the built-in corpus (the pipeline counts, the loss curve) prepare it
and train a short run, as `tinygrad-llm train` does (downloaded once, then cached).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

FIGURES = {}


def figure(name: str):
    """Register a function(ax_factory) -> matplotlib Figure under `name`."""
    def register(function):
        FIGURES[name] = function
        return function
    return register


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        from .errors import BookError
        raise BookError("the book's figures need matplotlib: pip install -e .[book]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _box(ax, x, y, w, h, text, color="#dde8f3", size=9):
    from matplotlib.patches import FancyBboxPatch
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", facecolor=color, edgecolor="#445"))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size)


def _arrow(ax, x0, y0, x1, y1):
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="->", color="#445"))


@figure("bpe_merge_tree")
def bpe_merge_tree():
    """The merge trees of the two longest tokens of the tokenizer chapter's worked example: leaves are
    bytes, an inner node sits at the height of the merge that made it."""
    from ..tokenizer import Tokenizer
    text = "low low low low low lower lower newest newest newest newest newest newest widest widest widest"
    toy = Tokenizer.train(text, vocab_size=256 + 10, progress=False)
    children = {256 + i: pair for i, pair in enumerate(toy.merges)}
    label = lambda token: toy.token_bytes(token).decode("utf-8").replace(" ", "\u2423")
    roots = sorted(children, key=lambda token: -len(toy.token_bytes(token)))[:2]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_xticks([])
    ax.set_yticks(range(0, max(roots) - 255 + 1))
    ax.set_yticklabels(["bytes"] + [str(n) for n in range(1, max(roots) - 255 + 1)], fontsize=8)
    ax.set_ylabel("merge", fontsize=8)
    next_leaf = [0.0]

    def place(token):
        """Draw the subtree of `token`; return the (x, y) of its node."""
        if token not in children:
            x, y = next_leaf[0], 0
            next_leaf[0] += 1
        else:
            left, right = (place(child) for child in children[token])
            x, y = (left[0] + right[0]) / 2, token - 255
            for child_x, child_y in (left, right):
                ax.plot([x, child_x], [y, child_y], color="#889", lw=0.9, zorder=1)
        ax.text(x, y, label(token), ha="center", va="center", fontsize=9, zorder=2,
                bbox=dict(boxstyle="round,pad=0.25", facecolor="#dde8f3" if token in children else "#f3e7d3",
                          edgecolor="#445"))
        return x, y

    for root in roots:
        place(root)
        next_leaf[0] += 1                                      # a gap between the trees
    ax.set_xlim(-0.7, next_leaf[0] - 0.3)
    ax.set_ylim(-0.7, max(roots) - 255 + 0.7)
    ax.set_title("merge trees of the worked example (height = merge number)", fontsize=9)
    return fig


@figure("architecture")
def architecture():
    """The decoder stack of GPT with the default configuration's numbers."""
    from ..model import GPTConfig
    config = GPTConfig()
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 7.5))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 15)
    ax.axis("off")
    _box(ax, 2.5, 0.3, 5, 0.8, f"token ids (B, T)")
    _box(ax, 2.5, 1.6, 5, 0.8, f"embed_tokens  ({config.vocab_size} × {config.d_model})")
    from matplotlib.patches import Rectangle
    ax.add_patch(Rectangle((1.5, 2.9), 7, 8.0, fill=False, linestyle="--", edgecolor="#889"))
    ax.text(8.6, 10.6, f"× {config.n_layers}", fontsize=11)
    _box(ax, 2.5, 3.2, 5, 0.8, "RMSNorm", "#f3e7d3")
    _box(ax, 2.5, 4.4, 5, 1.2, f"attention: q, k, v projections, RoPE,\n{config.n_heads} query heads / "
                                f"{config.n_kv_heads} kv heads of {config.head_dim}, causal")
    _box(ax, 4.4, 6.0, 1.2, 0.7, "+", "#eee")
    _box(ax, 2.5, 7.1, 5, 0.8, "RMSNorm", "#f3e7d3")
    _box(ax, 2.5, 8.3, 5, 1.2, f"SwiGLU MLP: silu(x W_gate) ∘ (x W_up) W_down\n"
                                f"{config.d_model} → {config.ffn_hidden} → {config.d_model}")
    _box(ax, 4.4, 9.9, 1.2, 0.7, "+", "#eee")
    _box(ax, 2.5, 11.4, 5, 0.8, "RMSNorm", "#f3e7d3")
    _box(ax, 2.5, 12.6, 5, 0.8, f"lm_head  ({config.d_model} → {config.vocab_size})"
                                 + ("  tied" if config.tie_embeddings else ""))
    _box(ax, 2.5, 13.8, 5, 0.8, "logits (B, T, V) → cross-entropy")
    for y0, y1 in ((1.1, 1.6), (2.4, 3.2), (4.0, 4.4), (5.6, 6.0), (6.7, 7.1), (7.9, 8.3), (9.5, 9.9),
                   (10.6, 11.4), (12.2, 12.6), (13.4, 13.8)):
        _arrow(ax, 5, y0, 5, y1)
    ax.annotate("", xy=(4.4, 6.35), xytext=(1.9, 2.8), arrowprops=dict(arrowstyle="->", color="#a44",
                                                                     connectionstyle="angle,angleA=90,angleB=0"))
    ax.annotate("", xy=(4.4, 10.25), xytext=(1.9, 6.7), arrowprops=dict(arrowstyle="->", color="#a44",
                                                                      connectionstyle="angle,angleA=90,angleB=0"))
    ax.text(0.1, 4.5, "residual", color="#a44", rotation=90, fontsize=9)
    return fig


@figure("block_shapes")
def block_shapes():
    """Tensor shapes through one decoder block at the default configuration, B = 2, T = 8."""
    from ..model import GPTConfig
    c = GPTConfig()
    batch, time = 2, 8
    rows = [("x (residual)", (batch, time, c.d_model)),
            ("RMSNorm(x)", (batch, time, c.d_model)),
            ("q = x W_q", (batch, time, c.n_heads * c.head_dim)),
            ("q as heads", (batch, c.n_heads, time, c.head_dim)),
            ("k, v as heads", (batch, c.n_kv_heads, time, c.head_dim)),
            ("scores q kᵀ/√D (per group)", (batch, c.n_heads, time, time)),
            ("attention out", (batch, c.n_heads, time, c.head_dim)),
            ("merged heads · W_o", (batch, time, c.d_model)),
            ("gate, up", (batch, time, c.ffn_hidden)),
            ("silu(gate) ∘ up · W_down", (batch, time, c.d_model))]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.axis("off")
    table = ax.table(cellText=[[name, " × ".join(str(s) for s in shape)] for name, shape in rows],
                     colLabels=["tensor", "shape"], loc="center", cellLoc="left", colWidths=[0.55, 0.35])
    table.scale(1, 1.35)
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    return fig


@figure("causal_mask_cache")
def causal_mask_cache():
    """The causal mask of 3 new queries over 8 keys (5 cached): aligned bottom-right."""
    from ..ops import attention
    mask = attention._causal_mask(3, 8, np)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(7, 2.8), gridspec_kw={"width_ratios": [1, 1]})
    full = attention._causal_mask(8, 8, np)
    for ax, m, title in ((axes[0], full, "training: 8 queries × 8 keys"),
                         (axes[1], mask, "decoding: 3 new queries, 5 keys cached")):
        ax.imshow(~m, cmap="Blues", vmin=-0.3, vmax=1.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("key position")
        ax.set_ylabel("query")
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(m.shape[0]))
        if m.shape[0] < m.shape[1]:
            ax.set_yticklabels([str(m.shape[1] - m.shape[0] + i) for i in range(m.shape[0])])
    fig.tight_layout()
    return fig


@figure("rope_rotation")
def rope_rotation():
    """F.rope applied to the unit vector (1, 0) of each channel pair (i, i + D/2) of the default head
    dimension: pair 0 over positions 0 … 15, and how many positions each pair takes to turn once."""
    from .. import functional as F
    from ..model import GPTConfig
    from ..tensor import Tensor
    config = GPTConfig()
    half, positions = config.head_dim // 2, 16
    x = np.zeros((1, 1, positions, config.head_dim))
    x[..., :half] = 1.0                                        # every pair starts at (1, 0)
    y = F.rope(Tensor(x), theta=config.rope_theta).data[0, 0]  # (T, D)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.3), gridspec_kw={"width_ratios": [1, 1.25], "wspace": 0.35})
    circle = np.linspace(0, 2 * np.pi, 200)
    ax = axes[0]
    ax.plot(np.cos(circle), np.sin(circle), color="#ccc", lw=0.8)
    ax.scatter(y[:, 0], y[:, half], c=np.arange(positions), cmap="viridis", s=22, zorder=2)
    for t in range(positions):
        ax.annotate(str(t), (y[t, 0], y[t, half]), xytext=(0.8 * y[t, 0], 0.8 * y[t, half]),
                    ha="center", va="center", fontsize=6.5)
    ax.set_xlim(-1.2, 1.2)
    ax.set_ylim(-1.2, 1.2)
    ax.set_aspect("equal")
    ax.set_title("pair 0 at positions 0 … 15 (1 radian a step)", fontsize=8)
    ax = axes[1]
    angle_per_position = np.arctan2(y[1, half:], y[1, :half])  # (D/2,) the rotation between positions 0 and 1
    turn = 2 * np.pi / angle_per_position                       # positions per full turn
    ax.semilogy(np.arange(half), turn, "o-", ms=3)
    ax.axhline(config.max_seq_len, color="#a44", lw=0.8)
    ax.text(0, config.max_seq_len * 1.3, f"context {config.max_seq_len}", color="#a44", fontsize=7)
    ax.set_xlabel("pair i")
    ax.set_ylabel("positions per full turn")
    ax.set_title(f"2π / θ^(−2i/D), D = {config.head_dim}, θ = {config.rope_theta:g}", fontsize=8)
    return fig


@figure("gqa_heads")
def gqa_heads():
    """Grouped-query attention: query head h reads kv head h // G."""
    heads, kv_heads = 8, 2
    group = heads // kv_heads
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 2.4))
    ax.set_xlim(-0.5, heads)
    ax.set_ylim(0, 3)
    ax.axis("off")
    colors = ["#cfe2f3", "#f4cccc", "#d9ead3", "#fff2cc"]
    for h in range(heads):
        _box(ax, h + 0.05, 2.0, 0.8, 0.6, f"q{h}", colors[h // group], 8)
    for j in range(kv_heads):
        left = j * group + (group - 1) / 2 - 0.6
        _box(ax, left, 0.3, 2.0, 0.6, f"k{j}, v{j}", colors[j], 8)
        for h in range(j * group, (j + 1) * group):
            _arrow(ax, h + 0.45, 2.0, left + 1.0, 0.9)
    ax.text(heads - 0.2, 2.8, f"H = {heads}, Hkv = {kv_heads}, G = {group}", fontsize=8, ha="right")
    return fig


@figure("attention_tiling")
def attention_tiling():
    """Flash attention's tiles of the T × T scores: a block of queries walks the key blocks left of the
    diagonal; blocks above it are skipped, diagonal blocks masked inside."""
    time, block_q, block_k = 512, 128, 64
    plt = _pyplot()
    from matplotlib.patches import Rectangle
    fig, ax = plt.subplots(figsize=(4.4, 4.4))
    for qi in range(time // block_q):
        for kj in range(time // block_k):
            q0, k0 = qi * block_q, kj * block_k
            if k0 > q0 + block_q - 1:
                color = "white"                                   # entirely above the diagonal: skipped
            elif k0 + block_k - 1 > q0:
                color = "#f6d7a7"                                 # crosses the diagonal: masked inside
            else:
                color = "#a9c6e8"                                 # fully visible
            ax.add_patch(Rectangle((k0, q0), block_k, block_q, facecolor=color, edgecolor="#556", lw=0.6))
    ax.plot([0, time], [0, time], color="#a44", lw=1)
    ax.set_xlim(0, time)
    ax.set_ylim(time, 0)
    ax.set_xlabel(f"keys (blocks of {block_k})")
    ax.set_ylabel(f"queries (blocks of {block_q})")
    ax.set_title("computed (blue), masked (orange), skipped (white)", fontsize=8)
    return fig


@figure("lsh_s_curve")
def lsh_s_curve():
    """The probability that MinHash LSH makes a pair a candidate, against its Jaccard similarity, for the
    pipeline's default threshold and signature length."""
    from ..data.dedup import collision_probability, lsh_params
    from ..data.pipeline import PipelineConfig
    config = PipelineConfig()
    bands, rows = lsh_params(config.near_threshold, config.num_perm)
    s = np.linspace(0, 1, 400)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot(s, collision_probability(s, bands, rows), label=f"b = {bands} bands of r = {rows} rows")
    for other_bands, other_rows in ((32, 4), (16, 8)):
        ax.plot(s, collision_probability(s, other_bands, other_rows), "--", lw=0.9,
                label=f"b = {other_bands}, r = {other_rows}")
    ax.axvline(config.near_threshold, color="#a44", lw=0.8)
    ax.text(config.near_threshold + 0.01, 0.05, f"threshold {config.near_threshold}", color="#a44", fontsize=8)
    ax.set_xlabel("Jaccard similarity s")
    ax.set_ylabel("P(candidate) = 1 − (1 − sʳ)ᵇ")
    ax.legend(fontsize=8)
    return fig


@figure("lr_schedule")
def lr_schedule():
    """The learning rate of every step of the default run, computed by optim.lr_schedule."""
    from ..optim import lr_schedule as schedule
    from ..train_config import TrainConfig
    config = TrainConfig()
    steps = np.arange(config.max_steps + 1)
    rates = [schedule(int(s), config.lr, config.warmup_steps, config.max_steps, config.min_lr_ratio)
             for s in steps]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 2.8))
    ax.plot(steps, rates)
    ax.axvline(config.warmup_steps, color="#a44", lw=0.8)
    ax.text(config.warmup_steps + 20, config.lr * 0.5, f"warmup ends (W = {config.warmup_steps})",
            color="#a44", fontsize=8)
    ax.axhline(config.lr * config.min_lr_ratio, color="#889", lw=0.8, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"peak {config.lr:g}, cosine to {config.lr * config.min_lr_ratio:g} at step "
                 f"{config.max_steps}", fontsize=9)
    fig.tight_layout()
    return fig


def _builtin_prepared() -> str:
    from ..train import builtin_corpus_dir
    return builtin_corpus_dir()


@figure("pipeline_counts")
def pipeline_counts():
    """Documents kept by each stage of `prepare` on the built-in corpus, from its report.json."""
    report = json.loads((Path(_builtin_prepared()) / "report.json").read_text(encoding="utf-8"))
    stages = report["stages"] if isinstance(report, dict) and "stages" in report else report
    names = [stage["stage"] for stage in stages]
    docs_in = [stage["docs_in"] for stage in stages]
    docs_out = [stage["docs_out"] for stage in stages]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    positions = np.arange(len(names))
    ax.bar(positions - 0.2, docs_in, 0.4, label="documents in", color="#a9c6e8")
    ax.bar(positions + 0.2, docs_out, 0.4, label="documents out", color="#4a78b0")
    for x, value in zip(positions, docs_out):
        ax.text(x + 0.2, value, str(value), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(positions)
    ax.set_xticklabels(names, rotation=20, fontsize=8)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("the built-in corpus through the pipeline (report.json)", fontsize=9)
    fig.tight_layout()
    return fig


@figure("loss_curve")
def loss_curve():
    """Train and validation loss of a short run of the default model on the built-in corpus."""
    from ..train import TrainConfig, train
    with tempfile.TemporaryDirectory(prefix="book_run_") as run:
        config = TrainConfig(out_dir=run, data=_builtin_prepared(), max_steps=300, eval_interval=50,
                             eval_iters=10, log_interval=10, sample_tokens=0, progress=False)
        train(config, log=lambda message: None)
        records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"), encoding="utf-8")]
    train_points = [(r["step"], r["loss"]) for r in records if "loss" in r and "event" not in r]
    val_points = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r and "event" not in r]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot(*zip(*train_points), label="train (mean of 10 steps)")
    ax.plot(*zip(*val_points), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend(fontsize=8)
    ax.set_title("the default model, first 300 steps", fontsize=9)
    return fig


@figure("quantization_error")
def quantization_error():
    """Errors of Q8_0 and Q4_0 on a Gaussian weight matrix, in units of each block's max |w|, with the
    derived bounds."""
    from ..quant.formats import dequantize_q4_0, dequantize_q8_0, quantize_q4_0, quantize_q8_0
    w = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)
    block_max = np.abs(w.reshape(256, -1, 32)).max(axis=-1, keepdims=True)           # (256, 32 blocks, 1)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.0))
    for ax, name, quantize, dequantize, bounds in (
            (axes[0], "Q8_0", quantize_q8_0, dequantize_q8_0, (1 / 254 + 2 ** -11,)),
            (axes[1], "Q4_0", quantize_q4_0, dequantize_q4_0, (1 / 16 + 2 ** -11, 1 / 8 + 2 ** -11))):
        error = (dequantize(quantize(w)) - w).reshape(256, -1, 32) / block_max        # relative to the block
        ax.hist(error.ravel(), bins=120, color="#4a78b0")
        for bound in bounds:
            for sign in (-1, 1):
                ax.axvline(sign * bound, color="#a44", lw=0.8)
        ax.set_title(f"{name}: (ŵ − w) / max|w| of the block", fontsize=8)
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def draw_all(folder: Path, names=None, log=print) -> list:
    """Draw the registered figures (or `names`) into folder/NAME.png; returns the paths."""
    plt = _pyplot()
    paths = []
    for name in names or sorted(FIGURES):
        fig = FIGURES[name]()
        path = Path(folder) / f"{name}.png"
        fig.savefig(path, dpi=150, bbox_inches="tight")
        plt.close(fig)
        log(f"  drew figures/{name}.png")
        paths.append(path)
    return paths
