"""Long-context evaluation for the `eval` stage: needle grid, RazorAttention, LongCache, RAG vs. long context.

A helper of `tasks/eval.py` (kept apart to keep both modules short). Haystacks are built like the
sample world's `longctx` set (filler sentences, one "The secret passkey of <Key> is <5 digits>." at a
given depth) but to an exact token length, so lengths can be stated as multiples of the model's trained
context. The question ends with "... The secret passkey of <Key> is", so retrieval = greedy exact match
of the digits.

The bootstrap model learns from a 1 M-token corpus of plain sentences and has no retrieval skill: it
has no induction heads (the copy-from-context circuit; probe scores ~0.01), so it cannot copy a needle at
any length. The stage can first train a copy on a retrieval curriculum no longer than its trained length
(`eval.retrieval_train_steps`; like ChatQA 2's long-context SFT, but short): repeated lists, on which
induction heads form, and passkey-recall documents in the needle's format. Every method is then evaluated
on that model; lengths beyond the trained length are pure extrapolation for it.
"""

from __future__ import annotations

import random

import numpy as np
from tracecore.tasks.world import filler_sentence, repeated_list_document, word


def haystack(tok, rng: random.Random, n_tokens: int, depth: float) -> tuple[list[int], list[int], str, str]:
    """(context ids ending in the question, answer ids, question text, context text) of ~n_tokens."""
    key, secret = word(rng, 3).capitalize(), str(rng.randint(10_000, 99_999))
    question = f" Question: What is the secret passkey of {key}? Answer: The secret passkey of {key} is"
    budget = n_tokens - len(tok(question, add_special_tokens=False)["input_ids"]) - 12
    text = plant_needle(tok, rng, budget, depth, key, secret)
    ids = tok(text + question, add_special_tokens=False)["input_ids"]
    return ids, tok(" " + secret, add_special_tokens=False)["input_ids"], question, text


def plant_needle(tok, rng: random.Random, budget: int, depth: float, key: str, secret: str) -> str:
    """Filler sentences of about `budget` tokens with the passkey sentence at `depth` (a share of them)."""
    sentences, used = [], 0
    while used < budget:
        sentence = filler_sentence(rng)
        used += len(tok(" " + sentence, add_special_tokens=False)["input_ids"])
        sentences.append(sentence)
    sentences.insert(round(depth * len(sentences)), f"The secret passkey of {key} is {secret}.")
    return " ".join(sentences)


def recall_document(rng: random.Random) -> str:
    """1-3 passkeys planted in filler, then each asked and answered: the needle task, short."""
    pairs = [(word(rng, 3).capitalize(), str(rng.randint(10_000, 99_999))) for _ in range(rng.randint(1, 3))]
    sentences = [filler_sentence(rng) for _ in range(rng.randint(1, 9))]
    for key, secret in pairs:
        sentences.insert(rng.randint(0, len(sentences)), f"The secret passkey of {key} is {secret}.")
    rng.shuffle(pairs)
    return " ".join(sentences
                    + [f"Question: What is the secret passkey of {key}? Answer: The secret passkey of "
                                 f"{key} is {secret}." for key, secret in pairs])


def curriculum_blocks(tok, rng: random.Random, n_blocks: int, block: int, recall_share: float) -> np.ndarray:
    """Documents packed into `n_blocks` x `block` token ids, each followed by EOS (as in pretraining)."""
    ids: list[int] = []
    # batches of 1,000 documents: the fast tokenizer encodes them in parallel
    while len(ids) < n_blocks * block:
        docs = [recall_document(rng) if rng.random() < recall_share else repeated_list_document(rng)
                for _ in range(1000)]
        for doc_ids in tok(docs, add_special_tokens=False)["input_ids"]:
            ids += doc_ids + [tok.eos_token_id]
    return np.asarray(ids[: n_blocks * block], dtype=np.int64).reshape(n_blocks, block)


def train_retrieval(model, tok, cfg, max_len: int, log) -> list[float]:
    """The retrieval curriculum: full LM loss on repeated lists and passkey-recall documents in blocks of the
    trained length, with the pretraining loop at a constant rate after warm-up (a decaying rate stalled
    before the induction heads formed in our runs); returns the loss per step."""
    from tracecore.tasks.lm_training import TrainSchedule, train

    steps, batch = cfg.retrieval_train_steps, cfg.retrieval_batch_size
    blocks = curriculum_blocks(tok, random.Random(cfg.seed), steps * batch, max_len,
                               cfg.retrieval_recall_share)
    schedule = TrainSchedule(seq_len=max_len, batch_size=batch, max_tokens=blocks.size,
                             lr=cfg.retrieval_train_lr, schedule="constant", warmup_steps=20, seed=cfg.seed)
    curve = train(model, blocks, schedule, "cpu", log, name="eval-retrieval")
    model.eval()
    return [c["loss"] for c in curve]


def policies(model, heads, cfg) -> dict:
    """name -> factory of a fresh KV-cache policy (one per context)."""
    from tracecore.kernels.decoding import FullAttention
    from tracecore.kernels.longcache import LongCache
    from tracecore.kernels.razor import RazorCache

    lc, rz = cfg.longcache, cfg.razor
    return {"full": lambda: FullAttention(model), "razor": lambda: RazorCache(model, heads, rz),
            "longcache": lambda: LongCache(model, lc)}


