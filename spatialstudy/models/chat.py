"""Chat turns as training batches: the real processor's chat template, right padding, loss on the answers only.

Every method that trains on chat turns (pretraining, SFT, distillation) collates here, so they all mask alike.
"""
from __future__ import annotations

import torch


def answer_labels(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Labels that keep only assistant-turn tokens (answer + <|im_end|>), -100 elsewhere."""
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    labels = torch.full_like(input_ids, -100)
    ids, n = input_ids.tolist(), len(header)
    i = 0
    while i < len(ids):
        if ids[i:i + n] == header:
            j = i + n
            while j < len(ids) and ids[j] != end:
                j += 1
            labels[i + n:j + 1] = input_ids[i + n:j + 1]
            i = j
        i += 1
    return labels


VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def prompt_and_answer_labels(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Labels on every text token, prompt included (as the study trained): only vision tokens are -100, since an
    image placeholder cannot be predicted from text."""
    vision = torch.tensor(tokenizer.convert_tokens_to_ids(list(VISION_TOKENS)))
    return input_ids.masked_fill(torch.isin(input_ids, vision), -100)


def collate(episodes: list[tuple[list[dict], list]], processor, loss_on_prompt: bool = False) -> dict:
    """Tokenise (messages, images) episodes with the real processor (right padding); mask all but the answers
    (or, with `loss_on_prompt`, only the vision tokens). Padding is always -100."""
    texts = [processor.apply_chat_template(m, tokenize=False) for m, _ in episodes]
    images = [im for _, ims in episodes for im in ims]
    batch = processor(text=texts, images=images or None, return_tensors="pt", padding=True, padding_side="right")
    label_fn = prompt_and_answer_labels if loss_on_prompt else answer_labels
    labels = torch.stack([label_fn(row, processor.tokenizer) for row in batch["input_ids"]])
    batch["labels"] = labels.masked_fill(batch["attention_mask"] == 0, -100)
    return dict(batch)
