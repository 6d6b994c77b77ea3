"""Methods layer: the study's stages, on top of data, models and evaluation.

    baseline     the untuned tiny student and teacher (with the blind control) on the evaluation subset
    sft          02_sft: (Q)LoRA fine-tuning arms, each with its own blind control
    icl          03_icl: retrieval-based in-context learning (MiniLM + FAISS) and its controls
    distill      04_distill: logit and similarity-weighted attention KD, the teacher gate
    grayscale    05_grayscale: original vs grayscale vs hue-permuted images, the colour splits, a gray-augmented arm
    results      06_results: every run's metrics side by side, the HTML report (reads runs, evaluates nothing)

Methods never import each other; they meet only through run directories (spatialstudy.runs: one stage saves its
run, a later one requires it). The runner (spatialstudy.run) calls a method's `main(profile, params)` through its
PY_STAGES table or a notebook does.
"""
