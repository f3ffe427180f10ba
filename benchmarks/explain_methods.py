"""Which relevance map finds the object a question is about (the method choice behind assistant/explain.py):
gradient x input, its absolute value, and the gradient norm, taken at the pixels (pooled per patch), at the vision
features and at the projector output, on 80 questions about one object in held-out scenes, default model.

    python benchmarks/explain_methods.py   (prints each variant's pointing-game hit rate)
"""
import random, sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent)); sys.path.insert(1, str(__import__("pathlib").Path(__file__).parent.parent))
from pointing_game import questions_for, hit
from assistant.explain import _answer_ids, _answer_logprobs, _to_grid
from assistant.weights.loading import load_model
from assistant.inference.engine import Engine
from assistant.inference.generation import GenerationConfig
from finetune.scenes import render, sample_scene
model, proc = load_model("default"); model.eval()
eng = Engine(model, proc)
items = []
for i in range(100, 130):
    rng = random.Random(f"exp-{i}")
    things = sample_scene(rng, "test"); image = render(things, rng)
    for q, t in questions_for(things): items.append((image, q, t))
items = items[:80]
hits = {}
def score(name, grid, t):
    g = grid.reshape(6, 6); cell = divmod(int(g.reshape(-1).argmax()), 6)
    hits.setdefault(name, []).append(hit(cell, t, 6, 96))
for image, q, t in items:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q + "\nAnswer the question using a single word or phrase."}]}]
    a = eng.answer_batch([msgs], [[image]], GenerationConfig(max_new_tokens=8))[0]
    ids, mask = _answer_ids(proc, msgs, [image], a)
    pix = proc.preprocess_images([image]).requires_grad_(True)
    with torch.enable_grad():
        feats = model.vision_tower(pix); feats.retain_grad()
        proj = model.projector(feats); proj.retain_grad()
        emb = model.embed(ids, proj)
        logits = model.llm(inputs_embeds=emb).logits.float()
        targets = ids[0, 1:]; pos = mask[1:].nonzero().squeeze(-1)
        lp = torch.log_softmax(logits[:, :-1][:, pos], -1).gather(-1, targets[pos][None, :, None]).sum()
        lp.backward()
    gx = (pix.grad * pix.detach())[0]  # 3,H,W
    P = 16
    def pool(x): return x.reshape(6, P, 6, P).sum((1, 3))
    score("pixel_gxi_relu", pool(gx.sum(0).clamp(min=0)), t)
    score("pixel_gxi_abs", pool(gx.sum(0).abs()), t)
    score("pixel_grad_abs", pool(pix.grad[0].abs().sum(0)), t)
    score("feat_gxi_relu", (feats.grad * feats.detach())[0].sum(-1).clamp(min=0), t)
    score("feat_gxi_abs", (feats.grad * feats.detach())[0].sum(-1).abs(), t)
    score("feat_grad_norm", feats.grad[0].norm(dim=-1), t)
    score("proj_gxi_relu", (proj.grad * proj.detach())[0].sum(-1).clamp(min=0), t)
    score("proj_gxi_abs", (proj.grad * proj.detach())[0].sum(-1).abs(), t)
    score("proj_grad_norm", proj.grad[0].norm(dim=-1), t)
for k, v in hits.items(): print(k, f"{100*sum(v)/len(v):.1f}%", len(v))
