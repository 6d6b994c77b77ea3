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


def collate(episodes: list[tuple[list[dict], list]], processor) -> dict:
    """Tokenise (messages, images) episodes with the real processor (right padding); mask all but the answers."""
    texts = [processor.apply_chat_template(m, tokenize=False) for m, _ in episodes]
    images = [im for _, ims in episodes for im in ims]
    processor.tokenizer.padding_side = "right"
    batch = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
    labels = torch.stack([answer_labels(row, processor.tokenizer) for row in batch["input_ids"]])
    batch["labels"] = labels.masked_fill(batch["attention_mask"] == 0, -100)
    return dict(batch)
