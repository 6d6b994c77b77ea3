"""SpaceThinker-schema rows as chat episodes (messages, images) for training: the study's free-text format and the
benchmark's MCQ format. Shared by every method that trains on the rows (SFT, distillation); models.chat collates.
"""
from __future__ import annotations


def _blank(image):
    from spatialstudy.models.transforms import BLIND

    return BLIND.fn(image)


def _images(record, blank: bool) -> list:
    images = list(record.images or [])
    return [_blank(im) for im in images] if blank else images


def user_turn(text: str, images: list, text_first: bool = False) -> dict:
    """The user turn: the images, then the text (as the benchmark asks), or the text first (the study's SFT rows)."""
    pictures, words = [{"type": "image", "image": im} for im in images], [{"type": "text", "text": text}]
    return {"role": "user", "content": words + pictures if text_first else pictures + words}


def chat(system: str, user: dict, answer: str) -> list[dict]:
    from spatialstudy.data.prompts import assistant_turn

    sys_turn = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    return sys_turn + [user, assistant_turn(answer)]


def spacethinker_target(record) -> str:
    """The study's target: the reasoning trace in <think>, then the free-text answer in <answer>."""
    return f"<think>{record.reasoning.strip()}</think>\n<answer>{record.answer.strip()}</answer>"


def spacethinker_episode(record, blank: bool = False, system: str = "",
                         text_first: bool = False) -> tuple[list[dict], list]:
    images = _images(record, blank)
    return chat(system, user_turn(record.question, images, text_first), spacethinker_target(record)), images


def mcq_episode(mcq, blank: bool = False, system: str = "", text_first: bool = False) -> tuple[list[dict], list]:
    """An MCQ (data.mcq.to_mcq, with reasoning) as the benchmark asks it: the official manual-CoT prompt with the
    lettered options; the target is the reasoning, then "Answer: X"."""
    from spatialstudy.data.prompts import omnispatial_prompt

    images = _images(mcq, blank)
    prompt = omnispatial_prompt(mcq.question, mcq.options, "manual_cot")
    return chat(system, user_turn(prompt, images, text_first), mcq.target), images


class Episodes:
    """A lazy dataset of chat episodes (images are read when a batch is built, not all at once)."""

    def __init__(self, rows: list, build):
        self.rows, self.build = rows, build

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.build(self.rows[i])


def episodes(records: list, target: str, blank: bool = False, system: str = "", seed: int = 0,
             text_first: bool = False):
    """(Episodes, conversion report) of SpaceThinker rows in a target format: "spacethinker" (free text), "mcq"
    (reasoning, then "Answer: X") or "answer_only" (the mcq prompt, target "Answer: X"). Rows that cannot become an
    MCQ are counted in the report and skipped. `text_first`: the question before the image (the study's layout)."""
    if target == "spacethinker":
        return Episodes(records, lambda r: spacethinker_episode(r, blank, system, text_first)), {}
    from spatialstudy.data.mcq import to_mcq_batch

    mcqs, report = to_mcq_batch(records, seed=seed, with_reasoning=target == "mcq")
    return Episodes(mcqs, lambda m: mcq_episode(m, blank, system, text_first)), report


DATA_STAGE = "01_data"


def spacethinker_dir(profile: str):
    """Where the profile's 01_data stage wrote (or found) the SpaceThinker-schema rows."""
    from pathlib import Path

    from spatialstudy import runs

    metrics = runs.read_json(runs.require_run(profile, DATA_STAGE) / "metrics.json")
    try:
        return Path(metrics["spacethinker_dir"])
    except KeyError:
        raise KeyError(f"runs/{profile}/{DATA_STAGE}/metrics.json has no spacethinker path; re-run "
                       f"{DATA_STAGE}") from None


def spacethinker_rows(profile: str, path: str = "", n_train: int = 0, n_val: int = 0) -> tuple[list, list]:
    """(train, validation) SpaceThinker-schema rows: the local copy at `path`, else what 01_data wrote; the
    validation rows are the test split (the benchmark is never trained or validated on). 0 = all rows."""
    from spatialstudy import runs
    from spatialstudy.data import load_spacethinker

    where = runs.resolve(path) if path else spacethinker_dir(profile)
    train, val = load_spacethinker(where, "train"), load_spacethinker(where, "test")
    return list(train)[:n_train or None], list(val)[:n_val or None]
