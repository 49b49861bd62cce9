"""Multiple-choice accuracy of choice tasks predicted from per-choice log-likelihoods (taskvec.lm_choices):
θ0's scores equal lm_metrics.multiple_choice, and along a direction the logits are linear in, predicted
scores and accuracies equal the measured ones at any step."""

import torch
from test_lm_finetune import _tasks, tiny_lm  # noqa: F401 (fixture)

from taskvec import lm_metrics as lm
from taskvec.lm_choices import accuracies, choice_batches, choice_chars, measure_choices, predict_choices
from taskvec.lm_objective import make_lm_model
from taskvec.lm_validate import applied
from taskvec.modeling import load_backbone, load_tokenizer


def test_predicted_choice_scores_and_accuracy(tiny_lm):  # noqa: F811
    _, task = _tasks()
    tok = load_tokenizer(tiny_lm)
    bb = load_backbone(tiny_lm, attn_implementation="eager").double()
    model = make_lm_model(bb, task).double().eval()
    idx = list(range(10))
    batches = choice_batches(tok, task, idx, batch_size=4, max_length=64)
    chars = choice_chars(task)
    labels = [task.labels[i] for i in idx]
    # θ0: the scores and accuracies of the harness definition
    mc = lm.multiple_choice(model, tok, [task.prompt.format(text=task.texts[i]) for i in idx],
                            [list(task.label_words)] * len(idx), labels)
    f0 = measure_choices(model, batches)
    assert torch.allclose(f0, torch.stack([torch.as_tensor(s) for s in mc.scores]).double(), atol=1e-8)
    assert accuracies(f0, labels, chars) == {"acc": mc.acc, "acc_norm": mc.acc_norm}
    # a direction on the final norm weight: logits linear in it, so the predictions are exact at any step
    g = torch.Generator().manual_seed(0)
    w = bb.norm.weight
    d = {"norm.weight": torch.randn(w.shape, generator=g, dtype=w.dtype)}
    sc = predict_choices(model, batches, labels, chars, {"d": d}, {"s": {"d": 4.0}}, ["d"],
                         max_memory=float("inf"))
    assert torch.allclose(sc.f0, f0, atol=1e-4)
    with applied(bb, {"norm.weight": 4.0 * d["norm.weight"]}):
        true = measure_choices(model, batches)
    assert float((true - f0).abs().max()) > 0.1
    assert torch.allclose(sc.predicted["s"], true, atol=1e-3)
    assert sc.accuracy("s") == accuracies(true, labels, chars) and sc.accuracy() == accuracies(f0, labels, chars)
