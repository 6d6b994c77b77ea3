"""Methods layer: the study's stages, on top of data, models and evaluation.

    baseline     the untuned tiny student and teacher (with the blind control) on the evaluation subset

The four methods will live here, one module each: sft, icl, distill, grayscale. Methods never import each other;
they meet only through run directories (spatialstudy.runs: one stage saves its run, a later one requires it). The
runner (spatialstudy.run) calls a method's `main(profile, params)` through its PY_STAGES table or a notebook does.
"""
