"""Typed pipeline configuration: one pydantic model per stage (the run-wide `PipelineBase` is in `base.py`).

Every model forbids unknown keys, so a typo fails before any work starts. The registry composes them into
`PipelineConfig` (one section per registered stage); `configs/profiles.py` reads YAML profiles and overrides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from tracecore.configs.base import ConfigError, DaskConfig, PipelineBase, Strict  # noqa: F401 (re-exported)
from tracecore.kernels.settings import LongCacheConfig, RazorConfig

PROFILE_DIR = Path(__file__).parent


class SampleConfig(Strict):
    """The embedded sample world (`tracecore make-sample`)."""

    seed: int = 0
    n_entities: int = Field(400, ge=10, le=100_000)
    max_fact_frequency: int = Field(1000, ge=1, le=100_000, description="planted count of the most frequent fact")
    n_parallel_phrases: int = Field(300, ge=10, le=100_000)
    filler_documents: int = Field(10000, ge=0, le=10_000_000)
    sentences_per_document: int = Field(8, ge=1, le=1000)
    instructions: int = Field(3000, ge=100, le=1_000_000)
    family_zipf_exponent: float = Field(1.0, ge=0.0, le=3.0, description=(
        "instruction-pool family sizes fall as rank^-s (s = 1: the largest of 8 families is 8x the rarest, as in "
        "real instruction mixtures); 0 = equal sizes. The held-out set is balanced over families either way"))
    preference_pairs: int = Field(600, ge=10, le=1_000_000)
    haystacks: int = Field(40, ge=1, le=100_000)
    haystack_sentences: int = Field(120, ge=10, le=100_000)
    corpus_files: int = Field(8, ge=1, le=10_000, description="corpus JSONL files (ingest parallelism)")
    repeated_list_documents: int = Field(0, ge=0, le=10_000_000, description=(
        "extra corpus documents that repeat a random list (in-context repetition, on which induction heads form)"))
    planted_contamination: int = Field(0, ge=0, le=100_000, description=(
        "QA items copied verbatim (question, then answer) into extra corpus documents, listed in "
        "ground_truth/planted.jsonl: known contamination for the trace stage to find"))


class IngestConfig(Strict):
    """Read corpora into validated, de-duplicated document shards."""

    paths: list[str] = Field(default_factory=list, description="globs/URIs; empty = the sample corpus")
    text_field: str = "text"
    id_field: str = "id"
    max_doc_chars: int = Field(1_000_000, ge=1)
    max_reject_fraction: float = Field(0.05, ge=0.0, le=1.0)
    shard_mb: int = Field(256, ge=1, le=65_536, description=(
        "files larger than this are split into shards of about this size (plain JSONL by byte ranges on line "
        "boundaries, Parquet by row groups), so memory per shard is bounded by it; compressed files stay whole"))
    dedup: bool = True
    keep_intermediates: bool = Field(False, description=(
        "keep the parsed (pre-dedup) copy of the corpus and the dedup partitions after documents are committed; "
        "false: their shards are deleted (manifests kept, flagged cleaned)"))
    dedup_buckets: int = Field(16, ge=1, le=4096, description=(
        "hash partitions of exact dedup: no task holds more than max(dedup_task_rows, 1/buckets of the corpus's) "
        "hashes"))
    dedup_task_rows: int = Field(250_000, ge=1, description=(
        "hashes one dedup task takes on: consecutive buckets are grouped up to about this many rows (a task per "
        "bucket was a cluster round trip each, a third of ingest on a 10^6-token corpus)"))


class TokenizeConfig(Strict):
    """Train (or load) a tokenizer and write token shards."""

    tokenizer_path: str | None = Field(None, description="local HF tokenizer folder; None = train BPE")
    vocab_size: int = Field(4096, ge=260, le=65_535)
    min_frequency: int = Field(2, ge=1)
    train_docs: int = Field(20_000, ge=1, description="documents sampled to train the BPE")
    split_digits: bool = Field(False, description="one token per digit (as in Llama): numbers can be copied "
                               "digit by digit; needed for the needle task on a tiny model")
    batch_size: int = Field(512, ge=1)
    parallel_encode: Literal["auto"] | bool = Field("auto", description=(
        "a task encodes with the tokenizers library's own thread pool (every core of its machine), so a worker "
        "left with the last shard uses the cores its finished peers leave idle. auto: with fewer than 2 documents "
        "shards per Dask worker thread, on for each shard larger than an even share of the work (measured: 2 "
        "shards on 2 workers, 0.61 -> 0.84 of raw encode_batch at 10^7 tokens with both on; 0.86-0.91 -> "
        "0.90-0.95 M tokens/s with only the larger of a 7.7 M- and a 2 M-token shard on), else only for the last "
        "threads - 1 shards of the queue (on for all oversubscribes the cores: 0.87 -> 0.78 at 10^8, 13 shards)"))


class PretrainConfig(Strict):
    """The bootstrap Llama-architecture model, or a user's model by path."""

    model_path: str | None = Field(None, description=(
        "local HF causal-LM folder, a .gguf file, or a packaged model (smollm2-135m-instruct); None = pretrain a "
        "tiny Llama"))
    hidden_size: int = Field(128, ge=16, le=8192)
    layers: int = Field(2, ge=1, le=128)
    heads: int = Field(4, ge=1, le=128)
    kv_heads: int = Field(2, ge=1, le=128)
    intermediate_size: int = Field(384, ge=16)
    seq_len: int = Field(256, ge=16, le=131_072)
    batch_size: int = Field(16, ge=1)
    max_tokens: int = Field(1_000_000, ge=1, description="training tokens (stops early when the corpus ends)")
    lr: float = Field(3e-3, gt=0, lt=1)
    schedule: Literal["cosine", "constant"] = Field("cosine", description="after the linear warm-up")
    epochs: float = Field(1.0, gt=0, le=1000, description="passes over the corpus (max_tokens still caps)")
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    eval_fraction: float = Field(0.02, gt=0, lt=0.5)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch default")

    @model_validator(mode="after")
    def _heads_divide(self) -> PretrainConfig:
        if self.hidden_size % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden_size must be divisible by heads, and heads by kv_heads")
        return self


