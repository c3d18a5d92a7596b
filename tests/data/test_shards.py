"""Writing shards: the fast tar writer against webdataset's."""
import io

import numpy as np
import pytest
import webdataset as wds

from pretrain.data.shards import TAR_MODE, TAR_MTIME, TAR_OWNER, SampleTarWriter, npy_bytes, sample_key


@pytest.mark.parametrize("samples", [1, 3, 37])
def test_sample_tar_writer_writes_webdatasets_bytes(samples):
    """The fast shard writer's tar is byte for byte what webdataset's TarWriter writes for the same samples."""
    rng = np.random.default_rng(samples)
    items = [{"__key__": sample_key(3, i), "input_ids.npy": npy_bytes(rng.integers(0, 999, 17 + i % 2)), "doc_ids.npy": npy_bytes(rng.integers(-1, 5, 17 + i % 2))} for i in range(samples)]
    ours, theirs = io.BytesIO(), io.BytesIO()
    fast, reference = SampleTarWriter(ours), wds.TarWriter(theirs, user=TAR_OWNER, group=TAR_OWNER, mode=TAR_MODE, mtime=TAR_MTIME, encoder=False)
    for item in items:
        fast.write(item)
        reference.write(item)
    fast.close()
    reference.close()
    assert ours.getvalue() == theirs.getvalue()
