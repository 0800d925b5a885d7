import threading

import pytest
import torch

from impus_lite import workers
from impus_lite.inversion import ddim_sample
from impus_lite.lora import adapter_parameters, add_lora
from impus_lite.text import encode_prompt, unconditional_embedding


def test_chunks_are_contiguous_nearly_equal_and_never_empty():
    assert workers.chunk_bounds(9, 2) == [(0, 5), (5, 9)]
    assert workers.chunk_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert workers.chunk_bounds(2, 8) == [(0, 1), (1, 2)]
    assert workers.chunk_bounds(5, 0) == [(0, 5)]
    # Two UNet rows per chunk at least: 9 guided frames (18 rows) on 64 workers make 9 chunks,
    # one unguided frame stays whole, 3 unguided frames make one chunk, 4 make two.
    assert workers.useful_workers(64, 9, rows_per_item=2) == 9
    assert workers.useful_workers(2, 1, rows_per_item=2) == 1
    assert workers.useful_workers(2, 3) == 1 and workers.useful_workers(2, 4) == 2
    assert workers.useful_workers(1, 40, rows_per_item=2) == 1


def test_map_chunks_keeps_the_order_uses_several_threads_and_raises_a_chunk_error():
    seen, barrier = set(), threading.Barrier(3, timeout=30)

    def square(start, stop):
        seen.add(threading.get_ident())
        barrier.wait()                        # all three chunks run at the same time
        return [i * i for i in range(start, stop)]

    assert workers.map_chunks(square, 7, 3) == [[0, 1, 4], [9, 16], [25, 36]]
    assert len(seen) == 3 and threading.get_ident() in seen

    def failing(start, stop):
        if start > 0:
            raise ValueError(f"chunk at {start}")
        return start

    with pytest.raises(ValueError, match="chunk at 2"):
        workers.map_chunks(failing, 4, 2)


def _frame_threads(model):
    idents = set()
    handle = model.unet.register_forward_pre_hook(lambda *args: idents.add(threading.get_ident()))
    return idents, handle


