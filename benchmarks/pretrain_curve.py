"""Learning curve of a tiny base's pretraining: held-out base-family accuracy every 100 steps (not a timed test).

    OMP_NUM_THREADS=1 python benchmarks/pretrain_curve.py student 600 5e-4 S3 1   # name steps lr tag threads

Same pool, episodes, schedule and optimiser as spatialstudy.pretrain at the smoke tier (steps and lr overridden);
accuracy is the teacher-forced argmax over the four letters after "Answer:" on 200 held-out base-partition items,
with the image and blind (grey image). Prints one JSON line per 100 steps; the runs behind
reports/pretraining_targets.md were made with it.
"""
import dataclasses, json, random, sys, time
import torch
torch.set_num_threads(int(sys.argv[5]) if len(sys.argv) > 5 else 1)
from spatialstudy import pretrain as P
from spatialstudy.models import build_tiny, make_processor
name, steps, lr, tag = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
s = dataclasses.replace(P.TIERS[(name, "smoke")], steps=steps, lr=lr)
tok = P.base_tokenizer(); proc = make_processor(tok)
pool = P._pool(s.n_scenes, s.per_scene, 0)
import spatialstudy.data as D
from PIL import Image
LETTERS=P.LETTERS; BLANK_RGB=P.BLANK_RGB; _data=P._data; _turn=P._turn; letter_ids=P.letter_ids
def letter_scores(model, processor, items, style: str = "manual_cot", blind: bool = False,
                  given_text: bool = False, batch_size: int = 32) -> torch.Tensor:
    """(n, 4) logits of the four letters at the answer position, teacher-forced: after "Answer:" or, with
    `given_text`, after the correct option's text + "\nAnswer:" (isolates binding text to letter from vision)."""
    _, prompts = _data()
    ids, out = letter_ids(processor.tokenizer, style), []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        imgs = [Image.new("RGB", it.image.size, BLANK_RGB) if blind else it.image for it in chunk]
        texts = [processor.apply_chat_template([_turn(it, style, True, prompts)], tokenize=False,
                                               add_generation_prompt=True) for it in chunk]
        if style != "direct":
            texts = [t + (f"{it.options[it.answer]}\n" if given_text else "") + "Answer:" for t, it in zip(texts, chunk)]
        processor.tokenizer.padding_side = "left"  # the last position is then every row's answer position
        batch = processor(text=texts, images=imgs, return_tensors="pt", padding=True)
        out.append(model(**batch).logits[:, -1, ids].float())
    return torch.cat(out)



held = D.make_items(200, seed=P.HELDOUT_SEED, partition="base")
truth = torch.tensor([it.answer for it in held]); fam = [it.family for it in held]
model = build_tiny(name, tok)
opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.98))
t0 = time.time(); log = []
def ev(step):
    model.eval()
    pred = torch.no_grad()(letter_scores)(model, proc, held).argmax(-1)
    blind = torch.no_grad()(letter_scores)(model, proc, held, blind=True).argmax(-1)
    r = {"step": step, "t": round(time.time() - t0), "acc": (pred == truth).float().mean().item(),
         "blind": (blind == truth).float().mean().item()}
    for f in sorted(set(fam)):
        m = torch.tensor([x == f for x in fam]); r[f] = round((pred[m] == truth[m]).float().mean().item(), 3)
    r["letters"] = [int((pred == i).sum()) for i in range(4)]
    print(tag, json.dumps(r), flush=True); model.train()
model.train()
for step in range(steps):
    rng = random.Random(step)
    few = rng.random() < s.icl_fraction
    b = P.collate([P.episode(pool, rng, s, few) for _ in range(s.batch_size)], proc)
    for g in opt.param_groups: g["lr"] = P._lr_at(step, s)
    loss = model(**b).loss; loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad()
    if (step + 1) % 100 == 0: ev(step + 1)