class NgramConfig(Strict):
    """Corpus n-gram counting: infini-gram index + exact small-n table."""

    shard_groups: int = Field(2, ge=1, le=4096, description="infini-gram indexes built in parallel, at least")
    group_tokens: int = Field(10_000_000, ge=1_000, description=(
        "at most this many tokens per index group (unless one token shard is larger): the indexer's memory "
        "(~20 bytes per token of its group) stays bounded as the corpus grows"))
    index_mem_gib: int = Field(2, ge=1, le=4096)
    index_cpus: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = Field("auto", description=(
        "cpus per indexer process; auto = the cluster's threads shared by the index groups by their tokens (at "
        "most one host's), so one or two groups do not index on one core while the rest idle"))
    max_n: int = Field(3, ge=1, le=4, description="exact table holds n-grams for n = 1..max_n")
    buckets: int = Field(16, ge=1, le=65_535, description="exact-table reduce partitions, at least")
    bucket_tokens: int = Field(2_000_000, ge=1_000, description=(
        "one more bucket per this many corpus tokens (beyond `buckets`), so a reduce task's memory stays "
        "bounded as the corpus grows"))
    map_tokens: int = Field(4_000_000, ge=1_000, description=(
        "exact-table map tasks hold about this many tokens: a larger token shard is cut into row ranges (a "
        "document is never cut), so a map task's memory (~120 bytes per token) is bounded by this setting"))
    top_k: int = Field(100, ge=1)


