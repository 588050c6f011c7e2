"""Padding-free packing (`vlmalign.models.packing`) equals the padded batch, on every family.

Batch: 3 conversations of different lengths (one with two images, one with one, one text-only), answers of
different lengths, right-padded by the SFT encoder. The padded forward (`token_logps` on the collator batch) is the
reference; the packed forward (`pack_rows` + `packed_attention`) must give the same per-token log-probs, entropies
and gradients (1e-5 relative), keep every image with its row, and attend within rows only.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_shared_prefix import FAMILIES, _assert_grads_close, _loss_and_grads, _rows, built  # noqa: F401

from vlmalign.models import families as families_module

from vlmalign.models.families import get_family
from vlmalign.models.forward import token_logps
from vlmalign.models.packing import pack_rows, packed_attention, packed_score_mask

RTOL = 1e-5
PACKABLE = [f for f in FAMILIES if get_family(f).packing]
ANSWERS = ["red", "two shapes , one blue and one green , both small", "one two three"]


def _batch(encoder):
    rows = _rows()
    convs = [r["prompt"] + [{"role": "assistant", "content": [{"type": "text", "text": a}]}]
             for r, a in zip(rows, ANSWERS)]
    return encoder.encode(convs, [r["images"] for r in rows])


def _packed_logps(model, packed):
    mask = packed_score_mask(packed)
    with packed_attention(model):
        logps, entropy, hits = token_logps(model, packed, mask, with_entropy=True)
    return logps, entropy, hits, mask


@pytest.mark.parametrize("family", PACKABLE)
def test_packed_logps_and_gradients_equal_padded(built, family):
    model, encoder = built(family)
    model.train()
    batch = _batch(encoder)
    real = batch["attention_mask"].bool()
    assert (~real).any(), "the batch must hold padding"
    packed = pack_rows(model, batch)
    lengths = real.sum(1)
    assert packed["input_ids"].shape == (1, int(lengths.sum()))
    assert packed["cu_seq_lens_q"].tolist() == [0, *lengths.cumsum(0).tolist()]
    assert torch.equal(packed["input_ids"][0], batch["input_ids"][real])
    # every image stays with its row: the placeholders of row r sit inside row r's span, in the same number
    image = encoder.image_token_id
    bounds = packed["cu_seq_lens_q"].tolist()
    for r in range(len(lengths)):
        in_span = int((packed["input_ids"][0, bounds[r]:bounds[r + 1]] == image).sum())
        assert in_span == int((batch["input_ids"][r] == image).sum())

    mask = batch["labels"] != -100
    out = {}

    def padded_loss():
        logps, entropy, hits = token_logps(model, batch, mask, with_entropy=True)
        out["padded"] = (logps[mask].detach(), entropy[mask].detach(), hits[mask])
        return -(logps * mask).sum() + 0.01 * (entropy * mask).sum()

    def packed_loss():
        logps, entropy, hits, pmask = _packed_logps(model, packed)
        out["packed"] = (logps[pmask].detach(), entropy[pmask].detach(), hits[pmask])
        return -(logps * pmask).sum() + 0.01 * (entropy * pmask).sum()

    loss_padded, grads_padded = _loss_and_grads(model, padded_loss)
    loss_packed, grads_packed = _loss_and_grads(model, packed_loss)
    assert out["packed"][0].numel() == int(mask.sum()) > 0
    torch.testing.assert_close(out["packed"][0], out["padded"][0], rtol=RTOL, atol=1e-5)
    torch.testing.assert_close(out["packed"][1], out["padded"][1], rtol=RTOL, atol=1e-5)
    assert torch.equal(out["packed"][2], out["padded"][2])
    torch.testing.assert_close(loss_packed, loss_padded, rtol=RTOL, atol=1e-6)
    _assert_grads_close(grads_padded, grads_packed, get_family(model), rtol=RTOL)
    assert model.config.get_text_config()._attn_implementation == "sdpa", "attention setting not restored"


def test_rows_do_not_attend_to_each_other(built):
    """Changing one row's tokens changes nothing in the other rows' log-probs (and does change its own)."""
    model, encoder = built("llava_clip")
    model.eval()
    batch = _batch(encoder)
    packed = pack_rows(model, batch)
    with torch.no_grad():
        before = _packed_logps(model, packed)[0][0]
        changed = dict(packed, input_ids=packed["input_ids"].clone())
        bounds = packed["cu_seq_lens_q"].tolist()
        last = slice(bounds[-2] + 1, bounds[-1] - 1)
        changed["input_ids"][0, last] = changed["input_ids"][0, last].flip(0)
        after = _packed_logps(model, changed)[0][0]
    assert torch.equal(after[:bounds[-2]], before[:bounds[-2]])
    assert not torch.equal(after[bounds[-2]:], before[bounds[-2]:])


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(PACKABLE)))
def test_unpackable_family_is_refused_by_name(built, family):
    model, encoder = built(family)
    with pytest.raises(ValueError, match=f"family {family} "):
        pack_rows(model, _batch(encoder))


def test_linear_attention_cannot_be_packed_with_torch_kernels(built, monkeypatch):
    """Why Qwen3.5 is not packed: forced through the packed path anyway, transformers refuses it, since its torch
    kernels of the linear-attention layers cannot keep the rows' conv / recurrent states apart (only
    flash-linear-attention's honour `cu_seqlens`); the padded batch runs instead (`test_sft.py`)."""
    model, encoder = built("qwen3_5")
    family = get_family(model)
    monkeypatch.setitem(families_module.FAMILIES, family.name, replace(family, packing=True))
    packed = pack_rows(model, _batch(encoder))
    with torch.no_grad(), pytest.raises(ValueError, match="can't keep packed sequences apart"):
        _packed_logps(model, packed)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_patch_embedding_as_matrix_product_equals_convolution(built, family):
    """`models.patch_embed.install`: the Qwen-VL one-patch Conv3d run as `linear` gives the same loss and gradients
    (every parameter, the patch kernel included) as the convolution, to 1e-5."""
    from vlmalign.models import patch_embed

    model, encoder = built(family)
    model.train()
    batch = _batch(encoder)
    mask = batch["labels"] != -100
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    assert len(convs) == 1

    def loss():
        logps, _, _ = token_logps(model, batch, mask)
        return -logps.sum()

    for conv in convs:
        conv.__dict__.pop("forward", None)
    plain_loss, plain = _loss_and_grads(model, loss)
    assert patch_embed.install(model) == 1
    fast_loss, fast = _loss_and_grads(model, loss)
    for conv in convs:
        del conv.__dict__["forward"]
    assert fast_loss.item() == pytest.approx(plain_loss.item(), rel=RTOL)
    name = next(n for n, p in model.named_parameters() if p is convs[0].weight)
    assert plain[name].norm() > 0
    _assert_grads_close(plain, fast, get_family(model), rtol=RTOL)


