#!/usr/bin/env python3
"""PyTorch reference for the alignment-step benchmark (LLaVA stage 1, CPU, f32).

    bash bench/setup_torch_venv.sh
    .venv-torch/bin/python bench/pytorch_alignment_step.py --threads 2

One step is what LLaVA's trainer does in stage 1 (feature alignment): the
LLM is frozen, only the mlp2x_gelu projector trains.
  * LLM: transformers LlamaForCausalLM at SmolLM2-135M shape (hidden 576,
    30 layers, 9 heads / 3 KV heads, FFN 1536, vocab 49152, RoPE base 1e5,
    RMSNorm eps 1e-5, tied embeddings), RANDOM weights (nothing is
    downloaded; timing does not depend on the values), float32, CPU,
    requires_grad False everywhere, eval mode.
  * projector: Linear(d_v -> 576), GELU, Linear(576 -> 576), trainable.
  * batch: per sample, V visual tokens (random features of dim d_v) then a
    caption of random ids; captions have unequal lengths (see
    caption_lengths) and are right-padded to --caption-tokens, as LLaVA
    pads. labels = -100 on visual and padding positions.
  * loss = model(inputs_embeds, attention_mask, labels).loss; backward;
    AdamW(lr 1e-3).step(); zero_grad().

Timing: --warmup steps untimed, then --steps steps, each split with
time.perf_counter into forward (projector + embedding + LLM forward + loss),
backward, and optimizer (step + zero_grad). Human-readable lines first; the
LAST line is one JSON object for the Rust bench to parse.

Shapes are flags (--batch, --visual-tokens, --visual-dim, --caption-tokens,
--layers) so the Rust bench can run identical ones. Caption lengths are
deterministic: sample i has caption_tokens - (i * caption_tokens) // (2 *
batch) real tokens (16, 15, ..., 9 for the defaults).

Not modelled: LLaVA's gradient checkpointing and bf16/flash-attention (GPU
features); on CPU in f32 eager mode this is the configuration a user would
get.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import transformers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

IGNORE_INDEX = -100  # LLaVA's IGNORE_INDEX; also HF's CrossEntropyLoss default


def caption_lengths(batch, caption_tokens):
    return [max(1, caption_tokens - (i * caption_tokens) // (2 * batch)) for i in range(batch)]


def build_llm(layers, attn_implementation):
    cfg = dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        hidden_act="silu",
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    # transformers 5 moved rope_theta into rope_parameters; 4.x takes rope_theta.
    if int(transformers.__version__.split(".")[0]) >= 5:
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 100000.0}
    else:
        cfg["rope_theta"] = 100000.0
    config = LlamaConfig(**cfg)
    config._attn_implementation = attn_implementation
    model = LlamaForCausalLM(config).to(torch.float32)
    model.requires_grad_(False)
    model.eval()
    return model


def main():
    ap = argparse.ArgumentParser(description="PyTorch LLaVA stage-1 alignment step benchmark (CPU, f32)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--visual-tokens", type=int, default=16)
    ap.add_argument("--visual-dim", type=int, default=1280)
    ap.add_argument("--caption-tokens", type=int, default=16, help="longest caption = padded caption length")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="HF attention implementation")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    hidden = 576
    vocab = 49152

    t_build = time.perf_counter()
    llm = build_llm(args.layers, args.attn)
    projector = nn.Sequential(
        nn.Linear(args.visual_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden)
    ).to(torch.float32)
    # LLaVA's pretrain recipe runs AdamW with weight_decay 0.
    optimizer = torch.optim.AdamW(projector.parameters(), lr=args.lr, weight_decay=0.0)
    build_s = time.perf_counter() - t_build

    B, V, T = args.batch, args.visual_tokens, args.caption_tokens
    lengths = caption_lengths(B, T)
    features = torch.randn(B, V, args.visual_dim)
    caption_ids = torch.randint(17, vocab, (B, T))  # skip the 17 control tokens
    attention_mask = torch.ones(B, V + T, dtype=torch.long)
    labels = torch.full((B, V + T), IGNORE_INDEX, dtype=torch.long)
    for i, n in enumerate(lengths):
        caption_ids[i, n:] = llm.config.pad_token_id
        attention_mask[i, V + n :] = 0
        labels[i, V : V + n] = caption_ids[i, :n]
    embed = llm.get_input_embeddings()

    def step():
        t0 = time.perf_counter()
        visual = projector(features)
        with torch.no_grad():  # frozen table; no graph needed for caption embeddings
            text = embed(caption_ids)
        inputs_embeds = torch.cat([visual, text], dim=1)
        loss = llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return loss.item(), t1 - t0, t2 - t1, t3 - t2, t3 - t0

    # The projector must actually receive gradients (a silent no-grad bug would
    # make the step look cheap).
    visual = projector(features)
    with torch.no_grad():
        text = embed(caption_ids)
    loss = llm(inputs_embeds=torch.cat([visual, text], 1), attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    grad_norms = [p.grad.norm().item() for p in projector.parameters()]
    assert all(g > 0 for g in grad_norms), grad_norms
    assert all(p.grad is None for p in llm.parameters())
    optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    runs = [step() for _ in range(args.steps)]
    losses = [r[0] for r in runs]
    fwd = [r[1] for r in runs]
    bwd = [r[2] for r in runs]
    opt = [r[3] for r in runs]
    total = [r[4] for r in runs]

    n_llm = sum(p.numel() for p in llm.parameters())
    n_proj = sum(p.numel() for p in projector.parameters())
    print(f"torch {torch.__version__}  transformers {transformers.__version__}  threads {torch.get_num_threads()}  attn {args.attn}")
    print(f"llm params {n_llm / 1e6:.1f}M frozen, projector params {n_proj / 1e6:.3f}M trainable, build {build_s:.1f}s")
    print(f"batch {B}  visual {V}x{args.visual_dim}  caption lengths {lengths} (padded to {T})  seq {V + T}")
    print(f"loss first {losses[0]:.4f} last {losses[-1]:.4f}")
    print(f"step     median {statistics.median(total):.4f}s  min {min(total):.4f}s  over {len(total)} steps")
    print(f"forward  median {statistics.median(fwd):.4f}s")
    print(f"backward median {statistics.median(bwd):.4f}s")
    print(f"optim    median {statistics.median(opt):.5f}s")
    sys.stdout.flush()
    print(
        json.dumps(
            {
                "stack": "pytorch",
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "threads": torch.get_num_threads(),
                "attn": args.attn,
                "batch": B,
                "visual_tokens": V,
                "visual_dim": args.visual_dim,
                "caption_tokens": T,
                "caption_lengths": lengths,
                "layers": args.layers,
                "steps": args.steps,
                "median_s": round(statistics.median(total), 5),
                "min_s": round(min(total), 5),
                "forward_median_s": round(statistics.median(fwd), 5),
                "backward_median_s": round(statistics.median(bwd), 5),
                "optimizer_median_s": round(statistics.median(opt), 6),
                "step_s": [round(t, 4) for t in total],
                "loss_first": round(losses[0], 5),
                "loss_last": round(losses[-1], 5),
            }
        )
    )


if __name__ == "__main__":
    main()
