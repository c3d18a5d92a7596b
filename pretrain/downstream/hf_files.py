"""The files that let Hugging Face tools load an export: transformers (AutoModel, AutoTokenizer) and
sentence-transformers. Written by `pretrain export` beside the export's own files; hashed like them.

    modeling_softmaxfree.py          the model classes (a copy of pretrain/downstream/hf_modeling.py)
    tokenizer.json                   fast tokenizer converted from tokenizer.model, written only if the
                                     conversion reproduces SentencePiece's ids exactly on the probe texts
    tokenizer_config.json            pad/eos/unk tokens, max length; every text ends with eos as in pretraining;
                                     without tokenizer.json it names modeling_softmaxfree.SoftmaxFreeTokenizer
                                     (SentencePiece behind the transformers API, trust_remote_code=True)
    modules.json, sentence_bert_config.json, 1_Pooling/config.json
                                     sentence-transformers: the model, then a mean over real tokens

Nothing here imports transformers: `load_encoder` and the export itself do not need it. The fast
tokenizer needs the `tokenizers` package (the `.[hf]` extra); without it the export says so and
falls back to the SentencePiece-backed tokenizer class.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

MODELING_FILE = "modeling_softmaxfree.py"
HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
ST_FILES = ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json")
_CLASSES = "modeling_softmaxfree.SoftmaxFree"
AUTO_MAP = {
    "AutoConfig": _CLASSES + "Config",
    "AutoModel": _CLASSES + "Model",
    "AutoModelForSequenceClassification": _CLASSES + "ForSequenceClassification",
}
# Texts the tokenizer conversion is checked on, besides every piece of the vocabulary: leading,
# repeated and trailing spaces, tabs, digits, accents, symbols and scripts the vocabulary may lack
# (byte fallback), and an empty string.
PROBE_TEXTS = [
    "", " ", "  two  spaces", " leading", "trailing ", "tab\tand\nnewline", "digits 12345 and 3.14",
    "ünïcödé, naïve café", "✓ → ∞ 漢字 😀", "A Capitalised Sentence: with (brackets) and 'quotes'.",
    "a small domesticated carnivore kept as a pet",
]


def hf_config(model_cfg: Mapping[str, Any], vocab_size: int, special_ids: Mapping[str, int]) -> dict[str, Any]:
    """The keys transformers reads from config.json (merged into the export's manifest)."""
    return {
        "model_type": "softmaxfree-encoder",
        "architectures": ["SoftmaxFreeModel"],
        "auto_map": AUTO_MAP,
        "vocab_size": int(vocab_size),
        "hidden_size": model_cfg["d_model"],
        "num_hidden_layers": model_cfg["n_layers"],
        "num_attention_heads": model_cfg["n_heads"],
        "intermediate_size": model_cfg["d_ff"],
        "max_position_embeddings": model_cfg["max_seq_len"],
        "is_causal": model_cfg["objective"] == "causal",
        "pad_token_id": special_ids["pad"],
        "bos_token_id": special_ids["bos"],
        "eos_token_id": special_ids["eos"],
    }


def fast_tokenizer(sp):
    """tokenizers.Tokenizer equivalent to the SentencePiece unigram model `sp` (identity normalisation,
    dummy prefix, whitespace splitting, single digits, byte fallback), ending every text with eos."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=True))
    # SentencePiece: prepend one "▁" (dummy prefix), spaces become "▁", pieces never span a "▁" boundary
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    eos = sp.id_to_piece(sp.eos_id())
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, sp.eos_id())])
    return tok


def conversion_mismatches(sp, tok, texts: list[str]) -> list[str]:
    """Texts on which the fast tokenizer's ids differ from SentencePiece's (eos left aside)."""
    return [t for t in texts if tok.encode(t, add_special_tokens=False).ids != sp.encode(t)]


def _probe_texts(sp) -> list[str]:
    # every normal piece's surface text, alone and glued to its neighbours
    pieces = [sp.id_to_piece(i).replace("▁", " ") for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))]
    return PROBE_TEXTS + pieces + ["".join(pieces[i : i + 7]) for i in range(0, len(pieces), 7)]


def _special_tokens(sp) -> dict[str, str]:
    return {"pad_token": sp.id_to_piece(sp.pad_id()), "eos_token": sp.id_to_piece(sp.eos_id()),
            "unk_token": sp.id_to_piece(sp.unk_id()), "bos_token": sp.id_to_piece(sp.bos_id()),
            "mask_token": "<mask>"}


def write_hf_files(out_dir: Path, sp, sp_model_type: str, model_cfg: Mapping[str, Any],
                   converted_in: Path | None = None) -> list[str]:
    """Write the Hugging Face files into out_dir; returns their names (relative paths) for hashing.

    converted_in: an export directory of the same SentencePiece model whose tokenizer.json (already
    converted and checked) is copied instead of converting again (fine-tuning saves do this)."""
    max_len = model_cfg["max_seq_len"]
    written = [MODELING_FILE]
    shutil.copyfile(Path(__file__).with_name("hf_modeling.py"), out_dir / MODELING_FILE)
    reusable = converted_in / HF_TOKENIZER_FILE if converted_in is not None else None
    reusable = reusable if reusable is not None and reusable.is_file() and reusable.resolve() != (out_dir / HF_TOKENIZER_FILE).resolve() else None
    for stale in (HF_TOKENIZER_FILE, HF_TOKENIZER_CONFIG_FILE, *ST_FILES):
        (out_dir / stale).unlink(missing_ok=True)
    tok, why_not = None, ""
    common = {"model_max_length": max_len, "padding_side": "right", "clean_up_tokenization_spaces": False, **_special_tokens(sp)}
    if reusable is not None:
        shutil.copyfile(reusable, out_dir / HF_TOKENIZER_FILE)
        (out_dir / HF_TOKENIZER_CONFIG_FILE).write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **common}, indent=2))
        return [*written, HF_TOKENIZER_FILE, HF_TOKENIZER_CONFIG_FILE, *write_sentence_transformers_files(out_dir, max_len, model_cfg["d_model"])]
    if sp_model_type != "unigram":
        why_not = f"the tokenizer is a SentencePiece {sp_model_type} model; only unigram converts exactly"
    else:
        try:
            tok = fast_tokenizer(sp)
        except ImportError:
            why_not = "the `tokenizers` package is not installed (pip install -e '.[hf]')"
    if tok is not None:
        bad = conversion_mismatches(sp, tok, _probe_texts(sp))
        if bad:
            tok, why_not = None, f"the converted tokenizer differs from SentencePiece on {len(bad)} probe texts, e.g. {bad[0]!r}"
    if tok is None:
        # SentencePiece itself behind the tokenizer API (modeling_softmaxfree.SoftmaxFreeTokenizer): exact by construction
        log.warning("no fast tokenizer in %s: %s; AutoTokenizer loads the SentencePiece model (trust_remote_code=True)", out_dir, why_not)
        tokenizer_config = {"tokenizer_class": "SoftmaxFreeTokenizer", "vocab_file": "tokenizer.model",
                            "auto_map": {"AutoTokenizer": [_CLASSES + "Tokenizer", None]}, **common}
    else:
        tok.save(str(out_dir / HF_TOKENIZER_FILE))
        written.append(HF_TOKENIZER_FILE)
        tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", **common}
    (out_dir / HF_TOKENIZER_CONFIG_FILE).write_text(json.dumps(tokenizer_config, indent=2))
    written.append(HF_TOKENIZER_CONFIG_FILE)
    return written + write_sentence_transformers_files(out_dir, max_len, model_cfg["d_model"])


def write_sentence_transformers_files(out_dir: Path, max_len: int, width: int) -> list[str]:
    """modules.json (model, then pooling) and the pooling config: mean over real tokens, as pretrain's embed."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (out_dir / "1_Pooling").mkdir(exist_ok=True)
    files = {
        "modules.json": modules,
        "sentence_bert_config.json": {"max_seq_length": max_len, "do_lower_case": False},
        "1_Pooling/config.json": {"word_embedding_dimension": width, "pooling_mode_mean_tokens": True},
    }
    for name, content in files.items():
        (out_dir / name).write_text(json.dumps(content, indent=2))
    return list(files)
