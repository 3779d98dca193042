"""Decision record: is RazorAttention's gap to full attention on SmolLM2-135M-Instruct at 1k-4k tokens the
probe's choice of heads, or the model's? Razor with the probe's heads against Razor with *oracle* heads of
the same count: the KV heads that put the most attention on the passkey while the model answers.

    .venv/bin/python bench/razor_oracle.py [--lengths 1024 2048 4096] [--needles 8] [--json F]

Oracle: on calibration needles (seed 2; the sweep reads seed 1 and the default run seed 0), the prompt and
the answer run teacher-forced through the model with attention weights out; a query head's score is the
attention mass that the queries predicting the answer's tokens put on the passkey's tokens in the haystack
(the retrieval score of Wu et al.'s retrieval heads, on this task); a KV head scores the max over its query
heads, ranked globally as Razor's probe is. The oracle is an upper bound on what a head probe can choose,
since it is chosen on the task itself: if Razor with oracle heads also trails full attention by more than
0.1, no probe would close the gap at this KV budget, and the gap is the model's. Evaluation: the needles of
`bench/razor_settings.py` (seed 1), one shared full-attention prefill per needle, each variant decoding from
its own copy, KV bytes measured from the caches.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from razor_settings import DEPTHS, needle_arguments, print_rows, sweep, table
from tracecore.kernels.razor import head_scores, retrieval_heads
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.eval import LongContextModel
from tracecore.tasks.eval_models import load_eval_model, needle_text, prompt_ids, random_heads


def passkey_span(prompt: list[int], answer: list[int]) -> range:
    """Where the answer's tokens stand in the haystack (the needle sentence), found as a subsequence."""
    for start in range(len(prompt) - len(answer), -1, -1):
        if prompt[start:start + len(answer)] == answer:
            return range(start, start + len(answer))
    raise ValueError("the passkey's tokens do not occur in the prompt as the answer tokenises them")


@torch.no_grad()
def oracle_scores(model, tok, lengths: list[int], needles: int, seed: int) -> torch.Tensor:
    """[layers, kv_heads]: mean attention mass on the passkey from the queries that predict the answer."""
    rng, total, count = random.Random(seed), None, 0
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    for length in lengths:
        for i in range(needles):
            text, key, secret = needle_text(tok, rng, length, DEPTHS[i % len(DEPTHS)])
            answer = tok(" " + secret, add_special_tokens=False)["input_ids"]
            prompt = prompt_ids(tok, text, key)
            span = passkey_span(prompt, answer)
            ids = torch.tensor([prompt + answer])
            queries = torch.arange(len(prompt) - 1, len(prompt) + len(answer) - 1)
            out = model(input_ids=ids, output_attentions=True)
            mass = torch.stack([a[0][:, queries][:, :, span.start:span.stop].sum(-1).mean(-1).float()
                                for a in out.attentions])  # [layers, Hq]
            mass = mass.view(mass.shape[0], -1, groups).amax(-1)
            total, count = (mass if total is None else total + mass), count + 1
    return total / count


def top_heads(scores: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[scores.flatten().topk(n).indices] = True
    return mask.view_as(scores)


def main() -> None:
    ap = needle_arguments(__doc__)
    ap.add_argument("--calibration-lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--calibration-needles", type=int, default=8)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.18, 0.25],
                    help="oracle head shares (the probe's share is the default run's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok, model = load_eval_model(ArtifactStore(args.store), args.model, "--model")
    cfg = LongContextModel(name="smollm2", path=args.model).razor
    probe = retrieval_heads(*head_scores(model, cfg.probe_block, cfg.probe_repeats, low=1000, high=len(tok),
                                         seed=1), cfg)
    oracle = oracle_scores(model, tok, args.calibration_lengths, args.calibration_needles, seed=2)
    heads = {"probe": probe}
    for fraction in args.fractions:
        heads[f"oracle{fraction:.2f}"] = top_heads(oracle, max(1, round(fraction * oracle.numel())))
    n = int(probe.sum())
    print(f"# probe heads {n}; shared with the oracle's top {n}: "
          f"{int((probe & top_heads(oracle, n)).sum())}", flush=True)
    specs = {name: (cfg, cfg.probe_block) for name in heads}
    control = random_heads(probe, 1)  # razor_settings.sweep decodes a `<name>_random` control per variant
    rows = sweep(model, tok, specs, heads | {f"{name}_random": control for name in heads}, args.lengths,
                 args.needles, 1)
    rows = [r for r in rows if not r["variant"].endswith("_random") or r["variant"] == "probe_random"]
    print_rows(table(rows, heads | {"probe_random": control}), args.json)

if __name__ == "__main__":
    main()