class TaskSpec(Strict):
    """A task file in one of the public shapes: translation (source/target), qa (question/answer),
    multiple_choice (question/choices/answer index)."""

    name: str = Field(pattern=r"^[a-z0-9_]+$")
    kind: Literal["translation", "qa", "multiple_choice"]
    path: str | None = Field(None, description="JSONL/Parquet file or glob; None = the sample world's task")
    align_threshold: float | None = Field(None, ge=-1, le=1, description="overrides the n-based default")
    prompt: str | None = Field(None, description=(
        "what the LM is conditioned on, '{input}' replaced by x; None = the kind's template in PROMPTS "
        "(lm-eval's: 'Question: {input}\\nAnswer:' for qa and multiple_choice)"))

    @field_validator("prompt")
    @classmethod
    def _has_input(cls, value: str | None) -> str | None:
        if value is not None and "{input}" not in value:
            raise ValueError(f"prompt {value!r} must contain '{{input}}' (where the task's x goes)")
        return value

    def lm_prompt(self, x: str) -> str:
        """x in the task's prompt template: a model is scored on the prompt it is evaluated with, not raw x."""
        return (self.prompt or PROMPTS[self.kind]).replace("{input}", x)


# lm-eval-harness' zero-shot templates (TriviaQA / MMLU-style questions; GPT-3's translation phrase format)
PROMPTS = {"qa": "Question: {input}\nAnswer:", "multiple_choice": "Question: {input}\nAnswer:",
           "translation": "Source phrase: {input}\nTarget phrase:"}


def _sample_tasks() -> list[TaskSpec]:
    return [TaskSpec(name="translation", kind="translation", prompt="English phrase: {input}\nZelan phrase:"),
            TaskSpec(name="qa", kind="qa"), TaskSpec(name="multiple_choice", kind="multiple_choice")]


class MemorizationConfig(Strict):
    """Task-gram pairs, their corpus counts, LM probabilities and the memorization scores (v5 definitions)."""

    tasks: list[TaskSpec] = Field(default_factory=_sample_tasks)
    n: int = Field(2, ge=1, le=8, description="word n-gram size for task-gram pairs")
    max_items: int = Field(400, ge=0, description="items per task (0 = all)")
    align: bool = True
    align_threshold_short: float = Field(0.6, ge=-1, le=1, description="cosine threshold for n <= 2 (paper)")
    align_threshold_long: float = Field(0.9, ge=-1, le=1, description="cosine threshold for n >= 3 (paper)")
    embedder_path: str | None = Field(None, description="sentence-transformers folder; None = packaged MiniLM")
    max_diff_tokens: int = Field(1000, ge=1, description="co-occurrence window for count_cnf")
    max_clause_freq: int = Field(50_000, ge=1)
    models: list[str] = Field(default_factory=list, description=(
        "models to score: `pretrain.model` (this run's), HF causal-LM folders, .gguf files or packaged models "
        "(smollm2-135m-instruct); empty = this run's model. A model pretrained elsewhere is labelled: its rho "
        "measures overlap with the indexed corpus, not memorization of it"))
    bootstrap: int = Field(1000, ge=10, le=100_000)
    items_per_chunk: int = Field(50, ge=1, description="items per Dask counting task")
    batch_size: int = Field(32, ge=1)
    seed: int = 0


class GradientsConfig(Strict):
    """TAGCOS/LESS gradient features. Official values in comments; the tiny profile scales them down."""

    pool_path: str | None = Field(None, description="Alpaca-style JSONL; None = sample world instructions")
    warmup_fraction: float = Field(0.05, gt=0, le=1)
    checkpoint_steps: list[int] = Field(default_factory=lambda: [10, 20, 30], min_length=1)
    lr: float = Field(2e-5, gt=0, lt=1, description="peak lr of the planned linear warm-up schedule")
    lr_warmup_steps: int | None = Field(None, ge=1, description="linear warm-up length; None = 2 x the last "
                                        "checkpoint step, so checkpoints train at rising lrs (TAGCOS 10/20/30)")
    planned_epochs: int = Field(4, ge=1, description="planned schedule length in epochs over the warm-up "
                                "subset (LESS: 4); decay starts after the warm-up")
    batch_size: int = Field(8, ge=1, description="warm-up batch (official 1 x 32 accumulation x GPUs)")
    lora_r: int = Field(128, ge=1)
    lora_alpha: int = Field(512, ge=1)
    lora_dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="LoRA targets; None = the architecture's attention "
                                             "projections (kernels/families.py: q/k/v/o_proj, GPT-NeoX "
                                             "query_key_value + attention.dense, GPT-2 c_attn + attn.c_proj)")
    max_seq_len: int = Field(512, ge=8)
    proj_dim: int = Field(8192, ge=8, le=65_536)
    proj_seed: int = 0
    feature_batch_size: int = Field(16, ge=1)
    shards: int = Field(4, ge=1, le=100_000)
    threads: int = Field(1, ge=0, description="torch threads per Dask worker; 0 = default")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when available")
    seed: int = 0

    @model_validator(mode="after")
    def _sorted_steps(self) -> GradientsConfig:
        if sorted(set(self.checkpoint_steps)) != self.checkpoint_steps or self.checkpoint_steps[0] < 1:
            raise ValueError("checkpoint_steps must be increasing positive integers")
        return self


