"""Windows and masks exactly as docs/design.md §2 and §4 define them, for a
batch and for one stream fed piece by piece (§5)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from casa.core.layout import (
    History,
    StreamWindows,
    build_layout,
    build_splice,
    cached_mask,
)


def test_windows_follow_insertion_points_and_documents():
    # row 0: two documents (5 + 7); images at 2, 2 (shared window) and 6 (second document)
    # row 1: one document, one image at 4
    lay = build_layout(12, [[5, 7], [12]], torch.tensor([0, 0, 0, 1]), torch.tensor([2, 2, 6, 4]), 3)
    w = lay.text_window.tolist()
    assert w[0] == [0, 0, 1, 1, 1, 2, 3, 3, 3, 3, 3, 3]  # text-only, image window, new doc, image window
    assert w[1] == [4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5]
    assert lay.image_window.tolist() == [1, 1, 3, 5]  # consecutive images share a window
    assert lay.text_pos[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]  # positions restart per document
    assert lay.image_pos.tolist() == [2, 2, 1, 4]  # an image takes its insertion point's position
    assert lay.n_windows == 6


def test_image_at_document_start_opens_no_extra_window():
    lay = build_layout(6, [[3, 3]], torch.tensor([0, 0]), torch.tensor([0, 3]), 1)
    assert lay.text_window.tolist() == [[0, 0, 0, 1, 1, 1]]
    assert lay.image_window.tolist() == [0, 1]


@st.composite
def layouts(draw, max_rows=2, max_len=16, max_images=5, min_len=1):
    B = draw(st.integers(1, max_rows))
    T = draw(st.integers(min_len, max_len))
    doc_lens = []
    for _ in range(B):
        cuts = sorted(draw(st.sets(st.integers(1, T - 1), max_size=3))) if T > 1 else []
        bounds = [0, *cuts, T]
        doc_lens.append([b - a for a, b in zip(bounds, bounds[1:])])
    n_img = draw(st.integers(0, max_images))
    pairs = sorted(draw(st.lists(st.tuples(st.integers(0, B - 1), st.integers(0, T - 1)),
                                 min_size=n_img, max_size=n_img)))
    rows = torch.tensor([r for r, _ in pairs], dtype=torch.long)
    points = torch.tensor([p for _, p in pairs], dtype=torch.long)
    # one token count for every image, or each its own (images of different sizes)
    n = draw(st.one_of(st.integers(1, 3), st.lists(st.integers(1, 3), min_size=n_img, max_size=n_img)
                       .map(lambda c: torch.tensor(c, dtype=torch.long))))
    return T, doc_lens, rows, points, n


def counts(points, n) -> list[int]:
    """Tokens of each image: `n` is one count for all, or a per-image tensor."""
    return n.tolist() if isinstance(n, torch.Tensor) else [n] * len(points)


def n_tokens(points, n) -> int:
    """N_tok, the image tokens of a layout."""
    return sum(counts(points, n))


def brute_force_mask(T, doc_lens, rows, points, n, text_keys):
    """docs/design.md §4 spelled out: per row, keys = [row's image tokens ; text]."""
    B = len(doc_lens)
    sizes = counts(points, n)
    masks = []
    for b in range(B):
        doc = [d for d, length in enumerate(doc_lens[b]) for _ in range(length)]
        starts = {sum(doc_lens[b][:d]) for d in range(len(doc_lens[b]))}
        img_points = [int(p) for r, p in zip(rows.tolist(), points.tolist()) if r == b]
        img_sizes = [c for r, c in zip(rows.tolist(), sizes) if r == b]
        offsets = [sum(img_sizes[:i]) for i in range(len(img_sizes))]
        bounds = sorted(starts | set(img_points))

        def window(t):
            return max(s for s in bounds if s <= t)

        K = max([sum(c for r, c in zip(rows.tolist(), sizes) if r == bb) for bb in range(B)] + [0])
        m = torch.zeros(T, K + (T if text_keys else 0), dtype=torch.bool)
        for q in range(T):
            for i, p in enumerate(img_points):  # an image belongs to the window of its insertion point
                if window(p) == window(q) and doc[p] == doc[q]:
                    m[q, offsets[i]:offsets[i] + img_sizes[i]] = True
            if text_keys:
                for k in range(q + 1):
                    m[q, K + k] = window(k) == window(q) and doc[k] == doc[q]
        masks.append(m)
    return torch.stack(masks)[:, None]


@settings(max_examples=60, deadline=None)
@given(layouts(), st.booleans())
def test_dense_mask_matches_the_rule(spec, text_keys):
    T, doc_lens, rows, points, n = spec
    lay = build_layout(T, doc_lens, rows, points, n)
    assert torch.equal(lay.dense_mask(text_keys), brute_force_mask(T, doc_lens, rows, points, n, text_keys))


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_folded_windows_cover_every_token_once(spec):
    T, doc_lens, rows, points, n = spec
    lay = build_layout(T, doc_lens, rows, points, n)
    fw = lay.folded()
    covered = fw.text_index[fw.text_valid].sort().values
    assert torch.equal(covered, torch.arange(len(doc_lens) * T))
    assert torch.equal(lay.text_window.flatten()[fw.text_index[fw.text_valid]],
                       torch.arange(fw.text_index.shape[0]).repeat_interleave(fw.text_valid.sum(1)))
    img = fw.image_index[fw.image_valid].sort().values
    assert torch.equal(img, torch.arange(n_tokens(points, n)))


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_splice_places_images_before_their_insertion_point(spec):
    T, doc_lens, rows, points, n = spec
    sp = build_splice(T, doc_lens, rows, points, n)
    for b in range(len(doc_lens)):
        sel = sp.image_row == b
        used = torch.cat([sp.text_index[b], sp.image_index[sel]])
        assert torch.equal(used.sort().values, torch.arange(T + int(sel.sum())))  # no gap, no overlap
        assert bool((sp.text_index[b][1:] > sp.text_index[b][:-1]).all())  # text keeps its order
    pts = points.repeat_interleave(n)
    if len(pts):
        # each image token sits after the text before its insertion point and before the token at it
        assert bool((sp.image_index < sp.text_index[sp.image_row, pts]).all())
        prev = (pts - 1).clamp(min=0)
        ok = (pts == 0) | (sp.image_index > sp.text_index[sp.image_row, prev])
        assert bool(ok.all())
    # spliced documents: each text token keeps its document
    for b in range(len(doc_lens)):
        doc = torch.tensor([d for d, length in enumerate(doc_lens[b]) for _ in range(length)])
        spliced_doc = sp.layout.text_doc[b, sp.text_index[b]]
        assert torch.equal(spliced_doc - spliced_doc[0], doc)


@st.composite
def streams(draw, max_len=16, max_images=5):
    """One document of T text tokens, sorted insertion points, and a split of
    the text into chunks (how a stream receives it)."""
    T = draw(st.integers(1, max_len))
    points = sorted(draw(st.lists(st.integers(0, T - 1), max_size=max_images)))
    cuts = sorted(draw(st.sets(st.integers(1, T - 1), max_size=4))) if T > 1 else []
    return T, points, [b - a for a, b in zip([0, *cuts], [*cuts, T])]


def feed(T, points, chunks):
    """Drive a `StreamWindows` as a session does: images before the text token
    they precede, text in `chunks` (cut again at insertion points). Returns the
    window of each text token and of each image."""
    sw, text_window, image_window, img = StreamWindows(), [], [], 0
    for size in chunks:
        end = sw.text_tokens + size
        while sw.text_tokens < end:
            while img < len(points) and points[img] == sw.text_tokens:
                sw.add_images()
                image_window.append(sw.window)
                img += 1
            nxt = [p for p in points[img:] if p > sw.text_tokens]
            step = min(end, nxt[0] if nxt else end) - sw.text_tokens
            text_window += [sw.window] * step
            sw.add_text(step)
    return text_window, image_window


@settings(max_examples=80, deadline=None)
@given(streams())
def test_a_stream_fed_piece_by_piece_gets_the_batch_windows(spec):
    T, points, chunks = spec
    lay = build_layout(T, [[T]], torch.zeros(len(points), dtype=torch.long), torch.tensor(points, dtype=torch.long), 1)
    text_window, image_window = feed(T, points, chunks)
    assert text_window == lay.text_window[0].tolist()
    assert image_window == lay.image_window.tolist()


def test_stream_windows_examples():
    # an image at the start opens no window; two images with no text between share one
    assert feed(6, [0, 3, 3], [6]) == ([0, 0, 0, 1, 1, 1], [0, 1, 1])
    assert feed(4, [2], [1, 1, 2]) == ([0, 0, 1, 1], [1])


@settings(max_examples=80, deadline=None)
@given(streams(), st.integers(1, 3))
def test_cached_mask_is_the_dense_mask_of_the_window(spec, n):
    """The mask of a window's queries, chunk by chunk, against [its image tokens ;
    its text so far] equals the window's block of the batch's dense mask."""
    T, points, chunks = spec
    points = points or [0]
    lay = build_layout(T, [[T]], torch.zeros(len(points), dtype=torch.long), torch.tensor(points, dtype=torch.long), n)
    dense = lay.dense_mask(text_keys=True)[0, 0]  # [T, K + T]
    K = len(points) * n
    start = points[-1]  # the last window: its images, then its text
    n_prefix = sum(p == start for p in points) * n
    image_cols = list(range(K - n_prefix, K))
    t = start
    for size in chunks:
        end = min(T, t + size)
        if end <= t:
            continue
        q = torch.arange(t - start, end - start)
        got = cached_mask(q, torch.arange(end - start), n_prefix=n_prefix, history=None)
        want = dense[t:end][:, image_cols + list(range(K + start, K + end))]
        assert torch.equal(got, want)
        assert not dense[t:end, K + end:].any()  # no later key is visible anyway
        t = end


def test_history_sees_the_sink_and_the_window():
    h = History(sink=2, window=3)
    q = torch.tensor(9)
    assert h.sees(torch.arange(10), q).tolist() == [True, True] + [False] * 5 + [True] * 3
    mask = cached_mask(torch.tensor([8, 9]), torch.arange(10), n_prefix=1, history=h)
    assert mask.tolist() == [[True, True, True] + [False] * 4 + [True] * 3 + [False],
                             [True, True, True] + [False] * 5 + [True] * 3]
