"""The official OmniSpatial prompt texts (qizekun/OmniSpatial vlms_eval), reproduced byte for byte, and the Qwen chat
messages built from them (used by pretraining, evaluation and ICL alike)."""
from __future__ import annotations

# prompt_type "manual_cot": the benchmark's system text, sent inside the user turn (note the two trailing spaces
# after "receive", "scene." and "image.", and the typographic characters).
MANUAL_COT_SYSTEM_PROMPT = (
    "\nYou are a spatial-reasoning assistant.\n\nTask\n-----\nYou will receive  \n1. **Image** - a single RGB frame "
    "depicting a scene.  \n2. **Question** - a natural-language query about spatial relationships between objects "
    "in the image.  \n3. **Options** - \u22652 answer candidates, each tagged by a capital letter (A, B, C, D\u2026)."
    "\n\nGuidelines\n----------\nPlease follow these steps to analyze the image and answer the question:\n1. First, "
    "carefully observe the image and identify all relevant objects and their spatial relationships.\n2. Next, break "
    "down the question into key components that need to be addressed.\n3. Think through the spatial reasoning "
    "step-by-step to arrive at your answer. It may be necessary to transfer perspective to better understand the "
    "scene.\n4. Finally, select the most appropriate option (A, B, C, or D) based on your analysis.\n\nAlways ground "
    "your answer in the visual evidence; do not hallucinate unseen objects.\nIf uncertain, pick the most plausible "
    "option\u2014never refuse or reply \u201cinsufficient information.\u201d\n"
)
# eval_type "re" and "direct"
RE_FORMAT = "\nEnd your answer with a separate line formatted exactly as:\n\nAnswer: X\nwhere X \u2208 {A, B, C, D}.\n"
DIRECT_FORMAT = ("\nNote: You only need to respond with A, B, C, or D without providing any additional "
                 "information.\n")

SYS_PROMPTS = {"manual_cot": MANUAL_COT_SYSTEM_PROMPT}
FORMAT_PROMPTS = {"re": RE_FORMAT, "direct": DIRECT_FORMAT}
STYLES = {"manual_cot": ("manual_cot", "re"), "direct": ("manual_cot", "direct")}   # style -> (prompt, eval type)


def lettered(question: str, options) -> str:
    """The question then one "\\nA. option" line per option (nothing more when the options are in the image)."""
    return question + "".join(f"\n{chr(65 + i)}. {opt}" for i, opt in enumerate(options or ()))


def omnispatial_prompt(question: str, options, style: str = "manual_cot") -> str:
    """SYS_PROMPTS[p] + "\\n" + FORMAT_PROMPTS[e] + "\\n\\n" + question + "\\nA. opt"...; empty options add nothing
    (the real Complex_Logic items draw their options into the image)."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {sorted(STYLES)}, got {style!r}")
    p, e = STYLES[style]
    return SYS_PROMPTS[p] + "\n" + FORMAT_PROMPTS[e] + "\n\n" + lettered(question, options)


def user_turn(text: str, image=None) -> dict:
    """A user turn: [image, text], or [text] alone (a follow-up question on an image already shown, a drill)."""
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def assistant_turn(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _demo_parts(demo):
    """A demo is (image, question, answer) or a dict with image, question (or prompt) and answer."""
    if isinstance(demo, dict):
        return demo["image"], demo.get("question", demo.get("prompt")), demo["answer"]
    image, question, answer = demo
    return image, question, answer


def chat_messages(prompt: str, image, demos=()) -> list[dict]:
    """Qwen chat messages: demo turns first (user[image, question] / assistant[answer]), then user[image, prompt].
    No system message: Qwen's chat template adds its default one, as in the official evaluation."""
    msgs = []
    for demo in demos:
        d_img, d_q, d_a = _demo_parts(demo)
        msgs += [user_turn(d_q, d_img), assistant_turn(d_a)]
    return msgs + [user_turn(prompt, image)]
