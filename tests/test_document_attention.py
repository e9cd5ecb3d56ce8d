"""Packed documents with a per-document mask see exactly what they would see alone."""

from __future__ import annotations

import torch

from lmforge.config import model_config
from lmforge.data.packing import document_fields
from lmforge.model.gpt import GPT

EOT = 0


def test_packed_document_logits_equal_the_document_alone():
    torch.manual_seed(0)
    for pos in ("learned", "rope"):
        model = GPT(model_config(preset="tiny", vocab_size=50, pos_encoding=pos)).eval()
        first = torch.randint(1, 50, (7,))
        second = torch.cat([torch.tensor([EOT]), torch.randint(1, 50, (9,))])
        packed = torch.cat([first, second])[None]  # (1, 17)
        masks = document_fields(packed, EOT)
        logits = model(packed, **masks)  # (1, 17, V)
        alone_first = model(first[None])
        alone_second = model(second[None])
        torch.testing.assert_close(logits[:, :7], alone_first, atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[:, 7:], alone_second, atol=1e-5, rtol=0)
        assert not torch.allclose(model(packed)[:, 7:], alone_second, atol=1e-3)
