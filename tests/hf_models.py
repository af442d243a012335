"""Tiny randomly initialised Hugging Face models of each family and their batches, shared by the
HF test files (test_transformers_integration.py, test_hf_patching.py, test_hf_families.py,
test_hf_trainer.py, test_fsdp_layouts.py, test_deepspeed_zero3.py): built from configs (no
downloads), with left padding, ignored labels and an odd vocabulary; ``run`` returns the loss and every parameter's gradient,
``assert_same`` compares a patched copy with the model's own loss and gradients. Their fixtures
(one thread, the torch backend) are in conftest.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from triton_xent.integrations import transformers as tx  # noqa: E402

VOCAB = 257
B, T = 2, 10
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
MOE = dict(output_router_logits=True, router_aux_loss_coef=0.05)


def _specs():
    V = VOCAB
    mrope = dict(rope_type="default", mrope_section=[1, 1, 2], rope_theta=10000.0)
    qwen_vl_ids = dict(image_token_id=V - 1, video_token_id=V - 2, vision_start_token_id=V - 3,
                       vision_end_token_id=V - 4)
    return {
        # name: (class, config class, config keywords, batch kind)
        "llama": ("LlamaForCausalLM", "LlamaConfig", TEXT, "text"),
        "mistral": ("MistralForCausalLM", "MistralConfig", TEXT, "text"),
        "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", TEXT, "text"),
        "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(TEXT, head_dim=8), "text"),
        "phi-bias": ("PhiForCausalLM", "PhiConfig", TEXT, "text"),  # lm_head has a bias
        # soft-caps small enough to change the loss of a random model (checked below)
        "gemma2-softcap": ("Gemma2ForCausalLM", "Gemma2Config",
                           dict(TEXT, head_dim=8, final_logit_softcapping=0.5), "text"),
        "gemma3-softcap": ("Gemma3ForCausalLM", "Gemma3TextConfig",
                           dict(TEXT, head_dim=8, final_logit_softcapping=0.5), "text"),
        # MoE: the model adds router_aux_loss_coef * its load-balancing loss
        "mixtral": ("MixtralForCausalLM", "MixtralConfig",
                    dict(TEXT, num_local_experts=4, num_experts_per_tok=2, **MOE), "text"),
        "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig",
                      dict(TEXT, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                           shared_expert_intermediate_size=32, **MOE), "text"),
        "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig",
                      dict(TEXT, head_dim=8, num_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=32, **MOE), "text"),
        "olmoe": ("OlmoeForCausalLM", "OlmoeConfig",
                  dict(TEXT, num_experts=4, num_experts_per_tok=2, eos_token_id=1, **MOE), "text"),
        "deepseek_v3": ("DeepseekV3ForCausalLM", "DeepseekV3Config",
                        dict(TEXT, num_key_value_heads=4, moe_intermediate_size=32,
                             n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                             n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16,
                             q_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8,
                             qk_nope_head_dim=8), "text"),
        "gpt_oss": ("GptOssForCausalLM", "GptOssConfig",
                    dict(TEXT, head_dim=8, num_local_experts=4, num_experts_per_tok=2, **MOE),
                    "text"),
        # logit-scaled heads: Cohere multiplies by logit_scale, Granite divides by logits_scaling
        "cohere": ("CohereForCausalLM", "CohereConfig", dict(TEXT, logit_scale=4.0, eos_token_id=1),
                   "text"),
        "granite": ("GraniteForCausalLM", "GraniteConfig", dict(TEXT, logits_scaling=4.0), "text"),
        "granitemoe": ("GraniteMoeForCausalLM", "GraniteMoeConfig",
                       dict(TEXT, logits_scaling=4.0, num_local_experts=4, num_experts_per_tok=2,
                            **MOE), "text"),
        # multimodal: the text head of a vision-language model, with images in the batch
        "llava": ("LlavaForConditionalGeneration", "LlavaConfig", dict(
            vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=37,
                               num_hidden_layers=2, num_attention_heads=4, image_size=12,
                               patch_size=4),
            text_config=dict(model_type="llama", **TEXT), image_token_index=V - 1,
            vision_feature_layer=-1), "llava"),
        "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLConfig", dict(
            text_config=dict(model_type="qwen2_vl_text", **TEXT, rope_parameters=mrope),
            vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2,
                               patch_size=2, spatial_merge_size=2, temporal_patch_size=2),
            **qwen_vl_ids), "qwen_vl"),
        "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig", dict(
            text_config=dict(model_type="qwen2_5_vl_text", **TEXT, rope_parameters=mrope),
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, out_hidden_size=32,
                               num_heads=4, patch_size=2, spatial_merge_size=2,
                               temporal_patch_size=2, window_size=8, fullatt_block_indexes=[0]),
            **qwen_vl_ids), "qwen_vl"),
        "gemma3": ("Gemma3ForConditionalGeneration", "Gemma3Config", dict(
            text_config=dict(model_type="gemma3_text", **TEXT, head_dim=8),
            vision_config=dict(model_type="siglip_vision_model", hidden_size=32,
                               intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                               image_size=16, patch_size=4),
            mm_tokens_per_image=4, image_token_index=V - 1, boi_token_index=V - 2,
            eoi_token_index=V - 3), "gemma3"),
        "mllama": ("MllamaForConditionalGeneration", "MllamaConfig", dict(
            text_config=dict(model_type="mllama_text_model", **TEXT, cross_attention_layers=[1],
                             pad_token_id=0),
            vision_config=dict(image_size=8, patch_size=4, hidden_size=16,
                               intermediate_layers_indices=[0], vision_output_dim=32,
                               num_hidden_layers=1, num_global_layers=1, num_attention_heads=4,
                               intermediate_size=37, supported_aspect_ratios=[[1, 1], [1, 2]],
                               max_num_tiles=2),
            image_token_index=V - 1), "mllama"),
    }


SPECS = _specs()


def make_config(name):
    cls_name, cfg_name, kwargs, kind = SPECS[name]
    cls, cfg = getattr(transformers, cls_name, None), getattr(transformers, cfg_name, None)
    if cls is None or cfg is None:
        pytest.fail(f"transformers {transformers.__version__} has no {cls_name}")
    return cls, cfg(**copy.deepcopy(kwargs))


def make_model(name, seed=0):
    cls, cfg = make_config(name)
    torch.manual_seed(seed)
    model = cls(cfg)
    if "softcap" in name:  # logits of a few units, so that the soft-cap matters
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.5)
    return model


def word_tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary: ``t3 ... t{VOCAB-1}`` and the
    pad, end and unknown tokens (0, 1, 2); for TRL's trainers, which take text."""
    import tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                                eos_token="<eos>", unk_token="<unk>")


