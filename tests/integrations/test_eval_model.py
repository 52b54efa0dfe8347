"""`hack-kv eval` at CI size on the real SmolLM2: the teacher-forced scores against a plain forward."""

import json
import math

import pytest
import torch

from hack_integrations.eval.data import DATA_DIR
from hack_integrations.eval.harness import CI, run_eval
from hack_integrations.eval.methods import FP16, KIVI2, hack_method

pytestmark = pytest.mark.skipif(
    not DATA_DIR.exists(), reason=f"evaluation data not found at {DATA_DIR}"
)


def test_ci_eval_scores_and_writes_results(smollm, tmp_path):
    methods = [FP16, hack_method(8, 64, "kivi"), hack_method(2, 64, "paper"), KIVI2]
    result = run_eval(
        smollm,
        CI,
        methods,
        gen_methods=["16-bit", "HACK 8b p64 kivi"],
        out_dir=tmp_path,
        progress=False,
    )
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {m.name for m in methods}
    # Independent reference for the 16-bit row: one plain forward over context + target.
    from hack_integrations.eval.data import score_samples

    model, tok = smollm.model, smollm.tokenizer
    model.set_attn_implementation("sdpa")
    nlls = []
    for s in score_samples(tok, CI.n_score, CI.context_len, CI.target_len):
        ids = torch.tensor([s.context + s.target])
        with torch.no_grad():
            lp = model(ids).logits[0].double().log_softmax(-1)
        c = len(s.context)
        tgt = ids[0, c + 1 :]
        nlls.append(float(-lp[c : c + len(tgt)].gather(-1, tgt[:, None]).mean()))
    want = math.exp(sum(nlls) / len(nlls))
    assert rows["16-bit"]["ppl"] == pytest.approx(want, rel=2e-3)  # KV rounded to 16 bits
    # 8-bit HACK is close to 16-bit; 2-bit codes move the distribution much more.
    assert rows["HACK 8b p64 kivi"]["kl"] < 2e-3 and rows["HACK 8b p64 kivi"]["top1"] >= 0.9
    assert rows["HACK 2b p64 paper"]["kl"] > 10 * rows["HACK 8b p64 kivi"]["kl"]
    assert rows["HACK 2b p64 paper"]["bytes_frac"] < rows["HACK 8b p64 kivi"]["bytes_frac"] < 1
    assert "exact" in rows["HACK 8b p64 kivi"] and "he_edit" in rows["16-bit"]
    saved = json.loads((tmp_path / "accuracy.json").read_text())
    assert [r["method"] for r in saved["rows"]] == [m.name for m in methods]
    assert "HACK 2b p64 paper" in (tmp_path / "accuracy.md").read_text()
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
