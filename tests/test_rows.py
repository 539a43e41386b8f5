"""Batched decode of several streams (`inference.rows`): one batched step gives,
row by row, the logits of each stream's own `Session`, for every variant and
placement, with rows of different lengths, image counts and window layouts."""

import pytest
import torch
from test_cache import model_for

from casa.config import FUSION_VARIANTS, PLACEMENTS
from casa.inference.cache import KVCache
from casa.inference.rows import RowCache, RowDecoder
from casa.inference.session import Session

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = [(v, p) for v in FUSION_VARIANTS for p in PLACEMENTS if v != "insertion" or p == "parallel"]
N_TOK = 4  # tokens per image in the tiny config
# per row: (text length, insertion points); the last row has no image at all (a `ca`
# window without keys), the second text before its first image and two windows
ROWS = [(5, [0]), (11, [3, 3, 8]), (2, [])]


def prefilled(model, seed):
    g = torch.Generator().manual_seed(seed)
    sessions = []
    for n, points in ROWS:
        ids = torch.randint(0, 61, (n,), generator=g)
        s, fed = Session(model), 0
        for p in points:
            if p > fed:
                s.forward_text(ids[fed:p])
                fed = p
            s.add_image_embeds(torch.randn(1, N_TOK, 32, generator=g))
        s.forward_text(ids[fed:])
        sessions.append(s)
    return sessions


@pytest.mark.parametrize("variant,placement", VARIANTS)
def test_row_decoder_step_equals_each_session(variant, placement):
    model = model_for(variant, placement)
    sessions = prefilled(model, 0)
    decoder = RowDecoder(sessions, max_new_tokens=3)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids = torch.randint(0, 61, (len(ROWS),), generator=g)
        batched = decoder.step(ids)
        alone = torch.stack([s.forward_text([int(t)])[0] for s, t in zip(sessions, ids)])
        assert batched.shape == (len(ROWS), 61)
        torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)  # fp32: summation order only


def test_row_cache_pads_and_masks():
    a, b, empty = KVCache(), KVCache(), KVCache()
    a.add_prefix(torch.ones(1, 2, 1, 3), torch.ones(1, 2, 1, 3))  # 2 entries
    b.add_prefix(torch.full((1, 3, 1, 3), 2.0), torch.full((1, 3, 1, 3), 2.0))  # 3 entries
    rows = RowCache([a, b, empty], room=1, n_kv_heads=1, head_dim=3, dtype=torch.float32, device="cpu")
    keys, values, mask = rows.prefix_keys()
    assert keys.shape == (3, 1, 3, 3)
    # padding hidden; the row without entries sees one zero key/value (a zero update)
    assert mask[:, 0, 0].tolist() == [[True, True, False], [True, True, True], [True, False, False]]
    assert keys[2].abs().sum() == 0 and values[:, 0, :, 0].tolist() == [[1, 1, 0], [2, 2, 2], [0, 0, 0]]
    keys, values, mask = rows.extend(torch.full((3, 1, 1, 3), 5.0), torch.full((3, 1, 1, 3), 5.0))
    assert values[:, 0, :, 0].tolist() == [[1, 1, 5, 0], [2, 2, 2, 5], [5, 0, 0, 0]]
    assert mask[:, 0, 0].sum(-1).tolist() == [3, 4, 1]
    with pytest.raises(RuntimeError, match="room"):
        rows.extend(torch.zeros(3, 1, 1, 3), torch.zeros(3, 1, 1, 3))
    with pytest.raises(ValueError, match="int8 caches are not supported"):  # its new rows would skip quantizing
        RowCache([a, KVCache(quantized=True)], room=1, n_kv_heads=1, head_dim=3, dtype=torch.float32, device="cpu")
