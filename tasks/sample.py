"""The `sample` stage: writes the sample world (`tasks/world.py`) into the store as one artifact."""

from __future__ import annotations

from pydantic import Field
from tracecore.configs.base import Strict
from tracecore.tasks.runtime.stage import Stage, StageRun
from tracecore.tasks.world import write_sample


class SampleConfig(Strict):
    """The embedded sample world (`tracecore make-sample`)."""

    seed: int = 0
    n_entities: int = Field(400, ge=10, le=100_000)
    max_fact_frequency: int = Field(1000, ge=1, le=100_000,
                                    description="planted count of the most frequent fact")
    n_parallel_phrases: int = Field(300, ge=10, le=100_000)
    filler_documents: int = Field(10000, ge=0, le=10_000_000)
    sentences_per_document: int = Field(8, ge=1, le=1000)
    instructions: int = Field(3000, ge=100, le=1_000_000)
    family_zipf_exponent: float = Field(1.0, ge=0.0, le=3.0, description=(
        "instruction-pool family sizes fall as rank^-s (s = 1: the largest of 8 families is 8x the rarest, "
        "as in real instruction mixtures); 0 = equal sizes. The held-out set is balanced over families "
        "either way"))
    preference_pairs: int = Field(600, ge=10, le=1_000_000)
    haystacks: int = Field(40, ge=1, le=100_000)
    haystack_sentences: int = Field(120, ge=10, le=100_000)
    corpus_files: int = Field(8, ge=1, le=10_000, description="corpus JSONL files (ingest parallelism)")
    repeated_list_documents: int = Field(0, ge=0, le=10_000_000, description=(
        "extra corpus documents that repeat a random list (in-context repetition, on which induction heads "
        "form)"))
    planted_contamination: int = Field(0, ge=0, le=100_000, description=(
        "QA items copied verbatim (question, then answer) into extra corpus documents, listed in "
        "ground_truth/planted.jsonl: known contamination for the trace stage to find"))
    near_duplicate_documents: int = Field(0, ge=0, le=10_000_000, description=(
        "near-copies of corpus documents (a word changed, a boilerplate line added, re-wrapped) in a corpus "
        "file of their own, listed in ground_truth/near_duplicates.parquet: known near-duplicates for "
        "ingest"))


def run_sample(run: StageRun) -> None:
    """Generate the sample world into the store (the `sample` artifact's files)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tracecore-sample-") as tmp:
        counts = write_sample(run.cfg, tmp)
        run.store.put_dir(run.ref("sample"), tmp)
    run.commit("sample", {"counts": counts})
    run.log.info("sample world written to %s: %s", run.store.display_path(run.ref("sample")), counts)


STAGE = Stage("sample", SampleConfig, {"sample": "sample"}, run_sample,
              description="the embedded sample world: corpus, facts, tasks, instructions, preferences")
