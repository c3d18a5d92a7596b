"""A readable sample of the predictions: input, targets and decoded predictions side by side.

Masked objective: the target and prediction lines are the original text with each predicted
position in brackets, so a reader sees at a glance which pieces the model got right:

    input     : the cat [MASK] on the mat
    target    : the cat [sat] on the mat
    predicted : the cat [was] on the mat

Causal objective: every position predicts the next piece, so the lines are the teacher-forced
continuation (targets) and the model's guesses for it, decoded as running text.
"""
from __future__ import annotations

import sentencepiece as spm
import torch

from pretrain.model.objectives import DEFAULT_SPECIAL_IDS, IGNORE_INDEX

WORD_START = "\u2581"  # SentencePiece's visible space
DOC_BREAK = " \u00b6 "  # eos between packed documents
MASK_TEXT = "[MASK]"


def _segments_to_text(sp: spm.SentencePieceProcessor, ids: list[int], bracketed: list[bool], special_ids: dict) -> str:
    """Decode ``ids``; positions flagged in ``bracketed`` come out alone, in brackets."""
    out: list[str] = []
    run: list[int] = []

    def needs_space() -> bool:
        return bool(out) and not out[-1].endswith(" ")

    def flush() -> None:
        if run:
            text = sp.decode(run)
            # decode() drops the leading space of a run's first piece; keep it between runs.
            if needs_space() and sp.id_to_piece(run[0]).startswith(WORD_START) and not text.startswith(" "):
                text = " " + text
            out.append(text)
            run.clear()

    for token, in_brackets in zip(ids, bracketed):
        if in_brackets:
            # A prediction may be any id, special ones included: show what it is, never an empty [].
            flush()
            piece = sp.id_to_piece(token)
            text = piece if sp.is_control(token) else sp.decode([token]).strip() or piece.replace(WORD_START, " ")
            lead = " " if piece.startswith(WORD_START) and needs_space() else ""
            out.append(f"{lead}[{text}]")
        elif token in (special_ids["pad"], special_ids["bos"]):
            continue
        elif token == special_ids["eos"]:
            flush()
            out.append(DOC_BREAK)
        elif token == special_ids["mask"]:
            flush()
            out.append(" " + MASK_TEXT)
        else:
            run.append(token)
    flush()
    return "".join(out).strip()


def side_by_side(
    sp: spm.SentencePieceProcessor,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    predicted_ids: torch.Tensor,
    *,
    objective: str,
    special_ids: dict | None = None,
) -> dict:
    """One sequence as {"input", "target", "predicted", "correct", "predicted_positions"}.

    ``input_ids`` is what the model saw (corrupted for the masked objective), ``labels`` holds the
    target id or IGNORE_INDEX per position, ``predicted_ids`` the decoded top-1 id per position
    (read only where a label is set). All are 1-D of the same length.
    """
    special_ids = {**DEFAULT_SPECIAL_IDS, **(special_ids or {})}
    inputs, labels, predicted = input_ids.tolist(), labels.tolist(), predicted_ids.tolist()
    if not len(inputs) == len(labels) == len(predicted):
        raise ValueError(f"sequence lengths differ: input {len(inputs)}, labels {len(labels)}, predictions {len(predicted)}")
    scored = [label != IGNORE_INDEX for label in labels]
    correct = sum(1 for s, label, guess in zip(scored, labels, predicted) if s and label == guess)
    row = {"input": _segments_to_text(sp, inputs, [False] * len(inputs), special_ids)}
    if objective == "masked":
        original = [label if s else token for s, label, token in zip(scored, labels, inputs)]
        guessed = [guess if s else token for s, guess, token in zip(scored, predicted, inputs)]
        row["target"] = _segments_to_text(sp, original, scored, special_ids)
        row["predicted"] = _segments_to_text(sp, guessed, scored, special_ids)
    else:
        row["target"] = _segments_to_text(sp, [l for l, s in zip(labels, scored) if s], [False] * sum(scored), special_ids)
        row["predicted"] = _segments_to_text(sp, [p for p, s in zip(predicted, scored) if s], [False] * sum(scored), special_ids)
    row["correct"] = correct
    row["predicted_positions"] = sum(scored)
    return row


def format_samples(rows: list[dict]) -> str:
    """Plain-text block for the terminal and eval/samples.txt."""
    blocks = []
    for number, row in enumerate(rows, 1):
        blocks.append(
            f"--- sample {number}: {row['correct']}/{row['predicted_positions']} predicted pieces correct\n"
            f"input     : {row['input']}\n"
            f"target    : {row['target']}\n"
            f"predicted : {row['predicted']}"
        )
    return "\n".join(blocks)
