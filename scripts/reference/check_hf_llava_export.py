"""Opt-in check that Hugging Face transformers loads fedcmp's `hf-llava`
export into a LLaVA model and computes the same visual tokens as fedcmp.

Called by the ignored Rust test
`fedcmp-experiment --test experiment export::transformers_loads_the_hf_export`
(needs the PyTorch venv: `bash bench/setup_torch_venv.sh`):

    python check_hf_llava_export.py EXPORT_DIR VISION_DIR CHECK_FILE

EXPORT_DIR holds the export (model.safetensors, projector_config.json);
VISION_DIR a tiny CLIP model folder (config.json with a vision_config,
model.safetensors); CHECK_FILE a safetensors file with `pixels` (1, 3, s, s,
already normalised) and `visual` (fedcmp's visual tokens for them).

It builds a LlavaConfig from the CLIP vision config, a tiny Llama text
config of the export's width and the export's projector_config.json, writes
a model folder whose checkpoint holds the CLIP tower and the EXPORTED
projector tensors as they are, loads it with from_pretrained (which must
report no unexpected key and no missing projector key), and compares
get_image_features (penultimate layer, class token dropped: LLaVA's
default) with fedcmp's tokens. Exits 1 on any mismatch.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration


def main() -> int:
    export_dir, vision_dir, check_file = (Path(a) for a in sys.argv[1:4])
    projector = json.loads((export_dir / "projector_config.json").read_text())
    clip = json.loads((vision_dir / "config.json").read_text())["vision_config"]
    width = projector["text_config"]["hidden_size"]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**clip),
        text_config=LlamaConfig(
            hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, vocab_size=64,
        ),
        projector_hidden_act=projector["projector_hidden_act"],
        multimodal_projector_bias=projector["multimodal_projector_bias"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_token_index=63,
    )
    assert config.vision_config.hidden_size == projector["vision_config"]["hidden_size"]

    exported = load_file(str(export_dir / "model.safetensors"))
    tensors = dict(exported)
    for name, t in load_file(str(vision_dir / "model.safetensors")).items():
        if name.startswith("vision_model."):
            tensors["vision_tower." + name] = t
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        save_file(tensors, str(Path(tmp) / "model.safetensors"))
        model, info = LlavaForConditionalGeneration.from_pretrained(
            tmp, output_loading_info=True, dtype=torch.float32
        )
    model.eval()
    missing_projector = [k for k in info["missing_keys"] if "multi_modal_projector" in k]
    if info["unexpected_keys"] or missing_projector or info.get("mismatched_keys"):
        print(f"loading: unexpected {info['unexpected_keys']}, missing projector keys "
              f"{missing_projector}, mismatched {info.get('mismatched_keys')}")
        return 1
    loaded = model.model.multi_modal_projector.linear_1.weight.detach()
    if not torch.equal(loaded, exported["multi_modal_projector.linear_1.weight"]):
        print("the loaded projector is not the exported one")
        return 1

    check = load_file(str(check_file))
    with torch.no_grad():
        out = model.model.get_image_features(
            pixel_values=check["pixels"], vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(features, (list, tuple)):
        features = torch.stack(list(features))
    ours = check["visual"]
    if features.shape != ours.shape:
        print(f"shape: transformers {tuple(features.shape)} vs fedcmp {tuple(ours.shape)}")
        return 1
    diff = (features - ours).abs().max().item()
    scale = ours.abs().max().item()
    print(f"visual tokens {tuple(ours.shape)}: max |transformers - fedcmp| = {diff:.3g} "
          f"(max |token| {scale:.3g})")
    return 0 if diff <= 1e-4 * max(1.0, scale) else 1


if __name__ == "__main__":
    sys.exit(main())