def rag_context(tok, embedder, text: str, question: str, chunk_tokens: int, overlap: int,
                k: int) -> list[int]:
    """Top-k chunks by MiniLM cosine to the question, in document order, then the question."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    step = max(1, chunk_tokens - overlap)
    chunks = [ids[i:i + chunk_tokens] for i in range(0, max(1, len(ids) - overlap), step)]
    texts = [tok.decode(c) for c in chunks]
    vectors = embedder.encode(texts + [question], normalize_embeddings=True, show_progress_bar=False)
    best = sorted(np.argsort(-(vectors[:-1] @ vectors[-1]))[:k])
    return [t for i in best for t in chunks[i]] + tok(question, add_special_tokens=False)["input_ids"]


def needle_grid(model, tok, heads, embedder, cfg, log) -> list[dict]:
    """One row per (method, length, depth): accuracy over `needles_per_cell` needles, KV bytes, tokens."""
    import torch
    from tracecore.kernels.decoding import answer_accuracy

    makers, rng, rows = policies(model, heads, cfg), random.Random(cfg.seed + 1), []
    for length in cfg.needle_lengths:
        for depth in cfg.needle_depths:
            cells: dict[str, list] = {}
            for _ in range(cfg.needles_per_cell):
                ids, answer, question, text = haystack(tok, rng, length, depth)
                ctx, ans = torch.tensor([ids]), torch.tensor([answer])
                for name, make in makers.items():
                    policy = make()
                    chunk = cfg.longcache.chunk_size if name == "longcache" else 512
                    hit = answer_accuracy(model, ctx, ans, policy, chunk)
                    cells.setdefault(name, []).append((hit, policy.cache_bytes(), len(ids)))
                for k in cfg.rag.top_k:
                    short = rag_context(tok, embedder, text, question, cfg.rag.chunk_tokens, cfg.rag.overlap,
                                        k)
                    policy = makers["full"]()
                    hit = answer_accuracy(model, torch.tensor([short]), ans, policy)
                    cells.setdefault(f"rag_top{k}", []).append((hit, policy.cache_bytes(), len(short)))
            for name, results in cells.items():
                rows.append({"method": name, "length": length, "depth": depth,
                             "accuracy": float(np.mean([r[0] for r in results])),
                             "kv_bytes": int(np.mean([r[1] for r in results])),
                             "tokens": int(np.mean([r[2] for r in results]))})
        log.info("eval: needle grid length %d done", length)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per (method, length): mean accuracy over depths and KV bytes relative to full attention."""
    out = []
    full = {n: np.mean([r["kv_bytes"] for r in rows if r["method"] == "full" and r["length"] == n])
            for n in {r["length"] for r in rows}}
    for method in dict.fromkeys(r["method"] for r in rows):
        for length in sorted({r["length"] for r in rows}):
            cell = [r for r in rows if r["method"] == method and r["length"] == length]
            kv = float(np.mean([r["kv_bytes"] for r in cell]))
            out.append({"method": method, "length": length,
                        "accuracy": float(np.mean([r["accuracy"] for r in cell])),
                        "kv_bytes": int(kv), "kv_vs_full": kv / full[length] if full.get(length) else None,
                        "tokens_in_context": int(np.mean([r["tokens"] for r in cell]))})
    return out


def heatmaps_png(rows: list[dict]) -> bytes:
    from tracecore.tasks.plots import figure_png

    return figure_png(heatmaps_figure(rows))


def heatmaps_figure(rows: list[dict]):
    """Accuracy heatmap (depth x length) per method, one panel each, every cell's value written in it and one
    shared colour bar (0-1), so a reader needs no colour guessing."""
    from tracecore.tasks.plots import subplots

    methods = list(dict.fromkeys(r["method"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    fig, axes = subplots(nrows=1, ncols=len(methods), figsize=(2.4 * len(methods) + 0.8, 2.8), squeeze=False)
    image = None
    for ax, method in zip(axes[0], methods):
        grid = np.array([[next(r["accuracy"] for r in rows if r["method"] == method and r["length"] == n
                               and r["depth"] == d) for n in lengths] for d in depths])
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
        ax.set(title=method, xticks=range(len(lengths)), xticklabels=[str(int(n)) for n in lengths],
               yticks=range(len(depths)), yticklabels=[f"{d:.2f}" for d in depths], xlabel="context tokens")
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(image, ax=list(axes[0]), label="accuracy", fraction=0.05)
    return fig


def heads_png(induction, echo, heads) -> bytes:
    from tracecore.tasks.plots import figure_png, subplots

    fig, axes = subplots(nrows=1, ncols=2, figsize=(7, 2.8), squeeze=False)
    for ax, (title, m) in zip(axes[0], (("induction score", induction), ("echo score", echo))):
        im = ax.imshow(m.numpy(), cmap="viridis", aspect="auto")
        for layer, head in heads.nonzero().tolist():
            ax.text(head, layer, "R", ha="center", va="center", color="white")
        ax.set(title=title, xlabel="KV head", ylabel="layer", xticks=range(m.shape[1]),
               yticks=range(m.shape[0]))
        fig.colorbar(im, ax=ax)
    return figure_png(fig)
