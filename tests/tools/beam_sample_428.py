"""Reference values of transformers 4.28's `beam_sample` (what upstream's `Chat.answer` runs with num_beams > 1,
since it always passes do_sample=True), checked in as tests/fixtures/beam428/.

Run in a separate environment with the version upstream pins (not the project's .venv):

    python3 -m venv /tmp/tf428 && /tmp/tf428/bin/pip install torch==2.13.0 transformers==4.28.0
    /tmp/tf428/bin/python tests/tools/beam_sample_428.py tests/fixtures/beam428

A tiny random `LlamaForCausalLM` (saved as an HF folder) generates from `inputs_embeds` as upstream's chat does,
with upstream's stopping criterion (`StoppingCriteriaSub`: the stop ids at the end of `input_ids[0]`, i.e. beam 0
of row 0 only). Recorded per step, by wrapping library calls (the library code runs unchanged):

* `warped`: the scores `beam_sample` turns into probabilities, (num_beams, V): log_softmax -> logits processors
  -> + beam scores -> warpers (the input of its `softmax` over (1, num_beams * V));
* `draws`: the 2 * num_beams flat indices `torch.multinomial` drew, in draw order;
* `beam_scores` / `beam_tokens` / `beam_indices`: `BeamSearchScorer.process`'s output;
and at the end the returned sequence (dummy BOS + generated ids) and the number of steps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, StoppingCriteria, StoppingCriteriaList
from transformers.generation import beam_search as hf_beam_search

SEED = 1234
VOCAB, HIDDEN, LAYERS, HEADS, INTER = 64, 32, 1, 2, 64
PROMPT_LEN = 5
EOS = 2
# Each case: the generate() settings upstream's Chat.answer passes (do_sample=True always, top_k 50 by default);
# EOS and stop ids picked so that finished hypotheses and the beam-0 stop criterion both occur.
CASES = {
    "upstream_defaults": dict(num_beams=3, temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=1.0,
                              length_penalty=1.0, max_new_tokens=10, stop=[[7], [11, 12]], eos=60, seed=5),
    "temperature_penalty": dict(num_beams=2, temperature=0.7, top_p=0.95, top_k=20, repetition_penalty=1.3,
                                length_penalty=1.0, max_new_tokens=8, stop=[[60, 60]], eos=EOS, seed=11),
}


class StoppingCriteriaSub(StoppingCriteria):
    """Upstream's (video_llama/conversation/conversation_video.py): looks at input_ids[0] only."""

    def __init__(self, stops):
        super().__init__()
        self.stops = stops

    def __call__(self, input_ids, scores):
        for stop in self.stops:
            if torch.all((stop == input_ids[0][-len(stop):])).item():
                return True
        return False


def main(out: Path) -> None:
    assert transformers.__version__ == "4.28.0", transformers.__version__
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      intermediate_size=INTER, bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # spread-out logits, so that top-k / top-p cut something
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (1.0 if p.ndim == 1 else 3.0 / p.shape[1] ** 0.5))
    model.save_pretrained(out / "model")  # pytorch_model.bin (no safetensors in a bare 4.28 env)
    prompt = torch.randn(1, PROMPT_LEN, HIDDEN)
    arrays: dict[str, np.ndarray] = {"prompt_embeds": prompt[0].numpy()}
    meta: dict = {"transformers": transformers.__version__, "torch": torch.__version__, "cases": {}}

    for name, case in CASES.items():
        rec: dict[str, list] = {"warped": [], "draws": [], "beam_scores": [], "beam_tokens": [], "beam_indices": []}
        softmax, multinomial, process = torch.nn.functional.softmax, torch.multinomial, \
            hf_beam_search.BeamSearchScorer.process

        def rec_softmax(x, *a, **k):
            if x.dim() == 2 and x.shape[-1] == case["num_beams"] * VOCAB:
                rec["warped"].append(x.view(case["num_beams"], VOCAB).clone().numpy())
            return softmax(x, *a, **k)

        def rec_multinomial(probs, num_samples, *a, **k):
            draws = multinomial(probs, num_samples, *a, **k)
            rec["draws"].append(draws[0].clone().numpy())
            return draws

        def rec_process(self, *a, **k):
            res = process(self, *a, **k)
            rec["beam_scores"].append(res["next_beam_scores"].clone().numpy())
            rec["beam_tokens"].append(res["next_beam_tokens"].clone().numpy())
            rec["beam_indices"].append(res["next_beam_indices"].clone().numpy())
            return res

        torch.nn.functional.softmax, torch.multinomial = rec_softmax, rec_multinomial
        hf_beam_search.BeamSearchScorer.process = rec_process
        try:
            torch.manual_seed(case["seed"])
            stops = [torch.tensor(s) for s in case["stop"]]
            with torch.no_grad():
                seq = model.generate(
                    inputs_embeds=prompt, max_new_tokens=case["max_new_tokens"], num_beams=case["num_beams"],
                    do_sample=True, min_length=1, top_p=case["top_p"], top_k=case["top_k"],
                    repetition_penalty=case["repetition_penalty"], length_penalty=case["length_penalty"],
                    temperature=case["temperature"], eos_token_id=case["eos"],
                    stopping_criteria=StoppingCriteriaList([StoppingCriteriaSub(stops)]))
        finally:
            torch.nn.functional.softmax, torch.multinomial = softmax, multinomial
            hf_beam_search.BeamSearchScorer.process = process
        for key, vals in rec.items():
            arrays[f"{name}.{key}"] = np.stack(vals)
        arrays[f"{name}.sequence"] = seq[0].numpy()
        meta["cases"][name] = {k: v for k, v in case.items()} | {"steps": len(rec["draws"]),
                                                                 "sequence": seq[0].tolist()}
        print(name, "steps", len(rec["draws"]), "sequence", seq[0].tolist())
    np.savez_compressed(out / "reference.npz", **arrays)
    (out / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
