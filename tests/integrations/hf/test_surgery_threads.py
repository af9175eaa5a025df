"""handle.using(ids): per-thread patch choice, so concurrent requests on one model do not serialise.

Oracle: a plain forward hook written here (adds the steering vector to layer 0's output), on the same model
unpatched; fastpatch's own hooks are not used (they share the engine)."""
from __future__ import annotations

import threading

import torch

import fastpatch as fp
from models import tiny_model


def _oracle(model, ids, v):
    handle = model.model.layers[0].register_forward_hook(lambda m, a, o: o + v)
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        handle.remove()


def test_using_is_per_thread_and_matches_an_independent_hook():
    model = tiny_model("llama")
    D = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    vs = [torch.randn(D, generator=g) * 3 for _ in range(3)]
    prompts = [torch.randint(0, 128, (1, 6), generator=g) for _ in range(6)]
    with torch.no_grad():
        plain = [model(p).logits for p in prompts]
    expected = [_oracle(model, p, vs[k % 3]) for k, p in enumerate(prompts)]
    bank = fp.PatchBank([fp.Steer(v) for v in vs])
    results, errors = {}, []
    start = threading.Barrier(len(prompts))
    with fp.patched(model, {"layers.0.resid_post": bank}) as handle:
        def worker(k):
            try:
                start.wait()
                for _ in range(3):  # several forwards each, interleaved with the other threads
                    with handle.using(torch.tensor([k % 3])), torch.no_grad():
                        results[k] = model(prompts[k]).logits
                    with handle.using(torch.tensor([-1])), torch.no_grad():
                        results[("none", k)] = model(prompts[k]).logits
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        # Outside any block the handle's own select() applies again (none was given: a bank needs one).
        handle.select(torch.tensor([1]))
        with torch.no_grad():
            outside = model(prompts[0]).logits
    for k in range(len(prompts)):
        torch.testing.assert_close(results[k], expected[k], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(results[("none", k)], plain[k], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outside, _oracle(model, prompts[0], vs[1]), rtol=1e-4, atol=1e-4)


def test_using_validates_before_running():
    model = tiny_model("llama")
    bank = fp.PatchBank([fp.Steer(torch.ones(model.config.hidden_size))] * 2)
    with fp.patched(model, {"layers.0.resid_post": bank}) as handle:
        try:
            with handle.using(torch.tensor([5])):
                raise AssertionError("using() accepted an out-of-range id")
        except ValueError as exc:
            assert "[-1, 2)" in str(exc)