class SelectConfig(Strict):
    """TAGCOS coreset selection: K-means, then per-cluster non-negative ridge OMP."""

    clusters: int = Field(100, ge=1)
    rate: float = Field(0.05, gt=0, le=1)
    omp_lambda: float = Field(1.0, ge=0)
    omp_tolerance: float = Field(1e-4, gt=0)
    minibatch_above: int = Field(100_000, ge=1, description="use MiniBatchKMeans above this many rows")
    baseline_draws: int = Field(3, ge=1, description="random / cluster-random draws; fine-tuning seed s uses "
                                "draw s mod baseline_draws, so intervals over seeds include selection noise")
    seed: int = 0


class PreferenceInput(Strict):
    path: str
    format: Literal["pairwise", "rpr", "sample"] = "pairwise"


class PreferenceConfig(Strict):
    """Context-conditioned preference data with reversals and a context-aware reward model."""

    inputs: list[PreferenceInput] = Field(default_factory=list, description="empty = the sample world's pairs")
    criteria_library: str | None = Field(
        "builtin", description="YAML path; builtin = configs/libraries/criteria.yaml; null = none")
    context_lm_path: str | None = Field(None, description=(
        "local instruct LM that proposes criteria (folder, .gguf or packaged model, e.g. smollm2-135m-instruct); "
        "its contexts are tagged `lm`"))
    context_lm_max_pairs: int | None = Field(None, ge=1, description=(
        "pairs per input file that get LM contexts, the first ones (two greedy generations each: seconds per "
        "pair on a CPU); None = all"))
    context_lm_template: str = ("Prompt: {prompt}\nResponse A: {a}\nResponse B: {b}\n"
                                "One criterion that tells these responses apart:")
    near_duplicate_threshold: float = Field(0.9, gt=0, le=1)
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of prompts held out")
    context_test_fraction: float = Field(0.3, gt=0, lt=1, description="share of context phrasings held out: "
                                         "test records use only phrasings no training record has")
    rm_epochs: int = Field(3, ge=1)
    rm_lr: float = Field(1e-4, gt=0, lt=1)
    rm_batch_size: int = Field(16, ge=1)
    rm_max_len: int = Field(128, ge=16)
    rm_lora: bool = False
    rm_target_modules: list[str] | None = Field(None, description="LoRA targets with rm_lora; None = the "
                                                "architecture's attention projections")
    threads: int = Field(1, ge=0, description="torch threads per Dask worker; the context-aware and the "
                         "context-blind reward models train as two shards, in parallel; 0 = torch default")
    seed: int = 0


