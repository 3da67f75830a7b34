"""Build small random-weight Llama models (plus a BPE tokenizer) locally, with no model hub.

``kvtier model build --shape tiny|small|smollm2 [--out DIR]`` (:mod:`kvtier.cli.model`) prints
the model directory (``smollm2``: a real pretrained model, :mod:`kvtier.testing.smollm2`).
Builds are deterministic (same shape + seed -> same bytes), cached on disk and written
atomically, so tests, demos and benchmarks can all call :func:`build_model` cheaply.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

# Bump when anything that changes the built bytes changes (corpus, tokenizer, init).
BUILD_VERSION = 1
MARKER = "kvtier_build.json"
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
# Fixed seed for the tokenizer corpus: the tokenizer is shared by every weight seed, so
# documents made by make_document() mean the same token ids for all models of a version.
_CORPUS_SEED = 20240601
_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                  "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


@dataclass(frozen=True)
class ModelShape:
    """Architecture of a built Llama model."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    max_positions: int
    vocab: int = 4096  # target size of the trained tokenizer (specials included)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token over all layers in bf16."""
        return 2 * self.layers * self.kv_heads * self.head_dim * 2


SHAPES: dict[str, ModelShape] = {
    # Fast enough for unit tests; 2 KV heads x 64 like the small one.
    "tiny": ModelShape(layers=4, hidden=256, heads=4, kv_heads=2, head_dim=64,
                       intermediate=512, max_positions=16384),
    # KV per token like Qwen2.5-0.5B (24 layers x 2 KV heads x 64 = 12 KiB/token in bf16),
    # but a narrow MLP so prefill stays tolerable on CPU.
    "small": ModelShape(layers=24, hidden=896, heads=14, kv_heads=2, head_dim=64,
                        intermediate=1024, max_positions=32768),
    # Few layers, wide KV heads (4 x 128): another page shape for the serving matrix.
    "wide": ModelShape(layers=6, hidden=1024, heads=8, kv_heads=4, head_dim=128,
                       intermediate=2048, max_positions=16384),
    # The tiny model with room for 128k-token contexts (the long-context cost curve).
    "tiny-long": ModelShape(layers=4, hidden=256, heads=4, kv_heads=2, head_dim=64,
                            intermediate=512, max_positions=131072 + 1024),
}
# Real pretrained models, converted rather than built (see kvtier.testing.smollm2).
PRETRAINED = ("smollm2",)
ALL_SHAPES = sorted([*SHAPES, *PRETRAINED])

_FUNCTION_WORDS = ("the of and to in is that it for as with was on be by at this from or an "
                   "are not but which have has had were their they we you he she his her its "
                   "all one can will would there more if no so what when up out about into").split()
_ONSETS = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
           "z", "br", "ch", "cl", "dr", "gr", "pl", "sh", "st", "th", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io"]
_CODAS = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "x"]


def _lexicon() -> tuple[list[str], list[float]]:
    """Fixed word list (function words + seeded pseudo-words) with Zipf cumulative weights."""
    rng = random.Random(_CORPUS_SEED)
    words = list(_FUNCTION_WORDS)
    seen = set(words)
    while len(words) < 3000:
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                    for _ in range(rng.choice((1, 1, 2, 2, 3, 4))))
        if w not in seen:
            seen.add(w)
            words.append(w)
    cum, total = [], 0.0
    for rank in range(len(words)):
        total += 1.0 / (rank + 1)
        cum.append(total)
    return words, cum


def _text(rng: random.Random, num_words: int) -> str:
    """Pseudo-English prose: capitalised sentences, commas, numbers, paragraph breaks."""
    words, cum = _lexicon()
    out: list[str] = []
    sentence: list[str] = []
    for w in rng.choices(words, cum_weights=cum, k=num_words):
        if rng.random() < 0.02:
            w = str(rng.randrange(10_000))
        sentence.append(w)
        if rng.random() < 0.08:
            sentence[-1] += ","
        if len(sentence) >= 6 and rng.random() < 0.12:
            out.append(" ".join(sentence).capitalize() + rng.choice(".....?!"))
            out.append("\n\n" if rng.random() < 0.15 else " ")
            sentence = []
    out.append(" ".join(sentence))
    return "".join(out)