@pytest.mark.parametrize("family", PACKABLE)
def test_packed_preference_sequence_logps_equal_padded(built, family):
    """DPO / MPO `padding_free`: the chosen and rejected sequences of a preference batch (answers of different
    lengths, rows with 2, 1 and 0 images) packed into one sequence give the padded batch's per-sequence log-prob
    sums, token counts and gradients (1e-5)."""
    from vlmalign.data.collate import PreferenceCollator
    from vlmalign.models.packing import packed_sequence_logps
    from vlmalign.trainers.reference import sequence_logps

    model, encoder = built(family)
    model.train()
    answer = lambda text: [{"role": "assistant", "content": [{"type": "text", "text": text}]}]  # noqa: E731
    rows = [{**r, "chosen": answer(a), "rejected": answer(b)} for r, a, b in zip(
        _rows(), ANSWERS, ["blue", "no", "four five six seven eight nine"])]
    batch = PreferenceCollator(encoder)(rows)
    assert (batch["attention_mask"] == 0).any() and batch["input_ids"].shape[0] == 6
    out = {}
    for name, fn in (("padded", sequence_logps), ("packed", packed_sequence_logps)):
        def loss():
            logps, counts = fn(model, dict(batch))
            out[name] = (logps.detach(), counts)
            return -(logps * torch.linspace(0.5, 1.5, len(logps))).sum()
        out[name + "_grads"] = _loss_and_grads(model, loss)[1]
    padded, packed = out["padded"], out["packed"]
    assert torch.equal(padded[1], packed[1]) and int(packed[1].min()) > 0
    assert torch.allclose(packed[0], padded[0], rtol=RTOL, atol=RTOL * padded[0].abs().max().item())
    _assert_grads_close(out["padded_grads"], out["packed_grads"], get_family(model), rtol=RTOL)
