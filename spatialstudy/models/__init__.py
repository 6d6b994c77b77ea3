"""Models layer: the models and everything that runs them, above the data layer and below evaluation and methods.

    qwen         the image-only Qwen2.5-VL processor, tiny student/teacher specs, checkpoints, LoRA adapters
    tokenizer    the tiny models' small BPE tokenizer and the chat template
    chat         collating chat-formatted batches for training
    episodes     SpaceThinker rows as chat episodes in each target format (free text, MCQ, answer only)
    lora         LoRA / QLoRA on the language model only: target pattern, 4-bit loading, trainable wrapper
    generation   batched generation, shared by pretraining's held-out check and the evaluation harness
    transforms   image transforms (blind, grayscale, hue permutation) applied before a model sees an image
    pretrain     pretraining the tiny bases on the procedural data (cached under runs/cache/)
    bases        load_model(spec): any spec (checkpoint, cached hub name, tiny base pretrained on demand)

Nothing is re-exported here: import the module you need (`from spatialstudy.models.bases import load_model`), so
that importing a light module (transforms, generation) does not pull in transformers or pretraining.
Imports only from spatialstudy.data and the shared top-level modules (runs, scoring); never from evaluation or
methods (tests/test_imports.py).
"""
