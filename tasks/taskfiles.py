"""Task files in the public shapes (translation, QA, multiple choice): read JSONL/Parquet rows, turn them
into items, and keep every unusable row as a reject with file, line and reason. Shared by the stages that
read tasks (memorization; tracing)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from tracecore.configs.base import Strict
from tracecore.storage.store import read_parquet
from tracecore.tasks.runtime.common import get_logger


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
        """x in the task's prompt template: a model is scored on the prompt it is evaluated with, not raw
        x."""
        return (self.prompt or PROMPTS[self.kind]).replace("{input}", x)


# lm-eval-harness' zero-shot templates (TriviaQA / MMLU-style questions; GPT-3's translation phrase format)
PROMPTS = {"qa": "Question: {input}\nAnswer:", "multiple_choice": "Question: {input}\nAnswer:",
           "translation": "Source phrase: {input}\nTarget phrase:"}


def sample_task_specs() -> list[TaskSpec]:
    return [TaskSpec(name="translation", kind="translation", prompt="English phrase: {input}\nZelan phrase:"),
            TaskSpec(name="qa", kind="qa"), TaskSpec(name="multiple_choice", kind="multiple_choice")]


def read_task_rows(path: str) -> list[tuple[int, object]]:
    """(line, record) for JSONL or Parquet; unparseable lines come back as (line, exception text)."""
    import json

    import fsspec

    if path.endswith(".parquet"):
        with fsspec.open(path, "rb") as fh:
            return list(enumerate(read_parquet(fh).to_pylist(), start=1))
    rows = []
    with fsspec.open(path, "rt", compression="infer", encoding="utf-8", errors="replace") as fh:
        for line_no, line in enumerate(fh, start=1):
            if line.strip():
                try:
                    rows.append((line_no, json.loads(line)))
                except json.JSONDecodeError as exc:
                    rows.append((line_no, f"bad JSON: {exc.msg}"))
    return rows


def to_item(kind: str, rec: object) -> tuple[dict | None, str | None]:
    """Map a record of the task's shape to (input, output), or give the reason it cannot be used."""
    if isinstance(rec, str):
        return None, rec
    if not isinstance(rec, dict):
        return None, f"record is a {type(rec).__name__}, not an object"
    fields = {"translation": ("source", "target"), "qa": ("question", "answer"),
              "multiple_choice": ("question", "choices")}[kind]
    missing = [f for f in fields if rec.get(f) in (None, "", [])]
    if missing:
        return None, f"missing or empty field(s) {missing} for a {kind} task"
    x, y = rec[fields[0]], rec[fields[1]]
    if kind == "multiple_choice":
        answer = rec.get("answer")
        if not isinstance(y, list) or not isinstance(answer, int) or not 0 <= answer < len(y):
            return None, "multiple_choice needs a list 'choices' and an integer 'answer' index into it"
        y = y[answer]  # x is the question alone: the options hold the answer by construction
    if not isinstance(x, str) or not isinstance(y, str) or not x.strip() or not y.strip():
        return None, "input and output must be non-empty strings"
    return {"id": str(rec.get("id", "")), "input": x, "output": y, "frequency": rec.get("frequency")}, None


def load_task(spec: TaskSpec, path: str, max_items: int,
              stage: str = "memorization") -> tuple[list[dict], list[dict]]:
    items, rejects = [], []
    for line, rec in read_task_rows(path):
        item, reason = to_item(spec.kind, rec)
        if reason:
            rejects.append({"file": path, "line": line, "reason": f"{spec.name}: {reason}"})
        else:
            items.append({**item, "id": item["id"] or f"{spec.name}-{line}", "task": spec.name,
                          "prompt": spec.lm_prompt(item["input"])})
    if max_items and len(items) > max_items:
        get_logger().info("%s: task %s uses the first %d of its %d items (%s.max_items)",
                          stage, spec.name, max_items, len(items), stage)
    return (items[:max_items] if max_items else items), rejects
