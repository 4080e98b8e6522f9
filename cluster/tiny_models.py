"""Tiny real models, built on the fly: one character-level tokenizer (with a chat
template) shared by a teacher and a smaller student (Qwen2 architecture).

Used by the tests, the demo config (`student.model: tiny:student`) and the
benchmarks. Nothing is downloaded: the tokenizer is made with the `tokenizers`
library, the models from a transformers config with weights drawn from a seeded
generator, and both are saved with `save_pretrained` so vLLM and transformers
load them like any Hugging Face checkpoint.

Builds are deterministic by (spec, seed) and cached under
`$OPD_CACHE_DIR` (default `~/.cache/opd`) in a directory named by a hash of the
spec, written atomically (build in a temp dir, then rename), so concurrent test
workers or a crashed build never leave a half-written model behind.

    python -m cluster.tiny_models            # build both and print their paths
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

# Special tokens, Qwen-style chat markup. `<|endoftext|>` doubles as pad.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# 3 special tokens + 256 byte tokens, padded to a multiple of 64.
VOCAB_SIZE = 320
# Qwen2's pre-tokenizer split (digits are split one by one).
QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """Architecture of one tiny Qwen2 model. head_dim = hidden_size / heads must
    be one vLLM's CPU attention kernels support (32, 64, 80, 96, 128, ...)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = False
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# The student is smaller than the teacher, as in distillation.
SPECS: dict[str, TinySpec] = {
    "student": TinySpec(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=256, seed=1),
    "teacher": TinySpec(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512, seed=2),
    # Student of the recipes' demo (recipes/sft.py): as deep as the teacher,
    # half as wide (about 0.6M vs 2.5M parameters); the 2-layer `student`
    # plateaus near 10% held-out accuracy on 2-digit addition. head_dim 32.
    "student-4l": TinySpec(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=256, seed=5),
    # Weaker students tried for the carry recipe (recipes/carry_sft.py), whose
    # SFT curves should flatten below the teacher's accuracy (none does on
    # that task: recipes/README.md). head_dim 32.
    "student-1l": TinySpec(hidden_size=128, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=256, seed=6),
    "student-64": TinySpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128, seed=7),
    "student-1l-64": TinySpec(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=128, seed=8),
    "student-1l-32": TinySpec(hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1, intermediate_size=64, seed=9),
    # Larger pair for benchmarks (about 25M and 100M parameters).
    "student-25m": TinySpec(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1536, seed=3),
    "teacher-100m": TinySpec(hidden_size=768, num_layers=14, num_heads=12, num_kv_heads=4, intermediate_size=2816, seed=4),
}

TINY_PREFIX = "tiny:"


def cache_dir() -> Path:
    return Path(os.environ.get("OPD_CACHE_DIR", Path.home() / ".cache" / "opd"))


def _byte_alphabet() -> list[str]:
    """GPT-2/Qwen byte-to-unicode alphabet: one printable symbol per byte."""
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def build_tokenizer():
    """A byte-level BPE tokenizer with no merges (every byte is one token: for
    ASCII text that is one token per character) and Qwen's chat markup.

    It is built with exactly the pipeline of Qwen2's tokenizer (Qwen's split
    regex, then ByteLevel), because transformers 5 loads any tokenizer saved
    next to a Qwen2 config.json as `Qwen2Tokenizer`, which installs that
    pipeline whatever tokenizer.json says: built this way, what we save is what
    transformers and vLLM load."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + _byte_alphabet())}
    # Unused slots up to VOCAB_SIZE get placeholder tokens so ids are dense.
    for i in range(len(vocab), VOCAB_SIZE):
        vocab[f"<|unused{i}|>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(out_dir: str | os.PathLike) -> None:
    """Save the tokenizer so that AutoTokenizer (transformers and vLLM) loads
    it as is. Without the explicit `tokenizer_class`, AutoTokenizer picks the
    architecture's own tokenizer class (Qwen2Tokenizer) from config.json and
    silently replaces our pre-tokenizer with Qwen's byte-level one."""
    build_tokenizer().save_pretrained(out_dir)
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))


def _spec_hash(name: str, spec: TinySpec) -> str:
    payload = json.dumps({"name": name, "spec": dataclasses.asdict(spec), "vocab": VOCAB_SIZE,
                          "template": CHAT_TEMPLATE, "v": 3}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def build_model(name: str, out_dir: str | os.PathLike | None = None) -> Path:
    """Build (or reuse from the cache) tiny model `name` and return its directory.

    With `out_dir`, writes there instead of the cache (overwriting nothing: the
    directory must not exist)."""
    if name not in SPECS:
        raise ValueError(f"unknown tiny model {name!r}: valid names are {sorted(SPECS)}")
    spec = SPECS[name]
    final = Path(out_dir) if out_dir is not None else cache_dir() / "tiny" / f"{name}-{_spec_hash(name, spec)}"
    if (final / "config.json").exists() and (final / "model.safetensors").exists():
        return final
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    def write(tmp: Path) -> None:
        cfg = Qwen2Config(
            vocab_size=VOCAB_SIZE,
            hidden_size=spec.hidden_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads,
            intermediate_size=spec.intermediate_size,
            max_position_embeddings=spec.max_position_embeddings,
            tie_word_embeddings=spec.tie_word_embeddings,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            dtype="float32",
        )
        # Seeded and independent of any global RNG state the caller has.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
            # Larger init than the default 0.02 so the random models have
            # distinct, peaked distributions (a teacher/student KL well above 0).
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() >= 2:
                        p.normal_(0.0, 0.08)
        model.generation_config.eos_token_id = 2
        model.generation_config.pad_token_id = 0
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tmp)

    return publish_dir(final, write, done_marker="model.safetensors")


def publish_dir(final: Path, write, done_marker: str, replace: bool = False) -> Path:
    """Build a cache directory atomically: `write(tmp)` fills a temporary
    sibling, which is then renamed to `final`, so a crash never leaves a
    half-written `final`. If another process published `final` first (its
    `done_marker` file exists), its copy is kept and ours dropped. With
    `replace`, an existing `final` is replaced."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        write(tmp)
        if replace and final.exists():
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / done_marker).exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def resolve_model(ref: str) -> str:
    """`tiny:NAME` -> a built local directory; anything else is returned as is.
    (For tests and benchmarks; the driver resolves every form, hub ids
    included, with cluster/models.py: resolve_model.)"""
    if ref.startswith(TINY_PREFIX):
        return str(build_model(ref[len(TINY_PREFIX):]))
    return ref


if __name__ == "__main__":
    for n in ("student", "teacher"):
        print(n, build_model(n))
