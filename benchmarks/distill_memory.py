"""Peak memory of one attention + logit KD training step: naive all-layer maps against answer-row capture (not a timed
test; issue 19 asks for the formula and a measurement against the naive version).

    OMP_NUM_THREADS=1 python benchmarks/distill_memory.py --tokens 256 512 1024 --batch 1

Tiny random pair (tiny-teacher-random: 3 layers x 8 heads, tiny-student-random: 4 layers x 3 heads; eager attention,
fp32 on the CPU), text-only batches of L random token ids whose last A = --answer positions are the answer (labels).
One step = teacher forward under no_grad + student forward + loss (beta * AttnKD + gamma * LogitKD, T 1.5,
alpha 0.5, beta = gamma = 0.5, similarity l1) + backward. Versions, each in a fresh subprocess:

    naive       both models with output_attentions=True: every layer's [B, H, L, L] map kept for both models at once;
                AttnKD over every layer group on all L query rows.
    reduced     distill.AttentionCapture on the answer rows only ([B, H, A, L] per mapped layer), teacher under
                no_grad, layers from distill.layer_groups ("concat").
    reduced_gc  reduced + non-reentrant gradient checkpointing on the student (as lora.make_trainable enables it).

Peak memory: after a warm-up step, freed heap is returned to the kernel (malloc_trim; the workers also run with
MALLOC_MMAP_THRESHOLD_=128 KiB, so tensors are unmapped when freed), the kernel's peak-RSS counter is reset
(/proc/self/clear_refs = 5), and the measured step's peak (VmHWM) minus the RSS just before it is reported: what the
step itself holds at its peak, the models and inputs being in the baseline. Where clear_refs is not available, the
process peak (ru_maxrss) minus the RSS after the load (less exact: the load's own peak may hide the step's).

Peak-memory formula (B batch, L tokens, A answer rows, b bytes per element of the model dtype, N_T / N_S layers,
H_T / H_S heads, G layer groups (teacher layers mapped; G = N_T for concat), V_T / V_S vocab rows, fp32 = 4 bytes;
s = 4 + b bytes per student probability kept for backward when b < 4 (eager softmax runs in fp32 and the cast copy is
kept too), s = 4 in fp32; x = b + 4 bytes per element of one layer's working set (scores + fp32 probs; 8 in fp32)).
Held until backward ("stored"), then the transient working set on top at the peak:

  naive     teacher maps   N_T H_T B L^2 b        output_attentions, no grad, all layers kept at once
            student maps   N_S H_S B L^2 s        output_attentions = what autograd keeps for backward anyway
            loss graph     G B L^2 H_T 4 (2 + c)  per group until backward: the fp32 mixture and its clamp (saved by
                                                  clamp_min / log), c = 1 when b < 4 (the teacher's fp32 copy, saved by
                                                  the product t log(mix)); c = 0 in fp32
            transient      3 B H_T L^2 4          the loss's fp32 temporaries on one group (normalised maps, products)
  reduced   teacher rows   G H_T B A L b          AttentionCapture on the answer rows, no grad
            student rows   N_S H_S B A L b        the captured rows (graph kept)
            student probs  N_S H_S B L^2 s        eager attention keeps each layer's probabilities for backward;
                                                  with gradient checkpointing (reduced_gc) one layer's H_S B L^2 s,
                                                  recomputed in backward
            loss graph     G B A L H_T 4 (2 + c)
            transient      max(teacher phase: H_T B L^2 x, one teacher layer while it runs, nothing else held yet;
                               student phase: H_S B L^2 x on top of the held terms, the last layer's backward)
  both      logits         B L (V_T + V_S) b      both models' logits (the KD loss then reads the answer positions)
            mask           B L^2 b                the 4-D causal mask each forward builds

plus weights, gradients, optimizer state and the O(B L d) activations, alike in all versions. The naive version grows
with L^2 (N_T H_T + N_S H_S + the loss graph's G H_T); the reduced one with L^2 N_S H_S (one layer's H_S under
checkpointing) and A L for everything attention KD adds.

Also prints and records the formula for the real pair (7B teacher: 28 layers x 28 heads, vocab 152,064; 3B student:
36 x 16, vocab 151,936; bf16) at 1k and 2k tokens with A = 64. Writes reports/benchmarks/distill_memory.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VERSIONS = ("naive", "reduced", "reduced_gc")
T, ALPHA, BETA, GAMMA = 1.5, 0.5, 0.5, 0.5
REAL = {"teacher": dict(layers=28, heads=28, vocab=152064, name="Qwen2.5-VL-7B"),
        "student": dict(layers=36, heads=16, vocab=151936, name="Qwen2.5-VL-3B")}
GIB, MIB = 2 ** 30, 2 ** 20
MMAP_THRESHOLD = 128 * 1024   # glibc: blocks from 128 KiB up are mmapped and unmapped on free (no dynamic threshold)


# ---------------------------------------------------------------- the formula
def analytic(L: int, *, B: int, A: int, b: int, nt: int, ht: int, ns: int, hs: int, vt: int, vs: int,
             groups: int) -> dict:
    """Bytes each version holds ("held"), its transient working set and their sum ("total", the peak estimate),
    beyond weights, gradients and O(B L d) activations (module docstring)."""
    s = 4 + b if b < 4 else 4                          # student probabilities kept for backward, per element
    x = b + 4                                          # one layer's working set per element: scores + fp32 probs
    c = 1 if b < 4 else 0                              # the loss's fp32 copy of the teacher maps
    L2, AL = B * L * L, B * A * L
    both = {"logits": B * L * (vt + vs) * b, "mask": L2 * b}
    naive = {"teacher_maps": nt * ht * L2 * b, "student_maps": ns * hs * L2 * s,
             "loss_graph": groups * ht * L2 * 4 * (2 + c), **both}
    naive_transient = 3 * ht * L2 * 4
    out = {"naive": {**naive, "held": sum(naive.values()), "transient": naive_transient,
                     "total": sum(naive.values()) + naive_transient},
           "stored_maps": {"naive": naive["teacher_maps"] + naive["student_maps"]}}
    for name, probs in (("reduced", ns * hs * L2 * s), ("reduced_gc", hs * L2 * s)):
        held = {"teacher_rows": groups * ht * AL * b, "student_rows": ns * hs * AL * b, "student_probs": probs,
                "loss_graph": groups * ht * AL * 4 * (2 + c), **both}
        teacher_phase = ht * L2 * x + both["mask"] + B * L * vt * b
        student_phase = sum(held.values()) + hs * L2 * x
        out[name] = {**held, "held": sum(held.values()), "transient": max(teacher_phase - sum(held.values()),
                                                                           hs * L2 * x),
                     "total": max(teacher_phase, student_phase)}
        out["stored_maps"][name] = held["teacher_rows"] + held["student_rows"]
    return out


def real_pair(tokens=(1024, 2048), A: int = 64, B: int = 1) -> dict:
    from spatialstudy.methods.distill import layer_groups

    t, s = REAL["teacher"], REAL["student"]
    g = len(layer_groups(s["layers"], t["layers"]))
    return {str(L): analytic(L, B=B, A=A, b=2, nt=t["layers"], ht=t["heads"], ns=s["layers"], hs=s["heads"],
                             vt=t["vocab"], vs=s["vocab"], groups=g) for L in tokens}


# ---------------------------------------------------------------- one measured step (in a subprocess)
def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _trim() -> None:
    """Hand freed heap pages back to the kernel (glibc), so that the baseline RSS holds no freed warm-up memory."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(version: str, L: int, B: int, A: int, similarity: str) -> dict:
    import gc

    import torch

    from spatialstudy.methods import distill
    from spatialstudy.models.bases import load_model

    torch.manual_seed(0)
    teacher, _ = load_model("tiny-teacher-random", attn_implementation="eager")
    student, proc = load_model("tiny-student-random", attn_implementation="eager")
    teacher.eval().requires_grad_(False)
    student.train()
    if version == "reduced_gc":
        student.config.use_cache = False
        enable = getattr(student, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tc, sc = teacher.config.text_config, student.config.text_config
    groups = distill.layer_groups(sc.num_hidden_layers, tc.num_hidden_layers)

    special = set(proc.tokenizer.added_tokens_decoder) | set(proc.tokenizer.all_special_ids)
    pool = torch.tensor([i for i in range(len(proc.tokenizer)) if i not in special])
    g = torch.Generator().manual_seed(L)
    ids = pool[torch.randint(len(pool), (B, L), generator=g)]
    attn = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    labels[:, L - A:] = ids[:, L - A:]
    rows, row_mask = distill.answer_rows(labels)

    t_cap = s_cap = None
    if version != "naive":
        t_cap = distill.AttentionCapture(teacher, [t for t, _ in groups])
        s_cap = distill.AttentionCapture(student, [s for _, ss in groups for s in ss])

    def step() -> float:
        if version == "naive":
            with torch.no_grad():
                t_out = teacher(input_ids=ids, attention_mask=attn, output_attentions=True, use_cache=False)
            s_out = student(input_ids=ids, attention_mask=attn, output_attentions=True, use_cache=False)
            t_maps, s_maps = dict(enumerate(t_out.attentions)), dict(enumerate(s_out.attentions))
            qmask = None
        else:
            with torch.no_grad(), t_cap.recording(rows):
                t_out = teacher(input_ids=ids, attention_mask=attn, use_cache=False)
            with s_cap.recording(rows):
                s_out = student(input_ids=ids, attention_mask=attn, use_cache=False)
            t_maps, s_maps, qmask = t_cap.maps, s_cap.maps, row_mask
        attn_kd = distill.grouped_attention_kd(t_maps, s_maps, groups, similarity=similarity, query_mask=qmask)
        logit_kd = distill.logit_kd_loss(s_out.logits[:, :-1], t_out.logits[:, :-1], labels[:, 1:], alpha=ALPHA,
                                         temperature=T)
        loss = BETA * attn_kd + GAMMA * logit_kd
        loss.backward()
        return float(loss.detach())

    def clear():
        student.zero_grad(set_to_none=True)
        if t_cap is not None:
            t_cap.maps, s_cap.maps = {}, {}
        gc.collect()
        _trim()

    result = {"version": version, "L": L, "B": B, "A": A, "similarity": similarity,
              "dtype": str(next(student.parameters()).dtype).replace("torch.", ""),
              "teacher": dict(layers=tc.num_hidden_layers, heads=tc.num_attention_heads, vocab=tc.vocab_size),
              "student": dict(layers=sc.num_hidden_layers, heads=sc.num_attention_heads, vocab=sc.vocab_size),
              "groups": len(groups)}
    rss_after_load = _status_kib("VmRSS")
    try:
        step()                                         # warm-up: lazy allocations, allocator arenas
        clear()
        base = _status_kib("VmRSS")
        exact = _reset_peak()
        t0 = time.perf_counter()
        loss = step()
        result["step_s"] = time.perf_counter() - t0
        peak = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        base = base if exact else rss_after_load
        result.update(loss=loss, peak_delta_mib=(peak - base) / 1024, baseline_rss_mib=base / 1024,
                      peak_method="VmHWM after clear_refs" if exact else "ru_maxrss - RSS after load")
    except Exception as e:                             # recorded, not fatal: the table shows which version failed
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return result


def run_worker(version: str, L: int, B: int, A: int, similarity: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1", MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    cmd = [sys.executable, __file__, "--worker", version, "--tokens", str(L), "--batch", str(B), "--answer", str(A),
           "--similarity", similarity]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode or not lines:
        return {"version": version, "L": L, "error": f"worker exited {p.returncode}: {p.stderr.strip()[-400:]}"}
    return json.loads(lines[-1])


# ---------------------------------------------------------------- reports
def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def _mib(x: float) -> str:
    return f"{x / MIB:.1f}"


def markdown(result: dict) -> str:
    m = result["measured"]
    a = result["args"]
    tiny = m[0]
    lines = ["# Distillation memory: naive all-layer attention KD vs answer-row capture", "",
             "Reproduce: `OMP_NUM_THREADS=1 python benchmarks/distill_memory.py --tokens "
             f"{' '.join(map(str, a['tokens']))} --batch {a['batch']} --answer {a['answer']}`. Tiny random pair, eager "
             f"attention, {tiny.get('dtype')} on "
             f"the CPU, one thread: teacher {tiny['teacher']['layers']} layers x {tiny['teacher']['heads']} heads, "
             f"student {tiny['student']['layers']} x {tiny['student']['heads']}, {tiny['groups']} layer groups "
             f"(concat), batch {a['batch']}, A = {a['answer']} answer rows, similarity {a['similarity']}. One step = "
             "teacher forward (no_grad) + student forward + beta AttnKD + gamma LogitKD + backward; each version in a "
             "fresh process, peak RSS of the measured step (after a warm-up) minus the RSS before it.", "",
             "| L | version | measured peak (MiB) | x naive | formula (MiB) | stored maps (MiB) | step (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in m:
        f = result["formula_tiny"][str(r["L"])]
        if "error" in r:
            lines.append(f"| {r['L']} | {r['version']} | failed ({r['error'].split(':')[0]}, see notes) | "
                         f"{_mib(f[r['version']]['total'])} | {_mib(f['stored_maps'][r['version']])} | | |")
            continue
        stored = f["stored_maps"][r["version"]]
        ratio = f"{r['vs_naive']:.2f}" if "vs_naive" in r else ""
        lines.append(f"| {r['L']} | {r['version']} | {r['peak_delta_mib']:.1f} | {ratio} | "
                     f"{_mib(f[r['version']]['total'])} | {_mib(stored)} | {r['step_s']:.2f} |")
    lines += ["", "Formula column: the module docstring's peak estimate (held maps, the loss's fp32 graph, logits, "
              "mask and the transient working set), without weights, gradients or the O(B L d) activations, which the "
              "measured column includes. Stored maps: the attention maps alone (naive: every layer's L x L for both "
              "models; reduced: the A x L answer rows).", "",
              "## The real pair (formula): 7B teacher 28 x 28 heads, 3B student 36 x 16, bf16, B = 1, A = 64", "",
              "| L | naive: teacher maps | naive: student maps | naive: loss graph | naive peak | reduced peak | "
              "reduced + checkpointing peak | reduced: teacher rows | reduced: student L^2 probs | logits |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for L, f in result["formula_real"].items():
        n, r = f["naive"], f["reduced"]
        lines.append(f"| {L} | {_gib(n['teacher_maps'])} | {_gib(n['student_maps'])} | {_gib(n['loss_graph'])} | "
                     f"{_gib(n['total'])} | {_gib(r['total'])} | {_gib(f['reduced_gc']['total'])} | "
                     f"{_gib(r['teacher_rows'])} | {_gib(r['student_probs'])} | {_gib(r['logits'])} |")
    lines += ["", "(GiB, beyond weights and O(L d) activations.)", "",
              "![measured and formula peak memory](distill_memory.png)", "", "## Formula", "",
              "```", result["formula_text"].strip(), "```", ""]
    if result.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(lines)


def figure(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for v, c in zip(VERSIONS, ("C3", "C0", "C2")):
        pts = [(r["L"], r["peak_delta_mib"]) for r in result["measured"] if r["version"] == v and "error" not in r]
        if pts:
            ax.plot(*zip(*pts), "o-", color=c, label=f"{v} (measured)")
        form = sorted((int(L), f[v]["total"] / MIB) for L, f in result["formula_tiny"].items())
        ax.plot(*zip(*form), "--", color=c, alpha=0.6, label=f"{v} (formula)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens L")
    ax.set_ylabel("step peak memory beyond baseline (MiB)")
    ax.set_title("Tiny pair: attention + logit KD step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--answer", type=int, default=64, help="answer rows A (the last A tokens are the answer)")
    ap.add_argument("--similarity", default="l1", choices=("dot", "cosine", "l1"))
    ap.add_argument("--versions", nargs="+", default=list(VERSIONS), choices=VERSIONS)
    ap.add_argument("--out", default="reports/benchmarks/distill_memory")
    ap.add_argument("--worker", choices=VERSIONS, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker, args.tokens[0], args.batch, args.answer, args.similarity)))
        return

    from spatialstudy.methods.distill import layer_groups

    measured = []
    for L in args.tokens:
        for v in args.versions:
            t0 = time.perf_counter()
            r = run_worker(v, L, args.batch, args.answer, args.similarity)
            r["wall_s"] = time.perf_counter() - t0
            measured.append(r)
            print(f"L={L:5d} {v:10s} " + (f"peak +{r['peak_delta_mib']:8.1f} MiB  step {r['step_s']:.2f} s"
                                          if "error" not in r else f"FAILED {r['error'][:150]}"), flush=True)
    ok = next((r for r in measured if "teacher" in r), None)
    if ok is None:
        raise SystemExit("every worker failed")
    tt, ss = ok["teacher"], ok["student"]
    g = len(layer_groups(ss["layers"], tt["layers"]))
    formula_tiny = {str(L): analytic(L, B=args.batch, A=args.answer, b=4, nt=tt["layers"], ht=tt["heads"],
                                     ns=ss["layers"], hs=ss["heads"], vt=tt["vocab"], vs=ss["vocab"], groups=g)
                    for L in args.tokens}
    formula_real = real_pair()
    doc = __doc__
    formula_text = doc[doc.index("Peak-memory formula"):doc.index("Also prints")]
    notes = []
    for r in measured:
        if r["version"] == "naive" or "error" in r:
            continue
        n = next((x for x in measured if x["version"] == "naive" and x["L"] == r["L"] and "error" not in x), None)
        if n:
            r["vs_naive"] = r["peak_delta_mib"] / n["peak_delta_mib"]
    gc_err = [r for r in measured if r["version"] == "reduced_gc" and "error" in r]
    if gc_err:
        notes.append("reduced_gc fails: " + gc_err[0]["error"][:200].rstrip(".") + ". AttentionCapture's hook "
                     "gathers the answer rows with probs.gather, which saves tensors for backward (probs, index) in "
                     "the original forward but not in the recomputation (the capture is closed then); non-reentrant "
                     "checkpointing refuses the mismatch. Its formula column shows what it would hold once fixed. "
                     "Without checkpointing the reduced version still keeps every student layer's L x L "
                     "probabilities for backward: for the real pair that term alone is "
                     f"{_gib(formula_real['2048']['reduced']['student_probs'])} GiB at 2k tokens, so checkpointing "
                     "is what makes attention KD fit.")
    longest = [r for r in measured if "error" not in r and r["L"] == max(args.tokens)]
    if longest:
        parts = [f"{r['version']} {formula_tiny[str(r['L'])][r['version']]['total'] / MIB / r['peak_delta_mib']:.2f} "
                 f"({r['peak_delta_mib'] - formula_tiny[str(r['L'])][r['version']]['total'] / MIB:.0f} MiB left)"
                 for r in longest]
        notes.append(f"Formula / measured at L = {max(args.tokens)}: " + ", ".join(parts) + ". What is left is "
                     "gradients, the O(L d) activations and the part of the transient working set the formula leaves "
                     "out (the backward's L x L gradient temporaries).")
    result = {"args": vars(args), "measured": measured, "formula_tiny": formula_tiny, "formula_real": formula_real,
              "formula_text": formula_text, "notes": notes}
    print("\nReal pair (formula, bf16, B=1, A=64), GiB beyond weights:")
    for L, f in formula_real.items():
        n, r = f["naive"], f["reduced"]
        print(f"  L={L}: naive maps {_gib(n['teacher_maps'])} (teacher) + {_gib(n['student_maps'])} (student), loss "
              f"graph {_gib(n['loss_graph'])}, peak {_gib(n['total'])}; reduced peak {_gib(r['total'])} (teacher rows "
              f"{_gib(r['teacher_rows'])}, student probs {_gib(r['student_probs'])}, logits {_gib(r['logits'])}); "
              f"reduced + ckpt {_gib(f['reduced_gc']['total'])}")
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    figure(result, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')}, .md, .png")


if __name__ == "__main__":
    main()
