"""The text-encoder interface (with a stub encoder: no weights), the embedding cache, and the
compositional canvas whose captions must agree with its ground-truth layout."""

import pytest
import torch

from ntm.canvas import (EMPTY, HELD_OUT_PAIRS, TASKS, TEMPLATES, COLOR_NAMES, PromptSpec, caption_of, draw_prompt,
                        make_canvases, meets)
from ntm.errors import ConfigError
from ntm.nn import ConditionedTransformer
from ntm.text import CachedEncoder, Prompts

from conftest import StubEncoder


def test_cached_embeddings_equal_fresh_ones_and_are_computed_once(tmp_path):
    stub = StubEncoder()
    enc = CachedEncoder(stub, cache_dir=tmp_path, batch_size=2)
    caps = ["a red 3", "", "a 3 and a 7", "a red 3", ""]
    p = enc.encode(caps)
    fresh = StubEncoder().encode(caps)
    for name in ("tokens", "mask", "pooled"):
        assert torch.equal(getattr(p, name), getattr(fresh, name))
    assert stub.calls == 3  # three distinct captions
    # a new process: the disk cache answers, the encoder is not called
    stub2 = StubEncoder()
    again = CachedEncoder(stub2, cache_dir=tmp_path).encode(caps)
    assert stub2.calls == 0 and torch.equal(again.tokens, p.tokens)
    # another encoder identity never reads these files
    other = StubEncoder(max_tokens=7)
    CachedEncoder(other, cache_dir=tmp_path).encode(["a red 3"])
    assert other.calls == 1


def test_the_disk_cache_keeps_one_shard_per_batch_and_survives_a_broken_file(tmp_path):
    caps = [f"a {d}" for d in range(5)]
    CachedEncoder(StubEncoder(), cache_dir=tmp_path, batch_size=2).encode(caps)
    shards = sorted(tmp_path.glob("*/*.safetensors"))
    assert len(shards) == 3  # batches of 2, 2 and 1 captions
    shards[0].write_bytes(b"not a safetensors file")
    stub = StubEncoder()
    p = CachedEncoder(stub, cache_dir=tmp_path).encode(caps)
    assert stub.calls == 2  # only the broken shard's captions are encoded again
    assert torch.equal(p.tokens, StubEncoder().encode(caps).tokens)


def test_an_encoder_with_wrong_shapes_is_one_clear_error():
    class Bad(StubEncoder):
        def encode(self, captions):
            p = super().encode(captions)
            return Prompts(p.tokens[:, :2], p.mask[:, :2], p.pooled)

    with pytest.raises(ConfigError, match="tokens of shape"):
        CachedEncoder(Bad()).encode(["a 1"])


def test_prompt_batches_index_slice_repeat_and_drop_like_labels():
    p = StubEncoder().encode(["a", "b c", ""])
    q = p[torch.tensor([2, 0])]
    assert torch.equal(q.tokens[1], p.tokens[0]) and len(q) == 2 and q.shape == (2,)
    assert torch.equal(p[1:].pooled, p.pooled[1:])
    r = p.repeat_interleave(2)
    assert len(r) == 6 and torch.equal(r.tokens[3], p.tokens[1])
    d = p.dropped(torch.tensor([False, True, False]))
    assert d.drop.tolist() == [False, True, False] and d.dropped().drop.all()
    both = Prompts.cat([p, p.dropped()])
    assert both.drop.tolist() == [False] * 3 + [True] * 3


