import numpy as np
import pytest
import torch

from impus_lite.errors import InputError
from impus_lite.text import encode_prompt, optimize_embedding, unconditional_embedding


def test_prompt_embedding_shape_and_dependence_on_the_prompt(tiny_model):
    a = encode_prompt(tiny_model, "a cat")
    b = encode_prompt(tiny_model, "a dog")
    assert a.shape == (1, 77, 32)
    assert (a - b).abs().max() > 1e-3
    assert torch.equal(a, encode_prompt(tiny_model, "a cat"))
    assert unconditional_embedding(tiny_model).shape == (1, 77, 32)


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_is_refused(tiny_model, prompt):
    with pytest.raises(InputError, match="prompt is empty"):
        encode_prompt(tiny_model, prompt)


def test_prompt_over_the_tokenizer_limit_is_refused(tiny_model):
    # The tiny model's tokenizer is character-level: 100 letters are 102 tokens > 77.
    with pytest.raises(InputError, match="at most 77"):
        encode_prompt(tiny_model, "x" * 100)


def _fixed_loss(model, latents, embedding, draws=48):
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        return sum(float(model.diffusion_loss(latents, embedding, generator)) for _ in range(draws)) / draws


def test_optimisation_lowers_the_diffusion_loss(tiny_model):
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    z = tiny_model.encode(x)
    start = encode_prompt(tiny_model, "a photo")
    result = optimize_embedding(tiny_model, z, start, steps=120, lr=5e-2, seed=0, progress=False)
    assert len(result.losses) == 120
    assert result.embedding.shape == start.shape
    assert (result.embedding - start).abs().max() > 1e-3
    before, after = _fixed_loss(tiny_model, z, start), _fixed_loss(tiny_model, z, result.embedding)
    # Same (t, eps) draws for both: the difference is the embedding's alone. On the random tiny
    # model most of the loss is noise no embedding can explain, so the gain is a few percent.
    assert before - after > 0.01, (before, after)


def test_zero_steps_returns_the_start_and_same_seed_same_result(tiny_model):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    start = encode_prompt(tiny_model, "a photo")
    assert torch.equal(optimize_embedding(tiny_model, z, start, 0, progress=False).embedding, start)
    r1 = optimize_embedding(tiny_model, z, start, 5, seed=7, progress=False).embedding
    r2 = optimize_embedding(tiny_model, z, start, 5, seed=7, progress=False).embedding
    r3 = optimize_embedding(tiny_model, z, start, 5, seed=8, progress=False).embedding
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)


def test_batched_optimisation_gives_each_image_its_own_result(tiny_model):
    from impus_lite.text import encode_prompt, optimize_embedding, optimize_embeddings
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    start = encode_prompt(tiny_model, "a photo")
    alone = [optimize_embedding(tiny_model, latents[i:i + 1], start, 4, 0.01, seed=7 + i, progress=False)
             for i in range(2)]
    together = optimize_embeddings(tiny_model, latents, start, 4, 0.01, seeds=[7, 8], progress=False,
                                   workers=1)                     # one batched call per step
    for a, b in zip(alone, together):
        assert torch.allclose(a.embedding, b.embedding, atol=1e-5)
        assert np.allclose(a.losses, b.losses, rtol=1e-5)
        # its own storage, one row: saving it does not write the other image's embedding too
        assert b.embedding.untyped_storage().nbytes() == b.embedding.numel() * b.embedding.element_size()
    assert not torch.allclose(together[0].embedding, together[1].embedding)