class TraceConfig(Strict):
    """Trace task items back to the corpus (stage `trace`): longest spans with their documents, n-gram
    contamination as in GPT-3 / NeMo Curator."""

    tasks: list[TaskSpec] | None = Field(None, description="task files to trace; None = memorization.tasks")
    max_items: int = Field(0, ge=0, description="items per task; 0 = every item")
    contamination_n: int = Field(13, ge=1, le=64, description=(
        "an item is contaminated when it shares an n-gram of this many words with a document (GPT-3: 13)"))
    min_words: int = Field(5, ge=1, description=(
        "an item shorter than contamination_n words counts as contaminated only when it occurs whole; "
        "items shorter than this are not judged (counted and logged)"))
    max_docs: int = Field(3, ge=1, le=1000, description="documents listed per span and per contaminated item")
    rule: Literal["question_answer", "question"] = Field("question_answer", description=(
        "the text an item's n-grams come from: question + answer, or the question alone (NeMo Curator)"))
    max_matches: int | None = Field(None, ge=1, description=(
        "ignore an n-gram found in more documents than this (NeMo Curator's max_matches: boilerplate); None = no cap"))
    decontaminate: bool = Field(False, description="also write documents_decontaminated for a later training run")
    decontaminate_mode: Literal["drop_document", "remove_span"] = Field("drop_document", description=(
        "drop each contaminating document, or cut the matched n-grams +- remove_margin characters and split it"))
    remove_margin: int = Field(200, ge=0, description="characters removed each side of a match (GPT-3: 200)")
    min_piece_chars: int = Field(200, ge=0, description="pieces of a split document shorter than this are dropped")
    max_splits: int = Field(10, ge=0, description="a document split more often than this is dropped whole")


class LongContextConfig(Strict):
    """ChatQA 2-style context extension before fine-tuning: raise the RoPE base, continue training on
    corpus documents packed into long sequences with a separator string between documents."""

    enabled: bool = False
    rope_theta: float = Field(1.5e8, gt=0, description="ChatQA 2: 500k -> 150M for 8K -> 128K")
    seq_len: int = Field(1024, ge=16, le=1_048_576)
    steps: int = Field(50, ge=1)
    batch_size: int = Field(2, ge=1)
    lr: float = Field(3e-5, gt=0, lt=1, description="ChatQA 2: 3e-5")
    separator: str = Field("<s>", min_length=1, description="between packed documents (not the EOS token)")


class FinetuneConfig(Strict):
    """Fine-tune the base model on selected subsets (TAGCOS, baselines, full pool), several seeds each."""

    subsets: list[Literal["tagcos", "random", "cluster_random", "full"]] = Field(
        default_factory=lambda: ["tagcos", "random", "cluster_random", "full"], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    full_seeds: int | None = Field(None, ge=1, description=(
        "the `full` pool reference trains on only the first N seeds (it is a reference, not part of the paired "
        "TAGCOS - random verdict, and on CPU its run is the longest); None = every seed"))
    eval_path: str | None = Field(None, description="held-out Alpaca-style JSONL; None = sample eval split")
    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1, description="cap on optimizer steps per variant")
    lr: float = Field(2e-5, gt=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    batch_size: int = Field(8, ge=1, description="micro-batch")
    grad_accum: int = Field(4, ge=1)
    max_seq_len: int = Field(512, ge=8)
    lora: bool = Field(False, description="LoRA via peft (merged before saving) instead of full fine-tuning")
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="LoRA targets; None = the architecture's attention "
                                             "projections (kernels/families.py: q/k/v/o_proj, GPT-NeoX "
                                             "query_key_value + attention.dense, GPT-2 c_attn + attn.c_proj)")
    mini_sequence: bool = Field(True, description="MsT chunked LM head + MLP with activation recomputation")
    lm_chunks: int | None = Field(None, ge=1, description="None = ceil(vocab / hidden)")
    mlp_chunks: int | None = Field(None, ge=1, description="None = ceil(intermediate / hidden)")
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between resumable checkpoints")
    log_every: int = Field(10, ge=1, description="optimizer steps between Prefect log lines (the curve keeps all)")
    long_context: LongContextConfig = Field(default_factory=LongContextConfig)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when available")
    threads: int = Field(1, ge=0, description="torch threads per Dask worker; 0 = default")
    seed: int = 0