def make_batch(name="llama", seed=1, batch=B, length=T):
    """input_ids, attention_mask (left padding), labels (-100 on padding, one more ignored, and
    on the image tokens) and the image inputs the model's family expects."""
    kind = SPECS[name][3]
    V = VOCAB
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V - 8, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :2] = 0
    extra = {}
    if kind == "llava":
        length = max(length, 12)
        ids = torch.randint(0, V - 8, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, :2] = 0
        ids[:, 2:11] = V - 1  # 9 patches of a 12x12 image with 4x4 patches
        extra = dict(pixel_values=torch.randn(batch, 3, 12, 12, generator=g))
    elif kind == "qwen_vl":
        ids[:, 2], ids[:, 3:7], ids[:, 7] = V - 3, V - 1, V - 4  # 4x4 patches merged 2x2: 4 tokens
        extra = dict(pixel_values=torch.randn(batch * 16, 3 * 2 * 2 * 2, generator=g),
                     image_grid_thw=torch.tensor([[1, 4, 4]] * batch),
                     mm_token_type_ids=(ids == V - 1).long())
    elif kind == "gemma3":
        ids[:, 2], ids[:, 3:7], ids[:, 7] = V - 2, V - 1, V - 3
        extra = dict(pixel_values=torch.randn(batch, 3, 16, 16, generator=g),
                     token_type_ids=(ids == V - 1).long())
    elif kind == "mllama":
        ids[:, 2] = V - 1
        extra = dict(pixel_values=torch.randn(batch, 1, 2, 3, 8, 8, generator=g),
                     aspect_ratio_ids=torch.tensor([[2]] * batch),
                     aspect_ratio_mask=torch.ones(batch, 1, 2, dtype=torch.long),
                     cross_attention_mask=torch.ones(batch, length, 1, 2, dtype=torch.long))
    labels = ids.masked_fill(mask == 0, -100).masked_fill(ids >= V - 8, -100)
    labels[1, 5] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels, **extra)


def run(model, **batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(grads, grads_ref):
    """Elementwise within GRAD_TOL, the absolute part scaled by the gradient's largest entry
    (fp32 rounding of a sum is relative to its largest terms, not to each small result)."""
    assert grads.keys() == grads_ref.keys()
    for name, ref in grads_ref.items():
        scale = max(1.0, ref.abs().max().item())
        torch.testing.assert_close(grads[name], ref, rtol=GRAD_TOL["rtol"],
                                   atol=GRAD_TOL["atol"] * scale, msg=name)


def assert_same(model_name, fused, patched_kwargs=None, ref_kwargs=None, batch=None, **options):
    ref = make_model(model_name)
    patched = tx.patch(copy.deepcopy(ref), fused=fused, **options)
    batch = make_batch(model_name) if batch is None else batch
    out_ref, grads_ref = run(ref, **batch, **(ref_kwargs or {}))
    out, grads = run(patched, **batch, **(patched_kwargs or {}))
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, out_ref.loss, **LOSS_TOL)
    assert_grads_close(grads, grads_ref)
    return out, out_ref


MODES = [pytest.param(True, id="fused"), pytest.param(False, id="unfused")]
DENSE = ["llama", "mistral", "qwen2", "qwen3", "phi-bias", "gemma2-softcap", "gemma3-softcap"]
