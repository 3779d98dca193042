"""Instruction records shared by gradients, finetune and eval: the Alpaca-style pool, the prompt template,
response-only labels and padding. One module so the three stages format data identically (and a change
here re-runs all three: they import it, so it is in their code version)."""

from __future__ import annotations

import json

TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def load_pool(path: str) -> tuple[list[dict], list[dict]]:
    """Alpaca-style records (instruction, input, output); unusable ones come back as rejects."""
    import fsspec

    records, rejects = [], []
    with fsspec.open(path, "rt", encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                rejects.append({"file": path, "line": line_no, "reason": f"bad JSON: {exc.msg}"})
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("instruction"),
                                                           str) or not rec["instruction"].strip():
                rejects.append({"file": path, "line": line_no, "reason": "missing or empty 'instruction'"})
            elif not isinstance(rec.get("output", ""), str) or not isinstance(rec.get("input", ""), str):
                rejects.append({"file": path, "line": line_no, "reason": "'input'/'output' must be strings"})
            else:
                records.append({**rec, "id": str(rec.get("id", f"line-{line_no}")),
                                "input": rec.get("input", ""), "output": rec.get("output", "")})
    return records, rejects


def encode(tok, rec: dict, max_len: int) -> tuple[list[int], list[int]]:
    """Prompt + response + EOS; labels are -100 on the prompt (loss on response tokens only).

    Too long: the response keeps up to half the budget and the prompt is cut from the left, so every
    record keeps response tokens (cutting from the right would leave some with no loss at all)."""
    prompt = tok(TEMPLATE.format(instruction=rec["instruction"], input=rec["input"]),
                 add_special_tokens=False)["input_ids"]
    response = (tok(rec["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    if len(prompt) + len(response) > max_len:
        response = response[: max(max_len // 2, max_len - len(prompt))]
        prompt = prompt[len(prompt) + len(response) - max_len:]
    return prompt + response, [-100] * len(prompt) + response


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, labels, mask


def pool_needs(pipeline_cfg) -> dict[str, str]:
    """The instruction pool is the user's file (`gradients.pool_path`) or the sample world's train split."""
    return {} if pipeline_cfg.gradients.pool_path else {"sample": "sample.sample"}


def pool_inputs(pipeline_cfg, upstream: dict[str, str], store) -> tuple[dict, dict]:
    """(fingerprinted inputs, args): a user's pool by its file identity; the sample's by the sample
    artifact."""
    from tracecore.storage.fs import input_fingerprint, list_input_files

    path = pipeline_cfg.gradients.pool_path
    if path:
        return {"pool": input_fingerprint(list_input_files([path],
                                                           "gradients.pool_path"))}, {"pool_path": path}
    return {}, {"pool_path": f"{store.files_path(upstream['sample'])}/instructions/train.jsonl"}