class RagSettings(Strict):
    """ChatQA 2-style retrieval: token chunks with overlap, MiniLM embeddings, top-k chunks in context."""

    chunk_tokens: int = Field(64, ge=8, description="ChatQA 2 used 1200")
    overlap: int = Field(16, ge=0)
    top_k: list[int] = Field(default_factory=lambda: [1, 3, 5], min_length=1)


class LongContextModel(Strict):
    """A pretrained model the long-context methods are evaluated on beside the run's own (which, tiny, cannot
    retrieve): Razor's head probe, the needle grid, RAG vs. long context, KV bytes; one Dask task."""

    name: str = Field(pattern=r"^[a-z0-9_]+$", description="label in tables and plot names")
    path: str = Field(description="HF causal-LM folder, .gguf file, or packaged model (smollm2-135m-instruct)")
    lengths: list[int] = Field(default_factory=lambda: [1024, 2048, 4096], min_length=1,
                               description="prompt tokens (SmolLM2 was trained to 8,192)")
    depths: list[float] = Field(default_factory=lambda: [0.1, 0.35, 0.65, 0.9], min_length=1)
    needles_per_cell: int = Field(2, ge=1, description="needles per (length, depth); per length: x len(depths)")
    rag_top_k: list[int] = Field(default_factory=lambda: [1, 3])
    rag_chunk_tokens: int = Field(128, ge=8)
    prefill_chunk: int = Field(512, ge=16)
    longcache: bool = Field(False, description="also LongCache (meant past the trained length: 16k-32k, opt-in)")
    longcache_settings: LongCacheConfig = Field(default_factory=LongCacheConfig, description="official defaults")
    razor: RazorConfig = Field(  # paper: S0 in the thousands (no compression below it); S0 64 compresses 1-4k
        # prompts; 18 % of heads and a 256-token probe: the best of a sweep under 30 % KV (bench/RESULTS.md)
        default_factory=lambda: RazorConfig(induction_fraction=0.18, min_buffer=64, compression=8.0, probe_block=256))
    threads: int = Field(2, ge=0, description=(
        "torch threads for this task (it runs alone at the end of eval); 0 = torch default, which is 1 in a "
        "Dask worker (Dask pins its workers' math libraries to one thread)"))
    seed: int = 0


class EvalConfig(Strict):
    """Model quality per checkpoint, the data-selection verdict, and long-context evaluation."""

    max_items: int = Field(100, ge=1, description="items per task and model")
    batch_size: int = Field(16, ge=1)
    confidence: float = Field(0.95, gt=0, lt=1)
    needle_lengths: list[int] = Field(default_factory=lambda: [256, 1024, 2048], min_length=1)
    needle_depths: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], min_length=1)
    needles_per_cell: int = Field(2, ge=1)
    retrieval_train_steps: int = Field(0, ge=0, description="retrieval curriculum steps at the trained length; 0 = none")
    retrieval_train_lr: float = Field(1e-3, gt=0, lt=1, description="constant after warm-up")
    retrieval_batch_size: int = Field(16, ge=1)
    retrieval_recall_share: float = Field(0.3, ge=0, le=1, description="passkey-recall documents; the rest repeated lists")
    razor: RazorConfig = Field(  # paper: S0 in the thousands, C 5, probe 2500 tokens; scaled for small models
        default_factory=lambda: RazorConfig(min_buffer=32, compression=8.0, probe_block=64),
        description="RazorAttention (arXiv 2407.15891), the kernel's own settings type")
    longcache: LongCacheConfig = Field(  # official 32 / 4096 / 1 / 32, clip 64, chunk 512
        default_factory=lambda: LongCacheConfig(global_size=4, local_size=64, mid_size=1, span_size=16, recall_clip=4,
                                                chunk_size=64),
        description="LongCache/ReAttention (arXiv 2407.15176), the kernel's own settings type")
    rag: RagSettings = Field(default_factory=RagSettings)
    long_context_models: list[LongContextModel] = Field(default_factory=list, description=(
        "pretrained models evaluated on the long-context methods too (tiny: SmolLM2-135M-Instruct)"))
    threads: int = Field(1, ge=0)
    seed: int = 0