def test_canvas_captions_agree_with_their_ground_truth_layout():
    digits = torch.randint(0, 256, (200, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(200) % 10
    images, specs, cells = make_canvases(600, digits, labels, seed=1)
    assert images.shape == (600, 3, 28, 56) and images.dtype == torch.uint8
    assert {s.task for s in specs} == set(TASKS)
    for img, spec, cell in zip(images, specs, cells.tolist()):
        assert meets(spec, [tuple(c) for c in cell]), (spec, cell)
        assert spec.caption == caption_of(spec) and str(spec.a) in spec.caption
        assert not spec.heldout_phrasing and not spec.heldout_combination  # training prompts
        for i, (d, c) in enumerate(cell):
            part = img[:, :, 28 * i:28 * (i + 1)]
            if d == EMPTY:
                assert int(part.max()) == 0
            else:
                assert (d, COLOR_NAMES[c]) not in HELD_OUT_PAIRS
        if spec.task == "position":
            assert cell[0][0] == spec.a and cell[1][0] == spec.b
    # test prompts reach the held-out phrasings and pairs
    g = torch.Generator().manual_seed(2)
    test = [draw_prompt(g, train=False) for _ in range(3000)]
    assert any(s.heldout_phrasing for s in test) and any(s.heldout_combination for s in test)


def test_meets_rejects_what_the_prompt_does_not_say():
    red, blue = COLOR_NAMES.index("red"), COLOR_NAMES.index("blue")
    pos = PromptSpec("position", 3, 7)
    assert meets(pos, [(3, red), (7, blue)]) and not meets(pos, [(7, red), (3, blue)])
    attr = PromptSpec("color_attr", 2, 9, c="red", c2="blue")
    assert meets(attr, [(9, blue), (2, red)]) and not meets(attr, [(2, blue), (9, red)])
    two = PromptSpec("counting", 5, n=2)
    assert meets(two, [(5, red), (5, red)]) and not meets(two, [(5, red), (EMPTY, -1)])
    assert meets(PromptSpec("single", 4), [(EMPTY, -1), (4, red)]) and not meets(PromptSpec("single", 4), [(4, red), (1, red)])
    assert caption_of(PromptSpec("counting", 5, n=1, phrasing=0)) == "one 5"
    assert len({len(v) for v in TEMPLATES.values()}) == 1


@pytest.mark.parametrize("attention", ["concat", "cross"])
def test_padding_columns_no_prompt_uses_are_dropped_without_changing_the_output(attention):
    torch.manual_seed(0)
    L, E = 8, 12
    net = ConditionedTransformer(32, 2, 2, 6, 4, 4, text_dim=E, text_tokens=L, text_attention=attention)
    for p in net.parameters():  # leave the zero-initialised read-out and the small embeddings behind
        torch.nn.init.normal_(p, std=0.3)
    net.set_null_prompt(torch.randn(L, E), torch.arange(L) < 2, torch.randn(E))  # "" is [CLS] [SEP]
    # rows: right-padded (3 tokens), right-padded (5), left-padded (tokens at columns 2-4), dropped (null)
    mask = torch.stack([torch.arange(L) < 3, torch.arange(L) < 5, (torch.arange(L) >= 2) & (torch.arange(L) < 5),
                        torch.zeros(L, dtype=torch.bool)])
    prompts = Prompts(torch.randn(4, L, E), mask, torch.randn(4, E), drop=torch.tensor([False, False, False, True]))
    x, t, s = torch.randn(4, 6, 4), torch.rand(4), torch.rand(4)
    seen = []
    hook = net.net.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    both = net.backbone(x, t, s, prompts)
    # the batch keeps the 5 columns its longest prompts use: 6 image tokens + 5 words (concat), or 6
    # image tokens attending to 5 words (cross)
    assert seen[-1] == (11 if attention == "concat" else 6)
    # every row computed alone (3, 5, 5 and 2 columns) equals the same row beside the others
    for i in range(4):
        alone = net.backbone(x[i:i + 1], t[i:i + 1], s[i:i + 1], prompts[i:i + 1])
        assert torch.allclose(both[i:i + 1], alone, atol=1e-5), i
    # garbage in the padding changes nothing
    noisy = Prompts(torch.where(mask[..., None], prompts.tokens, torch.randn(4, L, E) * 100), mask, prompts.pooled,
                    prompts.drop)
    assert torch.allclose(net.backbone(x, t, s, noisy), both, atol=1e-5)
    hook.remove()