def _train_tokenizer(vocab_size: int) -> Any:
    """Byte-level BPE trained on the fixed synthetic corpus (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=[BOS, EOS, PAD],  # ids 0, 1, 2
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(_CORPUS_SEED)
    tok.train_from_iterator((_text(rng, 2000) for _ in range(100)), trainer=trainer)
    # Prepend BOS like Llama tokenizers do, so text prompts in vLLM get one too.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)])
    return tok


def default_dir(shape: str, seed: int = 0) -> Path:
    """Cache directory of a build: ``$KVTIER_MODEL_DIR`` or ``~/.cache/kvtier/models``."""
    root = os.environ.get("KVTIER_MODEL_DIR") or Path.home() / ".cache" / "kvtier" / "models"
    return Path(root) / (f"{shape}-v{BUILD_VERSION}" if seed == 0
                         else f"{shape}-seed{seed}-v{BUILD_VERSION}")


def build_model(shape: str, out_dir: Path | None = None, seed: int = 0) -> Path:
    """Build (or reuse) a random-weight bf16 Llama model + tokenizer; return its directory.

    ``smollm2`` is the real pretrained model of :mod:`kvtier.testing.smollm2` instead
    (no seed). A directory holding a marker for the same shape/seed/version is returned
    at once; see :func:`cached_build`.
    """
    if shape in PRETRAINED:
        if seed != 0:
            raise ValueError(f"{shape} is a pretrained model: it has no seed (got --seed {seed})")
        from kvtier.testing.smollm2 import build_smollm2

        return build_smollm2(out_dir)
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {ALL_SHAPES}")
    out = Path(out_dir) if out_dir is not None else default_dir(shape, seed)
    want = {"shape": shape, "seed": seed, "version": BUILD_VERSION}
    return cached_build(out, want, lambda tmp: (_build_into(SHAPES[shape], tmp, seed),
                                                {"dims": asdict(SHAPES[shape])})[1])


def cached_build(out: Path, want: dict[str, Any], build: Callable[[Path], dict[str, Any]]) -> Path:
    """``out`` if it holds a marker matching ``want``; else ``build(tmp)`` then publish ``tmp``.

    ``build`` fills an empty temporary sibling directory and returns extra marker fields.
    The sibling is renamed into place, so a crash never leaves a half-written model behind.
    """
    marker = out / MARKER
    if marker.is_file():
        got = json.loads(marker.read_text())
        if {k: got.get(k) for k in want} == want:
            return out
        shutil.rmtree(out)  # ours (it has our marker), but another shape/seed/version
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists, is not empty and is not a kvtier model build")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        extra = build(tmp)
        (tmp / MARKER).write_text(json.dumps({**want, **extra}, indent=1))
        # mkdtemp makes the dir 0700 (and safetensors writes 0600); the cache may be shared.
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            out.rmdir()  # empty (checked above); not every OS renames over a directory
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / MARKER).is_file():  # not a concurrent builder winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _build_into(s: ModelShape, path: Path, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _train_tokenizer(s.vocab)
    tok.save(str(path / "tokenizer.json"))
    # Written by hand (not via save_pretrained) so the class name stays the portable
    # PreTrainedTokenizerFast; transformers 5 would write its own "TokenizersBackend".
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS,
                  "eos_token": EOS, "pad_token": PAD, "add_bos_token": True,
                  "model_max_length": s.max_positions, "chat_template": _CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=s.hidden, intermediate_size=s.intermediate,
        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
        head_dim=s.head_dim, max_position_embeddings=s.max_positions, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        # The default 0.02 gives nearly flat logits, so greedy decoding flips on bf16
        # rounding noise; large weights make the argmax robust and outputs comparable.
        initializer_range=0.6,
        # Untied: a tied random head mostly predicts the input token back.
        tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1, pad_token_id=2, dtype="bfloat16",
        architectures=["LlamaForCausalLM"])
    torch.manual_seed(seed)
    with torch.no_grad():
        model = LlamaForCausalLM(config).to(torch.bfloat16)  # init in fp32, then round
    model.save_pretrained(path, safe_serialization=True)


def make_document(tokenizer_or_model_dir: Any, num_tokens: int, seed: int) -> list[int]:
    """Exactly ``num_tokens`` token ids of deterministic pseudo-English text.

    ``tokenizer_or_model_dir`` is a model directory (its ``tokenizer.json`` is used), a
    ``tokenizers.Tokenizer`` or a transformers tokenizer. No special tokens (no BOS/EOS)
    are included; prepend BOS yourself if you want one.
    """
    tok = tokenizer_or_model_dir
    if isinstance(tok, (str, os.PathLike)):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(tok) / "tokenizer.json"))
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < num_tokens:
        # Chunks start after whitespace so concatenated encodings equal real text tokens.
        enc = tok.encode(_text(rng, 1000) + "\n\n", add_special_tokens=False)
        ids.extend(enc.ids if hasattr(enc, "ids") else enc)
    return ids[:num_tokens]


def build_lora(model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
               seed: int = 0, rank: int = 8, scale: float = 1.0) -> Path:
    """A random-weight LoRA adapter (PEFT layout) for a built model, on q_proj and v_proj.

    ``scale`` multiplies the random weights: large enough, the adapter changes
    greedy outputs, so a test can tell the adapter's KV from the base model's.
    """
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, head_dim = cfg["hidden_size"], cfg["head_dim"]
    outs = {"q_proj": cfg["num_attention_heads"] * head_dim,
            "v_proj": cfg["num_key_value_heads"] * head_dim}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for mod, out in outs.items():
            name = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
            tensors[f"{name}.lora_A.weight"] = (torch.randn(rank, hidden, generator=gen)
                                                * scale / hidden ** 0.5).to(torch.bfloat16)
            tensors[f"{name}.lora_B.weight"] = (torch.randn(out, rank, generator=gen)
                                                * scale).to(torch.bfloat16)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
        "lora_dropout": 0.0, "bias": "none", "target_modules": sorted(outs),
        "base_model_name_or_path": str(model_dir)}, indent=1))
    return out