def test_sampling_split_among_workers_matches_one_batch_with_an_adapter_per_branch(tiny_model):
    add_lora(tiny_model, "w_cond", 4, seed=1)
    add_lora(tiny_model, "w_uncond", 2, seed=2)
    try:
        for name in ("w_cond", "w_uncond"):     # B starts at zero: give both adapters an effect
            for param in adapter_parameters(tiny_model, name):
                param.data.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
        side = tiny_model.resolution // tiny_model.vae_scale_factor
        codes = torch.randn(5, tiny_model.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
        cond = encode_prompt(tiny_model, "a photo").expand(5, -1, -1).clone()
        cond = cond + 0.1 * torch.arange(5).view(-1, 1, 1)              # a different embedding per frame
        uncond = unconditional_embedding(tiny_model)
        w = torch.tensor([1.0, 2.0, 3.0, 5.0, 7.5])

        def sample(count):
            evals, calls = tiny_model.unet_evals, tiny_model.unet_calls
            idents, handle = _frame_threads(tiny_model)
            try:
                out = ddim_sample(tiny_model, codes, cond, uncond, w, 4, "w_cond", "w_uncond",
                                  progress=False, workers=count)
            finally:
                handle.remove()
            return out, tiny_model.unet_evals - evals, tiny_model.unet_calls - calls, len(idents)

        one, evals_one, calls_one, threads_one = sample(1)
        two, evals_two, calls_two, threads_two = sample(2)
        assert (evals_one, calls_one, threads_one) == (40, 4, 1)         # 5 frames x 2 branches x 4 steps
        assert (evals_two, calls_two, threads_two) == (40, 8, 2)         # chunks of 3 and 2 frames
        assert torch.allclose(one, two, atol=1e-5)
        alone = ddim_sample(tiny_model, codes[3:4], cond[3:4], uncond, w[3:4], 4, "w_cond", "w_uncond",
                            progress=False, workers=1)
        assert torch.allclose(two[3:4], alone, atol=1e-5)               # each row is its own trajectory
        plain = ddim_sample(tiny_model, codes, cond, uncond, w, 4, None, None, progress=False, workers=1)
        assert not torch.allclose(plain, one, atol=1e-3)                  # the adapters mattered
    finally:
        tiny_model.remove_adapter("w_cond")
        tiny_model.remove_adapter("w_uncond")


def test_split_sampling_with_unguided_rows_and_only_an_unconditional_adapter_matches_one_batch(tiny_model):
    """One chunk all at guidance 1 (its conditional branch alone, no adapter), the other guided
    through the unconditional adapter: neither may switch the adapters under the other."""
    add_lora(tiny_model, "w_uncond", 2, seed=2)
    try:
        for param in adapter_parameters(tiny_model, "w_uncond"):
            param.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
        side = tiny_model.resolution // tiny_model.vae_scale_factor
        codes = torch.randn(4, tiny_model.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
        cond, uncond = encode_prompt(tiny_model, "a photo"), unconditional_embedding(tiny_model)
        w = torch.tensor([1.0, 1.0, 3.0, 3.0])
        one = ddim_sample(tiny_model, codes, cond, uncond, w, 6, None, "w_uncond", progress=False, workers=1)
        plain = ddim_sample(tiny_model, codes, cond, uncond, w, 6, None, None, progress=False, workers=1)
        assert not torch.allclose(plain[2:], one[2:], atol=1e-3)         # the adapter mattered
        assert torch.allclose(plain[:2], one[:2], atol=1e-5)             # ... only where w > 1
        for _ in range(3):
            two = ddim_sample(tiny_model, codes, cond, uncond, w, 6, None, "w_uncond", progress=False, workers=2)
            assert torch.allclose(one, two, atol=1e-5), (one - two).abs().flatten(1).max(dim=1).values
    finally:
        tiny_model.remove_adapter("w_uncond")


def test_adapters_added_after_others_were_disabled_and_removed_act_in_a_mixed_batch(tiny_model):
    """peft keeps its disabled flag across adapters deleted and added: a mixed batch must enable."""
    side = tiny_model.resolution // tiny_model.vae_scale_factor
    z = torch.randn(2, tiny_model.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    cond = encode_prompt(tiny_model, "a photo").expand(2, -1, -1)
    t = torch.tensor(500)
    add_lora(tiny_model, "old", 2, seed=1)
    with tiny_model.using_adapter(None):        # adapters off, as for an un-adapted render
        pass
    tiny_model.remove_adapters()
    add_lora(tiny_model, "new", 2, seed=2)
    try:
        for param in adapter_parameters(tiny_model, "new"):
            param.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            with tiny_model.using_adapters_per_row(["new", None]):
                mixed = tiny_model.unet(torch.cat([z[:1], z[:1]]), t, encoder_hidden_states=cond).sample
        assert not torch.allclose(mixed[0], mixed[1], atol=1e-4)      # the adapter's row differs
    finally:
        tiny_model.remove_adapters()


def test_a_methods_own_attention_processors_keep_the_batch_whole(tiny_model):
    from diffusers.models.attention_processor import AttnProcessor

    class Counting(AttnProcessor):            # a processor of this project's kind (not diffusers')
        pass

    previous = tiny_model.unet.attn_processors
    tiny_model.unet.set_attn_processor(Counting())
    try:
        side = tiny_model.resolution // tiny_model.vae_scale_factor
        codes = torch.randn(4, tiny_model.latent_channels, side, side, generator=torch.Generator().manual_seed(3))
        cond = encode_prompt(tiny_model, "a photo")
        idents, handle = _frame_threads(tiny_model)
        calls = tiny_model.unet_calls
        try:
            ddim_sample(tiny_model, codes, cond, cond, 2.0, 3, progress=False, workers=2)
        finally:
            handle.remove()
        assert (tiny_model.unet_calls - calls, len(idents)) == (3, 1)
    finally:
        tiny_model.unet.set_attn_processor(previous)


def test_diff_interp_candidates_split_among_workers_match_one_batch(tiny_model):
    from impus_lite.methods.wang_golland import denoise_tail

    side = tiny_model.resolution // tiny_model.vae_scale_factor
    noisy = torch.randn(6, tiny_model.latent_channels, side, side, generator=torch.Generator().manual_seed(5))
    cond = encode_prompt(tiny_model, "a photo").expand(6, -1, -1) + 0.1 * torch.arange(6).view(-1, 1, 1)
    uncond = unconditional_embedding(tiny_model)

    def tail(count, guidance):
        evals, calls = tiny_model.unet_evals, tiny_model.unet_calls
        idents, handle = _frame_threads(tiny_model)
        try:
            out = denoise_tail(tiny_model, noisy, cond, uncond, guidance, 8, 3, None, workers=count)
        finally:
            handle.remove()
        return out, tiny_model.unet_evals - evals, tiny_model.unet_calls - calls, len(idents)

    one, evals_one, calls_one, threads_one = tail(1, 7.5)
    two, evals_two, calls_two, threads_two = tail(2, 7.5)
    assert (evals_one, calls_one, threads_one) == (36, 3, 1)           # 6 candidates x 2 branches x 3 steps
    assert (evals_two, calls_two, threads_two) == (36, 6, 2)           # chunks of 3 candidates
    assert torch.allclose(one, two, atol=1e-5)
    unguided = tail(3, 1.0)                                             # one branch: 2 rows per chunk
    assert unguided[1:] == (18, 9, 3)
    assert not torch.allclose(unguided[0], one, atol=1e-3)


def test_decoding_split_among_workers_matches_one_batch(tiny_model):
    side = tiny_model.resolution // tiny_model.vae_scale_factor
    latents = torch.randn(3, tiny_model.latent_channels, side, side, generator=torch.Generator().manual_seed(4))
    one, two = tiny_model.decode(latents, workers=1), tiny_model.decode(latents, workers=2)
    assert one.shape == (3, 3, tiny_model.resolution, tiny_model.resolution)
    assert torch.allclose(one, two, atol=1e-5)


def test_text_embeddings_split_among_workers_match_one_batch(tiny_model):
    from impus_lite.text import optimize_embeddings
    side = tiny_model.resolution // tiny_model.vae_scale_factor
    latents = torch.randn(2, tiny_model.latent_channels, side, side, generator=torch.Generator().manual_seed(5))
    start = encode_prompt(tiny_model, "a photo")
    results = {}
    for count in (1, 2):
        idents, handle = _frame_threads(tiny_model)
        try:
            results[count] = optimize_embeddings(tiny_model, latents, start, 6, lr=1e-2, seeds=[0, 1],
                                                 progress=False, workers=count)
        finally:
            handle.remove()
        assert len(idents) == count
    for one, two in zip(results[1], results[2]):
        assert torch.allclose(one.embedding, two.embedding, atol=1e-5)
        assert one.losses == pytest.approx(two.losses, rel=1e-4)
    assert not torch.allclose(results[2][0].embedding, results[2][1].embedding, atol=1e-4)
    assert not torch.allclose(results[2][0].embedding, start, atol=1e-4)


def test_a_chunk_that_splits_again_runs_its_parts_in_its_own_thread():
    def outer(start, stop):
        inner = workers.map_chunks(lambda a, b: (threading.get_ident(), list(range(a, b))), 4, 2)
        return [part for _, part in inner], {ident for ident, _ in inner}

    parts = workers.map_chunks(outer, 2, 2)          # a pool of one thread: nesting must not wait on it
    assert [p for p, _ in parts] == [[[0, 1], [2, 3]], [[0, 1], [2, 3]]]
    assert len(parts[1][1]) == 1                      # the worker ran both inner chunks itself


def test_free_workers_split_only_onto_idle_cpus(tmp_path, monkeypatch):
    monkeypatch.setattr(workers.os, "cpu_count", lambda: 4)
    loadavg = tmp_path / "loadavg"
    for running, expected in ((1, 4), (2, 3), (4, 1), (9, 1)):    # this thread counts as running
        loadavg.write_text(f"0.50 0.40 0.30 {running}/321 4242\n")
        assert workers.free_workers(8, loadavg) == expected
    assert workers.free_workers(2, tmp_path / "missing") == 2      # no /proc: as configured
    assert workers.free_workers(1, loadavg) == 1
