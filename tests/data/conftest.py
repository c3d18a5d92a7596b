"""Helpers shared by the data tests."""
import pytest

from pretrain.data.tokenizer import SPECIAL_IDS


def _unpack(sequences, eos=SPECIAL_IDS["eos"]):
    """Undo packing: the token lists of the documents in (input_ids, doc_ids) sequences, eos removed."""
    documents, current = [], []
    for tokens, docs in sequences:
        for token, doc in zip(tokens.tolist(), docs.tolist()):
            if doc < 0:
                continue
            if token == eos:
                documents.append(current)
                current = []
            else:
                current.append(token)
    return documents


@pytest.fixture(scope="session")
def unpack():
    return _unpack
